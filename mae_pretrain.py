"""MAE pretraining of a ViT on CIFAR-10 (or any small ImageFolder dataset).

    python mae_pretrain.py                      # ViT-T/2, 2000 epochs, writes vit-t-mae.pth
    tensorboard --logdir logs                   # mae_loss, lr, images/s, reconstructions
    python mae_pretrain.py --eval_only vit-t-mae.pth    # kNN accuracy and test reconstruction loss
"""
import contextlib
import os
import shlex
import sys

import torch
from einops import rearrange
from timm.optim import param_groups_weight_decay

from cifar_mae.augment import denormalize, normalize
from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import checkpoint, load_checkpoint, restore_training_state, resume_checkpoint, \
    training_state
from cifar_mae.console import resume_command, script_command
from cifar_mae.datasets import data_info, default_log_dir, load_data, spread_test_images
from cifar_mae.engine import Trainer, fit
from cifar_mae.errors import UserError, cli_main
from cifar_mae.flags import ArgumentParser, DATA_DIR_HELP, add_augmentation_args, add_config_arg, add_encoder_args, \
    add_runtime_args, check_positive, check_schedule, path_arg, resolve_model, take_saved, timm_name
from cifar_mae.knn import knn_monitor
from cifar_mae.loaders import eval_batches, make_loader
from cifar_mae.metrics import MetricsLog
from cifar_mae.optim import make_optimizer, peak_lr, schedule
from cifar_mae.outputs import auto_resume, check_export_path, claim_outputs, data_dir_from
from cifar_mae.timm_export import encoder_export, write_timm_state
from cifar_mae.runtime import all_reduce_sum, note_devices, setup_runtime, split_batch, unwrap, wrap_model
from model import MAE_ViT, output_stem

GPU_MICRO_BATCH = 1024  # the micro-batch ceiling on a GPU when --max_device_batch_size is not given


def get_args_parser():
    parser = ArgumentParser("MAE pretraining")
    add_config_arg(parser)
    parser.add_argument("--seed", type=int, default=42, help="seeds every RNG (process k of a run takes seed + k)")
    parser.add_argument("-bs", "--batch_size", type=int, default=4096, help="images per optimizer step (global)")
    parser.add_argument("--max_device_batch_size", type=int, default=None,
                        help="micro-batch per forward/backward; gradients are averaged over micro-batches, so this "
                             f"changes memory use, not the objective (default: the largest divisor of the batch per "
                             f"process up to {GPU_MICRO_BATCH} on a GPU, 64 on the CPU)")
    parser.add_argument("--base_learning_rate", type=float, default=1.5e-4, help="lr = base * batch_size / 256")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (weight matrices only)")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches hidden from the encoder")
    parser.add_argument("--total_epoch", type=int, default=2000, help="epochs; the cosine schedule ends with the last")
    parser.add_argument("--warmup_epoch", type=int, default=200, help="epochs of linear lr warmup")
    parser.add_argument("--model_path", type=path_arg, default=None,
                        help="checkpoint written after every epoch (default: vit-t-mae.pth for the default model, "
                             "else MODEL-mae.pth)")
    parser.add_argument("--data_dir", type=path_arg, default=None, help=DATA_DIR_HELP)
    parser.add_argument("--log_dir", type=path_arg, default=None,
                        help="TensorBoard events and metrics.jsonl (default: logs/<dataset>/<--model_path's name>)")
    model = add_encoder_args(parser.add_argument_group("model"))
    model.add_argument("--decoder_layer", type=int, default=None, help="decoder blocks")
    model.add_argument("--decoder_head", type=int, default=None, help="decoder attention heads")
    model.add_argument("--decoder_emb_dim", type=int, default=None, help="decoder width (default: emb_dim)")
    model.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalised pixels")
    parser.add_argument("--pretrain_split", default="train+unlabeled",
                        choices=["train+unlabeled", "train", "unlabeled"],
                        help="with STL-10, which images pretraining takes; other data have a training split only")
    add_augmentation_args(parser.add_argument_group("augmentation (per sample)"), [0.2, 1.0])
    monitor = parser.add_argument_group("monitoring")
    monitor.add_argument("--knn_every", type=int, default=0, help="kNN accuracy every N epochs (0: never)")
    monitor.add_argument("--knn_k", type=int, default=200, help="neighbours that vote")
    monitor.add_argument("--knn_t", type=float, default=0.07, help="temperature of the votes, exp(similarity / T)")
    monitor.add_argument("--image_every", type=int, default=None,
                         help="log the reconstruction image every N epochs and after the last (default: about 100 "
                              "images a run, every epoch up to 100 epochs)")
    monitor.add_argument("--eval_only", type=path_arg, default=None, metavar="CHECKPOINT",
                         help="print a saved MAE's kNN accuracy and test-set reconstruction loss (at --mask_ratio if "
                              "given, else the checkpoint's) and exit")
    monitor.add_argument("--export_timm", type=path_arg, default=None, metavar="PATH",
                         help="with --eval_only: also write the encoder as a state_dict for timm's VisionTransformer "
                              "(num_classes=0: a backbone to fine-tune with timm)")
    return add_runtime_args(parser)


