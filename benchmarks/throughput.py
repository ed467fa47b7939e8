"""Training throughput of the fast path (device data, bf16, compile, fused AdamW) against the plain path
(DataLoader + PIL transforms, fp32, eager), side by side in one run. One JSON line per case.

    python benchmarks/throughput.py                    # ViT-T/2, the default config (a GPU box)
    python benchmarks/throughput.py --preset tiny      # a small config that finishes in a minute on a CPU
    python benchmarks/throughput.py --cases data,finetune --randaug rand-m9-mstd0.5-inc1   # with RandAugment
    python benchmarks/throughput.py --compile_mode max-autotune-no-cudagraphs              # another compile mode
    python benchmarks/throughput.py --cases pretrain --paths fast --profile 3             # where the time goes
    python benchmarks/throughput.py --cases pretrain --paths fast --model decoder_emb_dim=128   # another model
    python benchmarks/throughput.py --cases moco --paths fast      # MoCo v3 on the encoder (configs/moco_vit.yaml)
    python benchmarks/throughput.py --cases finetune,vil           # a Vision-LSTM of the ViT's sizes beside it

Cases, interleaved: data-only pipelines (images/s of the loaders alone, augmentation on), then pretraining
and fine-tuning steps, each on the plain and the fast path. A training step is a whole optimizer step of
the real Trainer (micro-batches, backward, AdamW, lr), batches drawn from the loader on the hot path.
FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode on one forward + backward (with the
math attention kernel, so attention counts on every device); flop_shares splits them by top-level module
(encoder / decoder, or blocks / head ...) and gives attention's part.

--profile N runs N more steps under torch.profiler and prints a "profile" line after the case: device time
per step by category (matrix multiplies, attention, fused elementwise kernels, optimizer, other) and the
top operators. Under CUDA graphs (--compile_mode reduce-overhead) the profiler sees graph replays, not kernels.
"""
import argparse
import collections
import functools
import json
import os
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mae_pretrain
import moco_pretrain

from benchmarks.step_bytes import SIZE_KEYS, VIEWS, build as build_cpu, bytes_per_image, fp32_stream
from model import MAE_ViT, ViT_Classifier
from cifar_mae.classification import ClassificationLoss
from cifar_mae.engine import Trainer
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, COMPILE_MODES, INTERPOLATIONS, check_positive, path_arg
from cifar_mae.loaders import DeviceLoader, TorchLoader
from cifar_mae.moco import MoCo
from cifar_mae.optim import make_optimizer
from cifar_mae.runtime import setup_runtime, synchronize, wrap_model
from cifar_mae.views import TwoViewLoader
from cifar_mae.vil import VisionLSTM

PRESETS = {
    # the project's default ViT-T/2; fine-tuning measured at a GPU-sized batch (the recipe's 128 is launch-bound)
    "vit-t": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3, decoder_layer=4,
                  decoder_head=3, images=50000, pretrain_batch=4096, pretrain_micro=1024, finetune_batch=1024,
                  finetune_micro=1024, moco_batch=512, moco_micro=512, moco_dim=256, moco_mlp_dim=4096, steps=20,
                  warmup=5),
    "tiny": dict(image_size=16, patch_size=2, emb_dim=64, encoder_layer=2, encoder_head=2, decoder_layer=1,
                 decoder_head=2, images=4096, pretrain_batch=256, pretrain_micro=256, finetune_batch=256,
                 finetune_micro=256, moco_batch=256, moco_micro=256, moco_dim=64, moco_mlp_dim=256, steps=5,
                 warmup=2),
}
# the model sizes --model may change (the numbers of mae_pretrain's model config)
MODEL_KEYS = ["image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "decoder_layer", "decoder_head",
              "decoder_emb_dim"]


