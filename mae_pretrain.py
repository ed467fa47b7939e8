"""MAE pretraining of a ViT on CIFAR-10 (or any small ImageFolder dataset).

    python mae_pretrain.py                      # ViT-T/2, 2000 epochs, writes vit-t-mae.pth
    tensorboard --logdir logs                   # mae_loss, lr, images/s, reconstructions
    python mae_pretrain.py --eval_only vit-t-mae.pth    # kNN accuracy and test reconstruction loss
"""
import argparse
import contextlib
import sys

import torch
from einops import rearrange
from timm.optim import param_groups_weight_decay

import utils
from model import MAE_ViT

# flags that define a run: --resume takes them from the checkpoint and refuses a conflicting value
RUN_KEYS = ["seed", "batch_size", "base_learning_rate", "weight_decay", "mask_ratio", "total_epoch", "warmup_epoch",
            "image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "decoder_layer", "decoder_head",
            "decoder_emb_dim", "pos_embed", "norm_pix_loss", "crop_scale", "interpolation", "flip", "model_path",
            "log_dir"]
# what the run watches: --resume takes these from the checkpoint too, unless given again
MONITOR_KEYS = ["knn_every", "knn_k", "knn_t", "image_every"]
# what a saved model is: --eval_only takes these from the checkpoint
MODEL_KEYS = ["image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "decoder_layer", "decoder_head",
              "decoder_emb_dim", "pos_embed", "norm_pix_loss"]


def get_args_parser():
    parser = utils.ArgumentParser("MAE pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=42, help="seeds every RNG (process k of a run takes seed + k)")
    parser.add_argument("-bs", "--batch_size", type=int, default=4096, help="images per optimizer step (global)")
    parser.add_argument("--max_device_batch_size", type=int, default=1024,
                        help="micro-batch per forward/backward; gradients are averaged over micro-batches, so this "
                             "changes memory use, not the objective. Not given: at most this on a GPU, 64 on the "
                             "CPU, the largest that divides the batch per process")
    parser.add_argument("--base_learning_rate", type=float, default=1.5e-4, help="lr = base * batch_size / 256")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (weight matrices only)")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches hidden from the encoder")
    parser.add_argument("--total_epoch", type=int, default=2000, help="epochs; the cosine schedule ends with the last")
    parser.add_argument("--warmup_epoch", type=int, default=200, help="epochs of linear lr warmup")
    parser.add_argument("--model_path", type=utils.path_arg, default="vit-t-mae.pth",
                        help="checkpoint written after every epoch")
    parser.add_argument("--data_dir", type=utils.path_arg, default="data",
                        help=utils.DATA_DIR_HELP)
    parser.add_argument("--log_dir", type=utils.path_arg, default=None,
                        help="TensorBoard events and metrics.jsonl; none: logs/<dataset>/<--model_path's name>, "
                             "logs/cifar10/vit-t-mae by default")
    model = utils.add_encoder_args(parser.add_argument_group("model"))
    model.add_argument("--decoder_layer", type=int, default=4, help="decoder blocks")
    model.add_argument("--decoder_head", type=int, default=3, help="decoder attention heads")
    model.add_argument("--decoder_emb_dim", type=int, default=None, help="decoder width (default: emb_dim)")
    model.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalised pixels")
    utils.add_augmentation_args(parser.add_argument_group("augmentation (per sample)"), [0.2, 1.0])
    monitor = parser.add_argument_group("monitoring")
    monitor.add_argument("--knn_every", type=int, default=0, help="kNN accuracy every N epochs (0: never)")
    monitor.add_argument("--knn_k", type=int, default=200, help="neighbours that vote")
    monitor.add_argument("--knn_t", type=float, default=0.07, help="temperature of the votes, exp(similarity / T)")
    monitor.add_argument("--image_every", type=int, default=None,
                         help="log the reconstruction image every N epochs and after the last (each is about 70 KB "
                              "of TensorBoard events); not given: every epoch up to 100 epochs, else every "
                              "total_epoch // 100, so about 100 images a run")
    monitor.add_argument("--eval_only", type=utils.path_arg, default=None, metavar="CHECKPOINT",
                         help="print a saved MAE's kNN accuracy and test-set reconstruction loss (at --mask_ratio if "
                              "given, else the checkpoint's) and exit")
    monitor.add_argument("--export_timm", type=utils.path_arg, default=None, metavar="PATH",
                         help="with --eval_only: also write the encoder as a state_dict for timm's VisionTransformer "
                              "(num_classes=0: a backbone to fine-tune with timm)")
    return utils.add_runtime_args(parser)


