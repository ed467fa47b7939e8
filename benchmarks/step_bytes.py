"""Bytes per image of the compiled training step, counted by torch inductor: GPU speed's main driver (the step is
memory-bound), measurable on any machine and the same on every run, so a fair before/after.

    python benchmarks/step_bytes.py                                   # ViT-T/2: pretraining and fine-tuning
    python benchmarks/step_bytes.py --cases moco                      # MoCo v3 on ViT-T/2 (two views)
    python benchmarks/step_bytes.py --cases finetune vil              # ViT-T/2 and a ViL of its sizes
    python benchmarks/step_bytes.py --cases pretrain --model decoder_layer=2 decoder_emb_dim=128 decoder_head=4
    python benchmarks/step_bytes.py --fp32_stream                     # the residual stream as it was before

The step (forward under bf16 autocast, loss, backward) is compiled at batch 4 and at batch 8 with inductor's
caches off; bytes per image = (bytes at 8 - bytes at 4) / 4, so the weights' and their gradients' traffic drops
out. On the CPU, autocast casts linear, conv and attention to bf16 and keeps layer_norm in fp32, as on CUDA.
About a minute per case on 2 CPU cores. One JSON line per case.
"""
import contextlib
import json
import logging
import time

import torch

import mae_pretrain
import moco_pretrain
from cifar_mae.classification import ClassificationLoss
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser
from cifar_mae.moco import MoCo
from cifar_mae.vil import VisionLSTM
import model as model_module
from model import MAE_Decoder, MAE_ViT, MODELS, ViT_Classifier

SIZE_KEYS = list(MODELS["vit_tiny_patch2"]) + ["decoder_emb_dim"]
VIEWS = {"pretrain": 0, "finetune": 0, "moco": 2, "vil": 0}  # the views per image a case's batch holds (0: plain images)


def get_args_parser():
    parser = ArgumentParser("bytes per image of the compiled training step")
    parser.add_argument("--cases", nargs="+", default=["pretrain", "finetune"], choices=list(VIEWS),
                        help="which training steps to count (moco: MoCo v3 on the encoder, as configs/moco_vit.yaml; "
                             "vil: fine-tuning a Vision-LSTM of the ViT's image and patch size, width and depth)")
    parser.add_argument("--fp32_stream", action="store_true",
                        help="count the model as before the bf16 residual stream (fp32 tokens promote the stream)")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"change sizes of ViT-T/2 ({', '.join(SIZE_KEYS)})")
    return parser


def legacy_decoder_forward(self, features, ids_restore):
    """MAE_Decoder.forward before the bf16 stream: the fp32 mask token and position embedding promote it."""
    x = self.decoder_embed(features)
    batch, num_patches = ids_restore.shape
    shuffled = torch.cat([x[:, 1:], self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)], dim=1)
    x = torch.cat([x[:, :1], shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))], dim=1)
    x = x + self.pos_embed
    for block in self.blocks:
        x = block(x)
    return self.head(self.norm(x)[:, 1:])


@contextlib.contextmanager
def fp32_stream(on):
    """With `on`, the model code as before the bf16 stream (--fp32_stream), for a side-by-side measurement."""
    saved = model_module.embed, model_module.prepend_cls, MAE_Decoder.forward
    if on:
        model_module.embed = lambda patch_embed, pos_embed, imgs: patch_embed(imgs) + pos_embed[:, 1:]
        model_module.prepend_cls = lambda cls_token, pos_embed, tokens: torch.cat(
            [(cls_token + pos_embed[:, :1]).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        MAE_Decoder.forward = legacy_decoder_forward
    try:
        yield
    finally:
        model_module.embed, model_module.prepend_cls, MAE_Decoder.forward = saved


def build(case, sizes):
    """(model, loss_fn(model, images, labels) -> (loss, extra)) of a case."""
    with as_user_error("--model: "):  # a width its heads do not divide
        mae = MAE_ViT(**sizes)
    if case == "pretrain":
        return mae, mae_pretrain.mae_loss
    if case == "moco":
        return MoCo(mae.encoder, sizes["emb_dim"], version=3, dim=256, mlp_dim=4096), moco_pretrain.moco_loss
    loss = ClassificationLoss(10)
    if case == "vil":
        return VisionLSTM(sizes["image_size"], sizes["patch_size"], sizes["emb_dim"], sizes["encoder_layer"]), loss
    return ViT_Classifier(mae.encoder, 10), loss


def count_step(model, loss_fn, batch, image_size, views=0):
    """Bytes inductor's kernels read and write, kernels generated and dynamo graph breaks, for one step at
    `batch` (of `views` views per image, 0: plain images) on the CPU: the forward and loss compiled (as the
    Trainer compiles the model), then backward."""
    from torch._inductor import metrics
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    metrics.reset()
    torch.manual_seed(0)
    forward = torch.compile(lambda images, labels: loss_fn(model, images, labels)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shape = (batch, views, 3, image_size, image_size) if views else (batch, 3, image_size, image_size)
        loss = forward(torch.randn(shape), torch.arange(batch) % 10)
    loss.backward()  # inductor compiles the backward graph here
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return metrics.num_bytes_accessed, metrics.generated_kernel_count, breaks


def bytes_per_image(model, loss_fn, image_size, views=0):
    """-> dict: MB per image of the compiled step, kernels generated, dynamo graph breaks."""
    torch._inductor.config.fx_graph_cache = False  # a cached graph would count no bytes
    torch._functorch.config.enable_autograd_cache = False
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts bytes only while its metrics log is on
    quiet = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    drop = lambda record: False  # the metrics log's lines (thousands of characters each) are not shown
    quiet.addFilter(drop)
    try:
        small, _, _ = count_step(model, loss_fn, 4, image_size, views)
        large, kernels, breaks = count_step(model, loss_fn, 8, image_size, views)
    finally:
        torch._logging.set_logs()
        quiet.removeFilter(drop)
        torch._dynamo.reset()
    return {"mb_per_image": (large - small) / 4 / 1e6, "kernels": kernels, "graph_breaks": breaks}


@cli_main
def main(args):
    sizes = dict(MODELS["vit_tiny_patch2"])
    for item in args.model:
        key, _, value = item.partition("=")
        if key not in SIZE_KEYS or not value.isdigit() or int(value) <= 0:
            raise UserError(f"--model takes KEY=VALUE with a positive whole VALUE and KEY one of "
                            f"{', '.join(SIZE_KEYS)}, got {item!r}")
        sizes[key] = int(value)
    results = []
    for case in args.cases:
        start = time.perf_counter()
        model, loss_fn = build(case, sizes)
        with fp32_stream(args.fp32_stream):
            traffic = bytes_per_image(model, loss_fn, sizes["image_size"], VIEWS[case])
        line = {"case": case, **traffic, "fp32_stream": args.fp32_stream, "model": sizes,
                "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(line), flush=True)
        results.append(line)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