def get_args_parser():
    parser = ArgumentParser("training throughput benchmark")
    parser.add_argument("--preset", default="vit-t", choices=sorted(PRESETS),
                        help="vit-t: the default ViT-T/2 on 32x32 images; tiny: a small model for a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    parser.add_argument("--pretrain_micro", type=int, default=None,
                        help="pretraining micro-batch (the batch is the preset's); none: the preset's")
    parser.add_argument("--finetune_batch", type=int, default=None, help="fine-tuning batch; none: the preset's")
    parser.add_argument("--finetune_micro", type=int, default=None,
                        help="fine-tuning micro-batch; none: the preset's")
    parser.add_argument("--peak_tflops", type=float, default=800.0,
                        help="peak dense matrix TFLOP/s of the device for MFU (H100 bf16, measured: about 800)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the plain path")
    parser.add_argument("--cases", default="data,pretrain,finetune", help="comma-separated subset")
    parser.add_argument("--paths", default="plain,fast",
                        help="comma-separated subset of plain, plain_bf16 (the plain path under bf16 autocast, on "
                             "a GPU: fast/plain_bf16 leaves out precision), fast")
    parser.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode of the fast path")
    parser.add_argument("--randaug", default=None,
                        help="a RandAugment policy (e.g. rand-m9-mstd0.5-inc1) for the data and fine-tuning cases: "
                             "timm's on PIL images in the plain path, per sample on the device in the fast path")
    parser.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                        help="filter of the random-resized-crop, on both paths")
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timed steps of each training case, profile this many steps and print "
                             "where the device time goes")
    parser.add_argument("--trace_dir", type=path_arg, default=None,
                        help="with --profile: write a Chrome trace per case here")
    parser.add_argument("--bytes", action="store_true",
                        help="also count the compiled step's bytes per image with inductor (benchmarks/step_bytes.py, "
                             "on the CPU, about a minute per case) and, on a GPU, the TB/s that makes")
    parser.add_argument("--peak_tbps", type=float, default=None,
                        help="the device's memory bandwidth for --bytes' share of peak (default: 3.35 for an H100 "
                             "SXM, 4.8 for an H200, from NVIDIA's data sheets)")
    parser.add_argument("--fp32_stream", action="store_true",
                        help="the residual stream as before the bf16 stream: promoted to fp32 by the fp32 tokens "
                             "and position embeddings (to compare against)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per case: median and spread")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change the preset's model, e.g. decoder_emb_dim=128 decoder_layer=2 (keys: "
                             f"{', '.join(MODEL_KEYS)})")
    return parser