def validate(args):
    utils.check_positive(args, "batch_size", "max_device_batch_size", "base_learning_rate", "total_epoch",
                         "image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "decoder_layer",
                         "decoder_head", "decoder_emb_dim", "log_interval", "knn_k", "knn_t", "image_every",
                         "save_every", "stop_after_epoch", "stop_after_minutes")
    if args.weight_decay < 0 or args.warmup_epoch < 0 or args.knn_every < 0 or args.num_workers < 0:
        raise utils.UserError("--weight_decay, --warmup_epoch, --knn_every and --num_workers must not be negative")
    if not 0.0 < args.mask_ratio < 1.0:  # the loss is taken over masked patches only
        raise utils.UserError(f"--mask_ratio must lie in (0, 1), got {args.mask_ratio}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise utils.UserError(f"--crop_scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    utils.check_schedule(args)


def build_model(config):
    try:
        return MAE_ViT(**config)
    except ValueError as e:
        raise utils.UserError(str(e)) from None


def model_config(args):
    return dict(image_size=args.image_size, patch_size=args.patch_size, emb_dim=args.emb_dim,
                encoder_layer=args.encoder_layer, encoder_head=args.encoder_head, decoder_layer=args.decoder_layer,
                decoder_head=args.decoder_head, mask_ratio=args.mask_ratio, in_chans=3,
                decoder_emb_dim=args.decoder_emb_dim or args.emb_dim, pos_embed=args.pos_embed,
                norm_pix_loss=args.norm_pix_loss)


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
    return utils.unwrap(model).loss(images, predicted, mask), images.new_zeros(0)


@contextlib.contextmanager
def fixed_masks(rt):
    """Masks drawn from seed 0 in a forked RNG: the same at every call, the training RNG streams untouched."""
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


@torch.no_grad()
def reconstruction_grid(model, images, rt):
    """First test images: masked input | reconstruction with visible patches | original, in [0, 1].

    Every epoch shows the same masks (fixed_masks).
    """
    was_training = model.training
    model.eval()
    with fixed_masks(rt), rt.autocast():
        predicted, mask = model(images)
    model.train(was_training)
    reconstruction = model.reconstruct(images, predicted, mask)
    grid = torch.cat([images * (1 - mask), reconstruction, images], dim=0)
    grid = rearrange(grid, "(v h1 w1) c h w -> c (h1 h) (w1 v w)", w1=2, v=3)
    return utils.denormalize(grid)


@torch.no_grad()
def reconstruction_loss(model, loader, rt, mask_ratio):
    """Mean masked-patch loss over a split, every image weighted alike; masks from a fixed seed in a forked RNG."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss * images, images
    with fixed_masks(rt):
        for images, _ in utils.eval_batches(loader, rt, "test reconstruction loss"):
            with rt.autocast():
                predicted, mask = model(images, mask_ratio)
            sums[0] += model.loss(images, predicted, mask).double() * len(images)
            sums[1] += len(images)
    model.train(was_training)
    total, count = utils.all_reduce_sum(sums, rt).tolist()
    return total / count


def timm_export(model):
    """(state_dict, create_model kwargs) of the encoder as timm's VisionTransformer without a head."""
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    return state, utils.timm_vit_kwargs(model.config, 0, "token")


def plain_loaders(args, rt, data):
    """The training and test sets without augmentation, for the kNN monitor and evaluation."""
    return [utils.make_loader(args, rt, x, y, 1024, train=False)
            for x, y in ((data.train_images, data.train_labels), (data.test_images, data.test_labels))]


def knn_accuracy(args, encoder, loaders, data, rt):
    return utils.knn_monitor(encoder, *loaders, len(data.classes), rt, k=args.knn_k, temperature=args.knn_t)


def eval_only(args):
    utils.check_export_path(args)
    ckpt = utils.load_checkpoint(args.eval_only, "mae_pretrain", "--eval_only")
    config = ckpt["model_config"]
    utils.resolve_resume_args(args, get_args_parser(), config, MODEL_KEYS, what=f"--eval_only {args.eval_only}",
                              soft_keys=["mask_ratio"],
                              hint=utils.SIZES_FROM_CHECKPOINT)
    validate(args)
    data_note = utils.data_dir_from(args, ckpt, args.eval_only)
    rt = utils.setup_runtime(args)
    if rt.is_main and data_note:
        print(data_note, file=sys.stderr)
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    model.to(rt.device)
    data = utils.load_data(args.data_dir, config["image_size"], rt)
    loaders = plain_loaders(args, rt, data)
    result = {"epoch": ckpt["epoch"], "mask_ratio": args.mask_ratio,
              "test_loss": reconstruction_loss(model, loaders[1], rt, args.mask_ratio),
              "knn_acc": knn_accuracy(args, model.encoder, loaders, data, rt)}
    if rt.is_main:
        print(f"{args.eval_only} (epoch {ckpt['epoch']}): kNN accuracy {result['knn_acc']:.2%} (k {args.knn_k}, "
              f"T {args.knn_t}, cls feature, training set as memory), test reconstruction loss "
              f"{result['test_loss']:.4f} at mask ratio {args.mask_ratio}")
        if args.export_timm:
            utils.write_timm_state(*timm_export(model), args.export_timm)
    return result


def save_checkpoint(args, rt, model, trainer, loader, *, epoch, step, epoch_state=None, data=None):
    state = utils.training_state(trainer, loader, rt, args, epoch_state, data=data)  # every rank takes part
    if rt.is_main:
        utils.save_atomic({"format": utils.CHECKPOINT_FORMAT, "kind": "mae_pretrain", "model": model.state_dict(),
                           "model_config": model.config, "epoch": epoch, "step": step, **state}, args.model_path)


@utils.cli_main
def main(args):
    if args.eval_only:
        return eval_only(args)
    if args.export_timm:
        raise utils.UserError("--export_timm writes a saved MAE's encoder: give the checkpoint with --eval_only")
    parser = get_args_parser()
    ckpt = None
    restarting = utils.auto_resume(args, args.model_path)
    if args.resume:
        ckpt = utils.load_checkpoint(args.resume, "mae_pretrain", "--resume")
        utils.resolve_resume_args(args, parser, ckpt["args"], RUN_KEYS,
                                  soft_keys=utils.SOFT_RESUME_KEYS + MONITOR_KEYS)
        utils.check_run_folder(args, ckpt, ckpt["args"]["model_path"])
    validate(args)
    args.log_dir = args.log_dir or utils.default_log_dir(args.data_dir, args.model_path)
    config = model_config(args)
    rt = utils.setup_runtime(args)  # seeds every RNG, so the model's initial weights repeat
    model = build_model(config)  # a bad configuration fails here, before the data is read
    if rt.is_main:
        utils.claim_outputs(args, args.model_path, "--model_path", restarting)
    local_batch, micro_batch = utils.split_batch(args, rt)
    data = utils.load_data(args.data_dir, args.image_size, rt)
    data_record = utils.data_info(args.data_dir, data) if rt.is_main else None
    if len(data.train_images) < args.batch_size:
        raise utils.UserError(f"--batch_size {args.batch_size} is larger than the training set "
                              f"({len(data.train_images)} images)")
    train_loader = utils.make_loader(args, rt, data.train_images, data.train_labels, args.batch_size, train=True,
                                     crop_scale=None if args.crop_scale == [1.0, 1.0] else args.crop_scale,
                                     flip=args.flip)
    model.to(rt.device)
    peak_lr = args.base_learning_rate * args.batch_size / 256
    optimizer = utils.make_optimizer(make_param_groups(model, args.weight_decay), peak_lr, rt, betas=(0.9, 0.95))
    steps_per_epoch = len(train_loader)
    lr_fn = lambda step: utils.lr_at(step, peak_lr, args.warmup_epoch * steps_per_epoch,
                                     args.total_epoch * steps_per_epoch)
    trainer = utils.Trainer(utils.wrap_model(model, rt), mae_loss, optimizer, lr_fn, rt, micro_batch=micro_batch,
                            skip_nonfinite=args.skip_nonfinite)
    start_epoch, epoch_state = 0, None
    if ckpt is not None:
        start_epoch, epoch_state = utils.restore_training_state(ckpt, model, trainer, train_loader, rt)
        if rt.is_main:
            utils.note_resumed_data(ckpt, data_record, args.resume)
            print(f"resumed {args.resume} after epoch {start_epoch}"
                  + (f" (+{epoch_state.step} steps)" if epoch_state else ""))
    script = utils.script_command(__file__)  # as the start-up note and the resume command name it
    log = utils.MetricsLog(args.log_dir, rt, args, completed_epochs=start_epoch, resumed=ckpt is not None,
                           data=data_record)
    val_images = utils.normalize(data.test_images[:16]).to(rt.device)
    knn_loaders = plain_loaders(args, rt, data) if args.knn_every else None
    if rt.is_main:
        print(f"pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {rt.device} "
              f"({rt.world_size} process(es)), {steps_per_epoch} steps/epoch, micro-batch {micro_batch}, "
              f"peak lr {peak_lr:.2e}, {rt.describe()}, loader {args.loader}")
        if start_epoch >= args.total_epoch:
            print(f"{args.resume} has finished all {args.total_epoch} epochs: nothing to train")
        utils.note_devices(args, rt, script)

    resume = utils.resume_command(script, args.model_path, rt, args.device)
    clock = utils.EpochClock(rt.started)
    with utils.StopRequest(announce=rt.is_main) as stop:
        for epoch in range(start_epoch, args.total_epoch):
            metrics, epoch_state = trainer.train_epoch(model, train_loader, epoch_state, epoch=epoch,
                                                       total_epoch=args.total_epoch, log_interval=args.log_interval,
                                                       stop=stop)
            if metrics is None:  # SIGINT / SIGTERM / SIGHUP: save where we are, exit 128 + signal
                save_checkpoint(args, rt, model, trainer, train_loader, epoch=epoch,
                                step=epoch * steps_per_epoch + epoch_state.step, epoch_state=epoch_state,
                                data=data_record)
                utils.exit_after_signal(args.model_path, resume, stop.signum, rt, log)
            epoch_state = None
            record = {"epoch": epoch + 1, "loss": metrics["loss"], "lr": metrics["lr"],
                      "images_per_s": metrics["images_per_s"], "seconds": metrics["seconds"]}
            if trainer.compile_seconds is not None and epoch == start_epoch:
                record["compile_seconds"] = trainer.compile_seconds
            if args.knn_every and (epoch + 1) % args.knn_every == 0:
                record["knn_acc"] = knn_accuracy(args, model.encoder, knn_loaders, data, rt)
            log.scalars({"mae_loss": record["loss"], "lr": record["lr"], "images_per_s": record["images_per_s"],
                         **({"knn_acc": record["knn_acc"]} if "knn_acc" in record else {})}, epoch + 1)
            if rt.is_main and image_due(args, epoch + 1):
                log.image("mae_image", reconstruction_grid(model, val_images, rt), epoch + 1)
            log.line(record)
            stopping = utils.stop_reason(args, epoch + 1, clock, rt)
            if utils.checkpoint_due(args, epoch + 1) or stopping:
                save_checkpoint(args, rt, model, trainer, train_loader, epoch=epoch + 1,
                                step=(epoch + 1) * steps_per_epoch, data=data_record)
            clock.lap()
            if rt.is_main:
                print(f"epoch {epoch + 1}/{args.total_epoch}: loss {record['loss']:.4f}, "
                      f"{utils.format_rate(record['images_per_s'])}"
                      + (f", kNN {record['knn_acc']:.2%}" if "knn_acc" in record else "")
                      + (f", compile {record['compile_seconds']:.1f}s" if "compile_seconds" in record else "")
                      + clock.left(args.total_epoch - epoch - 1))
            if stopping:
                if rt.is_main:
                    print(f"stopping after epoch {epoch + 1} {stopping}; resume with: {resume}")
                break
    log.close()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