def validate(args):
    check_positive(args, "batch_size", "max_device_batch_size", "base_learning_rate", "total_epoch", "image_size",
                   "patch_size", "emb_dim", "encoder_layer", "encoder_head", "decoder_layer", "decoder_head",
                   "decoder_emb_dim", "log_interval", "knn_k", "knn_t", "image_every", "save_every",
                   "stop_after_epoch", "stop_after_minutes")
    if args.weight_decay < 0 or args.warmup_epoch < 0 or args.knn_every < 0 or args.num_workers < 0:
        raise UserError("--weight_decay, --warmup_epoch, --knn_every and --num_workers must not be negative")
    if not 0.0 < args.mask_ratio < 1.0:  # the loss is taken over masked patches only
        raise UserError(f"--mask_ratio must lie in (0, 1), got {args.mask_ratio}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop_scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    check_schedule(args)


def build_model(config):
    try:
        return MAE_ViT(**config)
    except ValueError as e:
        raise UserError(str(e)) from None


def model_config(args):
    return dict(image_size=args.image_size, patch_size=args.patch_size, emb_dim=args.emb_dim,
                encoder_layer=args.encoder_layer, encoder_head=args.encoder_head, decoder_layer=args.decoder_layer,
                decoder_head=args.decoder_head, mask_ratio=args.mask_ratio, in_chans=3,
                decoder_emb_dim=args.decoder_emb_dim or args.emb_dim, pos_embed=args.pos_embed,
                norm_pix_loss=args.norm_pix_loss, timm_model=timm_name(args))


def make_param_groups(model, weight_decay):
    """AdamW groups: weight decay on weight matrices only, none on biases, norms, tokens, position embeddings."""
    no_decay = {"encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "decoder.pos_embed"}
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def image_due(args, epoch):
    """Whether the reconstruction image is logged after `epoch` epochs (1-based): every --image_every, and the last."""
    every = args.image_every or max(1, args.total_epoch // 100)
    return epoch % every == 0 or epoch == args.total_epoch


def mae_loss(model, images, labels):
    """Pretraining loss of one micro-batch -> (loss, no extra sums)."""
    predicted, mask = model(images)
    return unwrap(model).loss(images, predicted, mask), images.new_zeros(0)


@contextlib.contextmanager
def fixed_masks(rt):
    """Masks drawn from seed 0 in a forked RNG: the same at every call, the training RNG streams untouched."""
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


@torch.no_grad()
def reconstruction_grid(model, images, rt):
    """Masked input | reconstruction with visible patches | original, in [0, 1]; the same masks every epoch."""
    was_training = model.training
    model.eval()
    with fixed_masks(rt), rt.autocast():
        predicted, mask = model(images)
    model.train(was_training)
    reconstruction = model.reconstruct(images, predicted, mask)
    grid = torch.cat([images * (1 - mask), reconstruction, images], dim=0)
    pairs = 2 if len(images) % 2 == 0 else 1  # two images side by side per row when they pair up
    grid = rearrange(grid, "(v h1 w1) c h w -> c (h1 h) (w1 v w)", w1=pairs, v=3)
    return denormalize(grid)


@torch.no_grad()
def reconstruction_loss(model, loader, rt, mask_ratio):
    """Mean masked-patch loss over a split, every image weighted alike; masks from a fixed seed in a forked RNG."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss * images, images
    with fixed_masks(rt):
        for images, _ in eval_batches(loader, rt, "test reconstruction loss"):
            with rt.autocast():
                predicted, mask = model(images, mask_ratio)
            sums[0] += model.loss(images, predicted, mask).double() * len(images)
            sums[1] += len(images)
    model.train(was_training)
    total, count = all_reduce_sum(sums, rt).tolist()
    return total / count


def plain_loaders(args, rt, data):
    """The training and test sets without augmentation, for the kNN monitor and evaluation."""
    return [make_loader(args, rt, x, y, 1024, train=False)
            for x, y in ((data.train_images, data.train_labels), (data.test_images, data.test_labels))]


def knn_accuracy(args, model, loaders, data, rt):
    return knn_monitor(model.encoder, *loaders, len(data.classes), rt, k=args.knn_k, temperature=args.knn_t)


def eval_only(args):
    check_export_path(args)
    ckpt = load_checkpoint(args.eval_only, "mae_pretrain", "--eval_only")
    config = ckpt["model_config"]
    sizes = {k: v for k, v in config.items() if k != "mask_ratio"}  # evaluated at --mask_ratio when given
    take_saved(args, get_args_parser(), config, f"--eval_only {args.eval_only}", fixed=sizes)
    resolve_model(args)
    validate(args)
    note = data_dir_from(args, ckpt, args.eval_only)
    rt = setup_runtime(args)
    if rt.is_main and note:
        print(note, file=sys.stderr)
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    model.to(rt.device)
    data = load_data(args.data_dir, config["image_size"], rt)
    loaders = plain_loaders(args, rt, data)
    result = {"epoch": ckpt["epoch"], "mask_ratio": args.mask_ratio,
              "test_loss": reconstruction_loss(model, loaders[1], rt, args.mask_ratio),
              "knn_acc": knn_accuracy(args, model, loaders, data, rt) if data.classes else None}  # needs labels
    if rt.is_main:
        knn = "" if result["knn_acc"] is None else f"kNN accuracy {result['knn_acc']:.2%} (k {args.knn_k}, T " \
            f"{args.knn_t}, cls feature, training set as memory), "
        print(f"{args.eval_only} (epoch {ckpt['epoch']}): {knn}test reconstruction loss {result['test_loss']:.4f} "
              f"at mask ratio {args.mask_ratio}")
        if args.export_timm:
            write_timm_state(*encoder_export(model), args.export_timm)
    return result


@cli_main
def main(args):
    if args.eval_only:
        return eval_only(args)
    if args.export_timm:
        raise UserError("--export_timm writes a saved MAE's encoder: give the checkpoint with --eval_only")
    default_path = f"{output_stem(args.model)}-mae.pth"
    restarting = auto_resume(args, args.model_path or default_path)
    ckpt = resume_checkpoint(args, get_args_parser(), "mae_pretrain")
    resolve_model(args)
    validate(args)
    args.model_path = args.model_path or default_path
    args.data_dir = args.data_dir or "data"
    args.log_dir = args.log_dir or default_log_dir(args.data_dir, args.model_path)
    rt = setup_runtime(args)  # seeds every RNG, so the model's initial weights repeat
    model = build_model(model_config(args))  # a bad configuration fails here, before the data is read
    if rt.is_main:
        claim_outputs(args, args.model_path, "--model_path", restarting, resume_path=args.model_path)
    _, micro_batch = split_batch(args, rt, GPU_MICRO_BATCH)
    data = load_data(args.data_dir, args.image_size, rt,
                     labels_for=f"the kNN monitor (--knn_every {args.knn_every}; pass 0)" if args.knn_every else None)
    data_record = data_info(args.data_dir, data) if rt.is_main else None
    images = data.pretraining_images(args.pretrain_split)  # labels play no part
    train_loader = make_loader(args, rt, images, torch.zeros(len(images), dtype=torch.int64), args.batch_size,
                               train=True, crop_scale=args.crop_scale, flip=args.flip)
    model.to(rt.device)
    optimizer = make_optimizer(make_param_groups(model, args.weight_decay), peak_lr(args), rt, betas=(0.9, 0.95))
    trainer = Trainer(wrap_model(model, rt), mae_loss, optimizer, schedule(args, len(train_loader)), rt,
                      micro_batch=micro_batch, skip_nonfinite=args.skip_nonfinite)
    start_epoch, epoch_state = restore_training_state(ckpt, args.resume, model, trainer, train_loader, rt,
                                                      data_record)
    log = MetricsLog(args.log_dir, rt, args, completed_epochs=start_epoch, resumed=ckpt is not None,
                     data=data_record)
    val_images = normalize(spread_test_images(data)).to(rt.device)
    knn_loaders = plain_loaders(args, rt, data) if args.knn_every else None
    script = script_command(__file__)  # as the start-up note and the resume command name it
    if rt.is_main:
        print(f"pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {rt.device} "
              f"({rt.world_size} process(es)), {len(train_loader)} steps/epoch, micro-batch {micro_batch}, "
              f"peak lr {peak_lr(args):.2e}, {rt.describe()}, loader {args.loader}")
        note_devices(args, rt, script)

    def after_epoch(epoch, metrics):
        record, text = {"loss": metrics["loss"]}, f"loss {metrics['loss']:.4f}"
        if args.knn_every and epoch % args.knn_every == 0:
            record["knn_acc"] = knn_accuracy(args, model, knn_loaders, data, rt)
            text += f", kNN {record['knn_acc']:.2%}"
        log.scalars({"mae_loss": metrics["loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
                     "knn_acc": record.get("knn_acc")}, epoch)
        if rt.is_main and image_due(args, epoch):
            log.image("mae_image", reconstruction_grid(model, val_images, rt), epoch)
        return record, text

    def save(epoch, epoch_state):
        state = training_state(trainer, train_loader, rt, args, epoch_state, data=data_record)  # a collective
        if rt.is_main:
            save_atomic(checkpoint("mae_pretrain", model.state_dict(), model.config, epoch, **state),
                        args.model_path)

    done = fit(args, rt, trainer, model, train_loader, log, start_epoch=start_epoch, epoch_state=epoch_state,
               after_epoch=after_epoch, save=save,
               resume=(args.model_path, resume_command(script, args.model_path, rt, args.device)))
    log.close()
    if done and rt.is_main:
        next_script = script_command(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_classifier.py"))
        print(f"pretrained {args.model_path}; fine-tune it with: python {next_script} --pretrained_model_path "
              f"{shlex.quote(args.model_path)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