def model_overrides(items):
    """["decoder_emb_dim=128", ...] -> {"decoder_emb_dim": 128, ...}; a bad item is a UserError."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in MODEL_KEYS or not value.isdigit() or int(value) <= 0:
            raise UserError(f"--model takes KEY=VALUE with a positive whole VALUE and KEY one of "
                            f"{', '.join(MODEL_KEYS)}, got {item!r}")
        overrides[key] = int(value)
    return overrides


def runtime(device, path, compile_mode="default"):
    """fast: the GPU defaults (bf16, compile); plain: fp32, eager; plain_bf16: bf16 autocast where the device has
    it (CUDA), eager."""
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    amp = {"fast": None, "plain": "off", "plain_bf16": "bf16" if cuda else "off"}[path]
    return setup_runtime(0, device, amp, None if path == "fast" else False, compile_mode)


def make_loader(rt, images, labels, batch, fast, num_workers, aug=None, seed=0, views=False):
    """aug: randaug and interpolation, as the loaders take them; views: MoCo's two views (on the device, both
    paths)."""
    common = dict(device=rt.device, train=True, seed=seed, crop_scale=(0.2, 1.0), flip=True, **(aug or {}))
    if views:
        return TwoViewLoader(images, labels, batch, **{k: v for k, v in common.items() if k != "train"})
    if fast:
        return DeviceLoader(images, labels, batch, **common)
    return TorchLoader(images, labels, batch, num_workers=num_workers, **common)


def endless_batches(loader):
    while True:
        yield from loader.batches(loader.order.new_epoch())


def flops_per_image(model, loss_fn, images, labels):
    """Forward + backward FLOPs of one micro-batch, per image (eager, fp32, math attention)
    -> (FLOPs, shares: each top-level submodule's and attention's fraction of them)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(model, images, labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    counts = counter.get_flop_counts()  # per module path that ran, each including its submodules
    root = type(model).__name__ + "."
    paths = [path for path in counts if path.startswith(root)]
    shares = collections.defaultdict(float)
    for path in paths:  # the outermost modules that ran (blocks.0, not a ModuleList), by top-level name
        if not any(path.startswith(other + ".") for other in paths):
            shares[path[len(root):].split(".")[0]] += sum(counts[path].values()) / total
    # the math attention's two batched matmuls (q k^T, then with v) are the model's only bmm
    shares["attention"] = counts["Global"].get(torch.ops.aten.bmm, 0) / total
    return total / images.shape[0], dict(shares)


def time_data(rt, loader, steps, warmup):
    batches = endless_batches(loader)
    for _ in range(warmup):
        images, _ = next(batches)
    synchronize(rt.device)
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        images, _ = next(batches)
        count += images.shape[0]
    synchronize(rt.device)
    return count / (time.perf_counter() - start)


def build(case, cfg, rt):
    with as_user_error("--model: "):  # a --model change that does not fit (a width its heads do not divide)
        mae = MAE_ViT(**{k: cfg[k] for k in MODEL_KEYS if k in cfg})
    if case == "pretrain":
        model, loss_fn, betas = mae, mae_pretrain.mae_loss, (0.9, 0.95)
        batch, micro = cfg["pretrain_batch"], cfg["pretrain_micro"]
    elif case == "vil":  # fine-tuning a Vision-LSTM of the ViT's sizes
        model, betas = VisionLSTM(cfg["image_size"], cfg["patch_size"], cfg["emb_dim"], cfg["encoder_layer"]), \
            (0.9, 0.999)
        loss_fn = ClassificationLoss(10)
        batch, micro = cfg["finetune_batch"], cfg["finetune_micro"]
    elif case == "moco":  # v3, as configs/moco_vit.yaml
        model = MoCo(mae.encoder, mae.config["emb_dim"], version=3, dim=cfg["moco_dim"], mlp_dim=cfg["moco_mlp_dim"])
        loss_fn, betas = moco_pretrain.moco_loss, (0.9, 0.999)
        batch, micro = cfg["moco_batch"], cfg["moco_micro"]
    else:
        model, betas = ViT_Classifier(mae.encoder, 10), (0.9, 0.999)
        loss_fn = ClassificationLoss(10)
        batch, micro = cfg["finetune_batch"], cfg["finetune_micro"]
    model.to(rt.device)
    return model, loss_fn, betas, batch, micro


def category(name):
    """The kind of work an operator or kernel name stands for."""
    lowered = name.lower()
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm") or "gemm" in lowered:
        return "matmul"
    if "attention" in lowered or "flash" in lowered or "fmha" in lowered:
        return "attention"
    if "adam" in lowered or "foreach" in lowered:
        return "optimizer"
    if name.startswith("triton_") or name.startswith("cpp_fused"):
        return "fused elementwise"
    return "other"


def profile_summary(prof, steps, device_type, top=15):
    """Device time per step by category and the top operators (CPU time on a CPU), from profiler events.

    On CUDA an operator counts where it has its own CPU and device time: the op that launched a kernel, as
    named on the CPU (aten::mm, an inductor triton_* kernel, aten::_flash_attention_forward), so nothing is
    counted twice.
    """
    times = collections.defaultdict(float)
    for event in prof.key_averages():
        if device_type == "cuda":
            if event.self_cpu_time_total > 0 and event.self_device_time_total > 0:
                times[event.key] += event.self_device_time_total
        elif event.self_cpu_time_total > 0:
            times[event.key] += event.self_cpu_time_total
    total = sum(times.values()) or 1.0
    shares = collections.defaultdict(float)
    for name, us in times.items():
        shares[category(name)] += us / total
    ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
    return {"ms_per_step": total / steps / 1e3, "time": "device" if device_type == "cuda" else "cpu",
            "by_category": dict(sorted(shares.items(), key=lambda item: -item[1])),
            "top": [{"name": name, "ms_per_step": us / steps / 1e3, "share": us / total} for name, us in ranked]}


def profile_steps(trainer, batches, rt, steps, first_step, trace_path=None):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(steps):
            trainer.step(*next(batches), first_step + step)
        synchronize(rt.device)
    if trace_path:
        os.makedirs(os.path.dirname(trace_path), exist_ok=True)
        prof.export_chrome_trace(trace_path + ".part")  # a run stopped while writing leaves no torn trace
        os.replace(trace_path + ".part", trace_path)
    return profile_summary(prof, steps, rt.device.type)


PEAK_TBPS = {"H100": 3.35, "H200": 4.8}  # HBM bandwidth of the SXM parts, NVIDIA's data sheets


def time_training(case, cfg, rt, images, labels, fast, num_workers, aug, profile=0, trace_path=None, repeats=3):
    model, loss_fn, betas, batch, micro = build(case, cfg, rt)
    loader = make_loader(rt, images, labels, batch, fast, num_workers, aug, views=case == "moco")
    x, y = next(loader.batches(loader.order.new_epoch()))
    flops, flop_shares = flops_per_image(model, loss_fn, x[:min(micro, 64)], y[:min(micro, 64)])
    if case == "moco":  # its modules run once per view, and the flop counter's module tracker then gives their
        flop_shares = None  # backward to the wrong module (the total is right)
    trained = [p for p in model.parameters() if p.requires_grad]  # not MoCo's key encoder
    optimizer = make_optimizer([{"params": trained, "weight_decay": 0.05}], 1e-4, rt, betas)
    if not fast and rt.device.type == "cuda":  # the plain path: the optimizer as a user would first write it
        optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=betas, weight_decay=0.05)
    after_step = functools.partial(model.after_step, total_steps=10 ** 9) if case == "moco" else None
    trainer = Trainer(wrap_model(model, rt), loss_fn, optimizer, lambda step: 1e-4, rt, micro_batch=micro,
                      num_extra={"finetune": 1, "vil": 1, "moco": 2}.get(case, 0), after_step=after_step)
    batches = endless_batches(loader)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    start = time.perf_counter()
    for step in range(cfg["warmup"]):
        sums = trainer.step(*next(batches), step)
    synchronize(rt.device)
    warmup_seconds = time.perf_counter() - start
    rates, step = [], cfg["warmup"]
    for _ in range(repeats):  # the median of a few timed loops, and their spread
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            sums = trainer.step(*next(batches), step)
            step += 1
        synchronize(rt.device)
        rates.append(cfg["steps"] * batch / (time.perf_counter() - start))
    loss = float(sums[0] / sums[1])
    images_per_s = statistics.median(rates)
    peak_memory = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30 if rt.device.type == "cuda" else None
    result = dict(batch=batch, micro_batch=micro, images_per_s=images_per_s,
                  images_per_s_spread=[min(rates), max(rates)], gflop_per_image=flops / 1e9,
                  flop_shares=flop_shares,
                  achieved_tflops=images_per_s * flops / 1e12, warmup_seconds=warmup_seconds, last_loss=loss,
                  peak_memory_gib=peak_memory)
    if profile:
        result["profile"] = profile_steps(trainer, batches, rt, profile, step, trace_path)
    return result


def memory_traffic(case, cfg, line, rt, peak_tbps):
    """Inductor's bytes per image of the case's step (counted on the CPU) and, on a GPU, the TB/s they make at the
    measured images/s and the share of the device's peak bandwidth."""
    model, loss_fn = build_cpu(case, {key: cfg[key] for key in SIZE_KEYS if key in cfg})
    traffic = bytes_per_image(model, loss_fn, cfg["image_size"], VIEWS[case])
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        peak = peak_tbps or next((tbps for part, tbps in PEAK_TBPS.items() if part in name), None)
        traffic["achieved_tbps"] = line["images_per_s"] * traffic["mb_per_image"] / 1e6
        traffic["peak_tbps"], traffic["hbm_share"] = peak, traffic["achieved_tbps"] / peak if peak else None
    return traffic


def parse_subset(value, flag, allowed):
    chosen = value.split(",")
    unknown = [name for name in chosen if name not in allowed]
    if unknown:
        raise UserError(f"{flag} takes a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return chosen


@cli_main
def main(args):
    cfg = {**PRESETS[args.preset], **model_overrides(args.model)}
    for key in ("steps", "warmup", "pretrain_micro", "finetune_batch", "finetune_micro"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    check_positive(argparse.Namespace(**cfg, peak_tflops=args.peak_tflops, peak_tbps=args.peak_tbps,
                                      repeats=args.repeats), "steps", "pretrain_micro", "finetune_batch",
                   "finetune_micro", "peak_tflops", "peak_tbps", "repeats")
    if cfg["warmup"] < 0 or args.profile < 0 or args.num_workers < 0:
        raise UserError("--warmup, --profile and --num_workers must not be negative")
    if cfg["finetune_batch"] % cfg["finetune_micro"] or cfg["pretrain_batch"] % cfg["pretrain_micro"]:
        raise UserError("each batch must be a multiple of its micro-batch (--finetune_batch, --finetune_micro, "
                        f"--pretrain_micro; the pretraining batch is {cfg['pretrain_batch']})")
    cases = parse_subset(args.cases, "--cases", ["data", "pretrain", "finetune", "moco", "vil"])
    paths = parse_subset(args.paths, "--paths", ["plain", "plain_bf16", "fast"])
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg["images"], 3, cfg["image_size"], cfg["image_size"]), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (cfg["images"],), generator=generator)
    results = []
    config = {k: v for k, v in cfg.items() if k not in ("steps", "warmup")}
    for case in cases:
        for path in paths:
            fast = path == "fast"
            rt = runtime(args.device, path, args.compile_mode)
            torch.backends.cuda.matmul.allow_tf32 = fast  # the plain path is true fp32, as the original ran
            torch.backends.cudnn.allow_tf32 = fast
            torch.manual_seed(0)
            line = dict(case=f"{case}-{path}", device=torch.cuda.get_device_name(rt.device)
                        if rt.device.type == "cuda" else "cpu", preset=args.preset,
                        amp=rt.amp,
                        compile=rt.compile, compile_mode=rt.compile_mode if rt.compile else None,
                        loader="device" if fast or case == "moco" else f"torch({args.num_workers} workers)")
            randaug = args.randaug if case in ("data", "finetune", "vil") else None  # pretraining: its own augmentation
            aug = dict(randaug=randaug, interpolation=args.interpolation)
            line.update(aug)
            if case == "data":
                batch = cfg["pretrain_batch"]
                loader = make_loader(rt, images, labels, batch, fast, args.num_workers, aug)
                line.update(batch=batch, images_per_s=time_data(rt, loader, cfg["steps"] * 4, cfg["warmup"]))
            else:
                trace = os.path.join(args.trace_dir, f"{case}-{path}.json") if args.trace_dir else None
                with fp32_stream(args.fp32_stream):
                    line.update(time_training(case, cfg, rt, images, labels, fast, args.num_workers, aug,
                                              args.profile, trace, args.repeats))
                    if args.bytes:
                        line.update(memory_traffic(case, cfg, line, rt, args.peak_tbps))
                line["mfu"] = line["achieved_tflops"] / args.peak_tflops
                line["fp32_stream"] = args.fp32_stream
            line["config"] = config
            profile = line.pop("profile", None)
            print(json.dumps(line), flush=True)
            if profile:
                print(json.dumps({"case": line["case"], "profile": profile}), flush=True)
            results.append(line)
            torch._dynamo.reset()
    by_case = {r["case"]: r["images_per_s"] for r in results}
    ratios = {case: by_case[f"{case}-fast"] / by_case[f"{case}-plain"] for case in cases
              if f"{case}-fast" in by_case and f"{case}-plain" in by_case}
    if ratios:  # only where both paths ran
        print(json.dumps({"summary": "fast/plain images per second", **ratios}), flush=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
