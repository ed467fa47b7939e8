"""Train a ViT classifier on CIFAR-10: from scratch, fine-tuned from an MAE checkpoint, or as a linear probe.

    python train_classifier.py                                            # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pth      # fine-tune the MAE encoder
    python train_classifier.py --eval_only vit-t-classifier.pth           # top-1, top-5, per-class table
"""
import argparse
import math
import os
import shlex
import sys

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3

import utils
from model import MAE_Encoder, ViT_Classifier, check_config

SIZE_KEYS = ["image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head"]
RUN_KEYS = ["seed", "batch_size", "base_learning_rate", "weight_decay", "total_epoch", "warmup_epoch",
            "pretrained_model_path", "pos_embed", "crop_scale", "interpolation", "flip", "randaug", "reprob", "mixup",
            "cutmix", "label_smoothing", "drop_path", "layer_decay", "clip_grad", "ema", "ema_decay", "global_pool",
            "linear_probe", "val_size", "output_model_path", "log_dir"] + SIZE_KEYS
NO_WEIGHT_DECAY = {"cls_token", "pos_embed"}


def get_args_parser():
    parser = utils.ArgumentParser("ViT classifier", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=2022, help="seeds every RNG (process k of a run takes seed + k)")
    parser.add_argument("-bs", "--batch_size", type=int, default=128, help="images per optimizer step (global)")
    parser.add_argument("--max_device_batch_size", type=int, default=256,
                        help="micro-batch per forward/backward (not given: at most this on a GPU, 64 on the CPU, the "
                             "largest that divides the batch per process)")
    parser.add_argument("--base_learning_rate", type=float, default=1e-3, help="lr = base * batch_size / 256")
    parser.add_argument("--weight_decay", type=float, default=0.05,
                        help="AdamW weight decay (none on biases, norms, cls token, position embeddings)")
    parser.add_argument("--total_epoch", type=int, default=100, help="epochs; the cosine schedule ends with the last")
    parser.add_argument("--warmup_epoch", type=int, default=5, help="epochs of linear lr warmup")
    parser.add_argument("--pretrained_model_path", type=utils.path_arg, default=None,
                        help="MAE checkpoint whose encoder to fine-tune; none: train from scratch")
    parser.add_argument("--output_model_path", type=utils.path_arg, default=None,
                        help="best-accuracy weights; the full training state goes to NAME-last.pth beside it; "
                             "none: vit-t-classifier-from_pretrained.pth or vit-t-classifier-from_scratch.pth")
    parser.add_argument("--data_dir", type=utils.path_arg, default="data",
                        help=utils.DATA_DIR_HELP)
    parser.add_argument("--log_dir", type=utils.path_arg, default=None,
                        help="TensorBoard events and metrics.jsonl; none: logs/<dataset>/<--output_model_path's "
                             "name>, such as logs/cifar10/vit-t-classifier-from_scratch")
    parser.add_argument("--val_size", type=int, default=0,
                        help="hold out this many training images (a fixed random subset) and pick the best epoch on "
                             "them instead of on the test set, which is then only used for the final report")
    model = utils.add_encoder_args(
        parser.add_argument_group("model (from scratch; a pretrained checkpoint brings its own sizes)"))
    model.add_argument("--global_pool", action="store_true", help="mean of patch tokens + norm instead of cls")
    model.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the last block")
    model.add_argument("--linear_probe", action="store_true",
                       help="freeze the encoder (eval mode, no gradient); train BatchNorm + linear head")
    recipe = utils.add_augmentation_args(parser.add_argument_group("recipe"), [0.35, 1.0])
    recipe.add_argument("--randaug", default=None,
                        help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (per sample on the device, "
                             "or timm's own on PIL images with --loader torch)")
    recipe.add_argument("--reprob", type=float, default=0.0,
                        help="random erasing probability (timm's RandomErasing, mode pixel; per sample on the device)")
    recipe.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    recipe.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    recipe.add_argument("--label_smoothing", type=float, default=0.0, help="of the (mixed) targets")
    recipe.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    recipe.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this")
    recipe.add_argument("--ema", action="store_true", help="keep an EMA of the weights; evaluate and save it")
    recipe.add_argument("--ema_decay", type=float, default=0.9999, help="per optimizer step")
    actions = parser.add_argument_group("other jobs")
    actions.add_argument("--eval_only", type=utils.path_arg, default=None, metavar="CHECKPOINT",
                         help="evaluate a saved classifier on the test set and exit")
    actions.add_argument("--export_timm", type=utils.path_arg, default=None, metavar="PATH",
                         help="also write the classifier as a state_dict for timm's VisionTransformer")
    return utils.add_runtime_args(parser)


def validate(args):
    utils.check_positive(args, "batch_size", "max_device_batch_size", "base_learning_rate", "total_epoch",
                         "image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "log_interval",
                         "clip_grad", "save_every", "stop_after_epoch", "stop_after_minutes")
    for name in ("weight_decay", "warmup_epoch", "mixup", "cutmix", "num_workers", "val_size"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("label_smoothing", "drop_path"):
        if not 0 <= getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if not 0 <= args.reprob <= 1:
        raise utils.UserError(f"--reprob must lie in [0, 1], got {args.reprob}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise utils.UserError(f"--layer_decay must lie in (0, 1], got {args.layer_decay}")
    if not 0 < args.ema_decay < 1:
        raise utils.UserError(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise utils.UserError(f"--crop_scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    utils.check_schedule(args)
    if args.linear_probe and args.drop_path:
        raise utils.UserError("--linear_probe keeps the encoder frozen; --drop_path would have nothing to act on")
    if args.randaug and args.loader == "device":  # a bad policy fails here, before the data is loaded
        utils.DeviceRandAugment(args.randaug)
    elif args.randaug:
        utils.randaug_policy(args.randaug)


def build_classifier(config, drop_path=0.0):
    """A ViT_Classifier from a plain config dict (as saved in checkpoints)."""
    try:
        encoder = MAE_Encoder(config["image_size"], config["patch_size"], config["emb_dim"], config["encoder_layer"],
                              config["encoder_head"], mask_ratio=0.0, in_chans=config["in_chans"],
                              pos_embed=config["pos_embed"], drop_path=drop_path)
    except ValueError as e:
        raise utils.UserError(str(e)) from None
    return ViT_Classifier(encoder, config["num_classes"], global_pool=config["global_pool"],
                          linear_probe=config["linear_probe"])


def pretrained_sizes(args, parser, ckpt):
    """Take the model sizes from an MAE checkpoint; an explicit size flag that differs is an error."""
    mae = ckpt["model_config"]
    utils.resolve_resume_args(args, parser, {key: mae[key] for key in SIZE_KEYS + ["pos_embed"]},
                              SIZE_KEYS + ["pos_embed"], what=f"--pretrained_model_path {args.pretrained_model_path}")


def pretraining_note(path, ckpt):
    """Which pretraining the encoder comes from; a run stopped before its schedule ended is pointed out."""
    if "converted_from" in ckpt:
        return f"encoder from {path}: converted from {ckpt['converted_from']}, whose epochs are not recorded"
    done, total = ckpt["epoch"], ckpt.get("args", {}).get("total_epoch")
    note = f"encoder from {path}: MAE pretraining after epoch {done}" + (f" of {total}" if total else "")
    if total and done < total:
        mae_script = utils.script_command(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mae_pretrain.py"))
        note += f" (an unfinished run: its learning rate had not yet decayed; resume it with {mae_script} " \
                f"--resume {shlex.quote(path)})"
    return note


def load_pretrained(args, ckpt, num_classes):
    """Classifier whose encoder holds an MAE checkpoint's weights; asserts exactly the head is new."""
    config = classifier_config(args, num_classes, in_chans=ckpt["model_config"]["in_chans"])
    model = build_classifier(config, args.drop_path)
    encoder_state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    # BatchNorm fills a missing num_batches_tracked itself, so it is not reported
    head = {k for k in model.state_dict() if (k.startswith("head.") or k.startswith("fc_norm."))
            and not k.endswith("num_batches_tracked")}
    expected_unexpected = {"norm.weight", "norm.bias"} if args.global_pool else set()
    if set(missing) != head or set(unexpected) != expected_unexpected:
        raise utils.UserError(f"--pretrained_model_path {args.pretrained_model_path}: encoder weights do not fit "
                              f"(missing {sorted(set(missing) - head)}, unexpected "
                              f"{sorted(set(unexpected) - expected_unexpected)})")
    return model, config


def classifier_config(args, num_classes, in_chans=3):
    return dict(image_size=args.image_size, patch_size=args.patch_size, emb_dim=args.emb_dim,
                encoder_layer=args.encoder_layer, encoder_head=args.encoder_head, in_chans=in_chans,
                pos_embed=args.pos_embed, num_classes=num_classes, global_pool=args.global_pool,
                linear_probe=args.linear_probe)


class ClassificationLoss:
    """Cross-entropy (soft targets under mixup/cutmix) -> (loss, [correct top-1 against the true labels])."""

    def __init__(self, args, num_classes):
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                               num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def __call__(self, model, images, labels):
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = self.criterion(logits.float(), targets)
        return loss, (logits.argmax(dim=-1) == labels).sum().reshape(1)


@torch.no_grad()
def evaluate(model, loader, rt, num_classes):
    """Test-set loss, top-1, top-5 and confusion matrix, summed per image over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, images, top-1, top-5
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    for images, labels in utils.eval_batches(loader, rt, "evaluating"):
        with rt.autocast():
            logits = model(images).float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += len(labels)
        sums[2] += (top[:, 0] == labels).sum().double()
        sums[3] += (top == labels[:, None]).any(1).sum().double()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2).double()
    model.train(was_training)
    loss, count, top1, top5 = utils.all_reduce_sum(sums, rt).tolist()
    confusion = utils.all_reduce_sum(confusion, rt).view(num_classes, num_classes).cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {"loss": loss / count, "acc": top1 / count, "acc5": top5 / count, "per_class": per_class,
            "confusion": confusion}


def per_class_table(result, classes):
    width = max([12] + [len(name) for name in classes]) + 2  # an ImageFolder's class names may be long
    lines = [f"top-1 {result['acc']:.2%}  top-5 {result['acc5']:.2%}  (loss {result['loss']:.4f})",
             f"{'class':<{width}}accuracy"]
    lines += [f"{name:<{width}}{acc:.2%}" for name, acc in zip(classes, result["per_class"])]
    return "\n".join(lines)


def confusion_image(confusion, cell=16):
    """Row-normalised confusion matrix as a (1, K*cell, K*cell) grey image, true class per row."""
    rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    return rows.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None].float()


def timm_export(model, config):
    """(state_dict, create_model kwargs) for timm's VisionTransformer; a linear-probe BatchNorm is folded."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config["linear_probe"]:  # head = BN(no affine) then Linear: fold (x - mean) / std into the linear layer
        bn = model.head[0]
        scale = (state.pop("head.0.running_var") + bn.eps).rsqrt()
        mean = state.pop("head.0.running_mean")
        state.pop("head.0.num_batches_tracked")
        weight, bias = state.pop("head.1.weight"), state.pop("head.1.bias")
        state["head.weight"] = weight * scale
        state["head.bias"] = bias - (weight * scale) @ mean
    return state, utils.timm_vit_kwargs(config, config["num_classes"], "avg" if config["global_pool"] else "token")


def write_timm_export(model, config, path):
    utils.write_timm_state(*timm_export(model, config), path)


def selection_split(data, val_size):
    """(train images, train labels, images and labels the best epoch is picked on): the test set, as the original
    repository did, or with --val_size that many training images held out (the same ones for every --seed)."""
    if not val_size:
        return data.train_images, data.train_labels, data.test_images, data.test_labels
    if val_size >= len(data.train_images):
        raise utils.UserError(f"--val_size {val_size} leaves no images to train on (the training set has "
                              f"{len(data.train_images)})")
    kept, held = utils.holdout_split(len(data.train_images), val_size)
    return data.train_images[kept], data.train_labels[kept], data.train_images[held], data.train_labels[held]


def default_output_path(args):
    """Where a run writes its weights when not told: a name that says whether the encoder started pretrained."""
    args.output_model_path = args.output_model_path or \
        f"vit-t-classifier-from_{'pretrained' if args.pretrained_model_path else 'scratch'}.pth"


def check_classes(ckpt, data, what):
    """Labels are indexes into the class list, so a saved classifier only fits data with its classes, in order."""
    saved = ckpt.get("classes")
    if saved is not None and [utils.readable_name(c) for c in saved] != list(data.classes):  # older: raw names
        raise utils.UserError(f"{what} was trained on the classes {list(saved)}, but --data_dir has "
                              f"{list(data.classes)}")


def eval_only(args):
    utils.check_export_path(args)
    ckpt = utils.load_checkpoint(args.eval_only, "classifier", "--eval_only")
    config = ckpt["model_config"]
    utils.resolve_resume_args(args, get_args_parser(), {key: config[key] for key in SIZE_KEYS}, SIZE_KEYS,
                              what=f"--eval_only {args.eval_only}",  # a size flag that differs is an error
                              hint=utils.SIZES_FROM_CHECKPOINT)
    data_note = utils.data_dir_from(args, ckpt, args.eval_only)
    rt = utils.setup_runtime(args)
    if rt.is_main and data_note:
        print(data_note, file=sys.stderr)
    model = build_classifier(config)
    weights = ckpt["model"]
    if "optimizer" in ckpt:  # a NAME-last.pth training state: the weights its run evaluates (EMA when on)
        ema = ckpt.get("ema") is not None
        weights = ckpt["ema"] if ema else weights
        if rt.is_main:
            print(f"note: {args.eval_only} is a training state; evaluating its {'EMA' if ema else 'live'} weights "
                  f"after epoch {ckpt['epoch']} (the best epoch's are in the file without -last)")
    model.load_state_dict(weights)
    model.to(rt.device)
    data = utils.load_data(args.data_dir, config["image_size"], rt)
    check_classes(ckpt, data, f"--eval_only {args.eval_only}")
    loader = utils.make_loader(args, rt, data.test_images, data.test_labels, 1024, train=False)
    result = evaluate(model, loader, rt, config["num_classes"])
    if rt.is_main:
        print(per_class_table(result, data.classes))
        if args.export_timm:
            write_timm_export(model, config, args.export_timm)
    return result


def ema_note(decay, steps):
    """A note when an EMA over `steps` optimizer steps would still hold over 10 % of the initial weights at the
    end (a decay meant for a longer run), else None."""
    left = decay ** steps
    if left <= 0.1:
        return None
    suggest = math.floor(0.01 ** (1 / steps) * 1e4) / 1e4
    return (f"note: --ema_decay {decay} over {steps} optimizer steps leaves {left:.0%} of the initial weights in the "
            f"EMA that is evaluated and saved; --ema_decay {suggest} or less leaves at most 1 %")


def make_param_groups(model, args):
    if args.layer_decay is not None and args.layer_decay < 1:
        return param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY,
                                        layer_decay=args.layer_decay)
    return param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)


def checkpoint(model_state, config, classes, epoch, **extra):
    return {"format": utils.CHECKPOINT_FORMAT, "kind": "classifier", "model": model_state, "model_config": config,
            "classes": list(classes), "epoch": epoch, **extra}


@utils.cli_main
def main(args):
    if args.eval_only:
        return eval_only(args)
    parser = get_args_parser()
    ckpt, restarting = None, False
    if args.resume == "auto":
        default_output_path(args)
        restarting = utils.auto_resume(args, utils.last_checkpoint_path(args.output_model_path))
    if args.resume:
        ckpt = utils.load_checkpoint(args.resume, "classifier", "--resume")
        if "optimizer" not in ckpt:
            raise utils.UserError(f"--resume {args.resume} holds only weights; resume from the training state "
                                  f"written beside it ({utils.last_checkpoint_path(args.resume)})")
        utils.resolve_resume_args(args, parser, ckpt["args"], RUN_KEYS,
                                  soft_keys=utils.SOFT_RESUME_KEYS + ["export_timm"])
        utils.check_run_folder(args, ckpt, utils.last_checkpoint_path(ckpt["args"]["output_model_path"]))
    validate(args)
    pretrained, data_note = None, None
    if args.pretrained_model_path and ckpt is None:  # before the data: a wrong path fails in a second
        pretrained = utils.load_checkpoint(args.pretrained_model_path, "mae_pretrain", "--pretrained_model_path")
        pretrained_sizes(args, parser, pretrained)
        data_note = utils.data_dir_from(args, pretrained, args.pretrained_model_path)
    default_output_path(args)
    args.log_dir = args.log_dir or utils.default_log_dir(args.data_dir, args.output_model_path)
    last_path = utils.last_checkpoint_path(args.output_model_path)
    rt = utils.setup_runtime(args)
    if rt.is_main:
        if data_note:
            print(data_note, file=sys.stderr)
        utils.claim_outputs(args, args.output_model_path, "--output_model_path", restarting, beside=[last_path])
        utils.check_export_path(args, run_outputs=(args.output_model_path, last_path),
                                resumed_export=ckpt["args"].get("export_timm") if ckpt is not None else None)
    local_batch, micro_batch = utils.split_batch(args, rt, even=bool(args.mixup or args.cutmix))
    if (args.mixup or args.cutmix) and micro_batch % 2:
        raise utils.UserError(f"mixup/cutmix need an even micro-batch, got {micro_batch}")
    try:  # a bad configuration fails here, before the data is read
        check_config(args.image_size, args.patch_size, {"encoder": args.emb_dim}, {"encoder": args.encoder_head})
    except ValueError as e:
        raise utils.UserError(str(e)) from None
    data = utils.load_data(args.data_dir, args.image_size, rt)
    data_record = utils.data_info(args.data_dir, data) if rt.is_main else None
    if ckpt is not None:
        check_classes(ckpt, data, f"--resume {args.resume}")
    num_classes = len(data.classes)
    train_images, train_labels, val_images, val_labels = selection_split(data, args.val_size)
    if len(train_images) < args.batch_size:
        held = f" after --val_size {args.val_size}" if args.val_size else ""
        raise utils.UserError(f"--batch_size {args.batch_size} is larger than the training set "
                              f"({len(train_images)} images{held})")
    selected_on = f"{args.val_size} held-out training images" if args.val_size else "the test set"
    if ckpt is not None:
        config = ckpt["model_config"]
        model = build_classifier(config, args.drop_path)
    elif pretrained is not None:
        model, config = load_pretrained(args, pretrained, num_classes)
    else:
        config = classifier_config(args, num_classes)
        model = build_classifier(config, args.drop_path)
    model.to(rt.device)
    train_loader = utils.make_loader(args, rt, train_images, train_labels, args.batch_size, train=True,
                                     crop_scale=None if args.crop_scale == [1.0, 1.0] else args.crop_scale,
                                     flip=args.flip, randaug=args.randaug, reprob=args.reprob)
    test_loader = utils.make_loader(args, rt, data.test_images, data.test_labels, 1024, train=False)
    val_loader = utils.make_loader(args, rt, val_images, val_labels, 1024, train=False) if args.val_size \
        else test_loader  # what the best epoch is picked on
    peak_lr = args.base_learning_rate * args.batch_size / 256
    optimizer = utils.make_optimizer(make_param_groups(model, args), peak_lr, rt)
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    steps_per_epoch = len(train_loader)
    lr_fn = lambda step: utils.lr_at(step, peak_lr, args.warmup_epoch * steps_per_epoch,
                                     args.total_epoch * steps_per_epoch)
    trainer = utils.Trainer(utils.wrap_model(model, rt), ClassificationLoss(args, num_classes), optimizer, lr_fn, rt,
                            micro_batch=micro_batch, clip_grad=args.clip_grad, ema=ema,
                            skip_nonfinite=args.skip_nonfinite, num_extra=1)
    start_epoch, epoch_state, best_acc, best_epoch, best_state, last_acc = 0, None, 0.0, None, None, None
    if ckpt is not None:
        start_epoch, epoch_state = utils.restore_training_state(ckpt, model, trainer, train_loader, rt, ema)
        best_acc, best_state, best_epoch = ckpt["best_acc"], ckpt.get("best_model"), ckpt.get("best_epoch")
        if best_state is None and os.path.isfile(args.output_model_path):  # a checkpoint from before best_model
            best = utils.load_checkpoint(args.output_model_path, "classifier")
            best_state, best_epoch = best["model"], best["epoch"]
        if rt.is_main:
            utils.note_resumed_data(ckpt, data_record, args.resume)
            print(f"resumed {args.resume} after epoch {start_epoch}"
                  + (f" (+{epoch_state.step} steps)" if epoch_state else "") + f", best accuracy so far {best_acc:.2%}")
    eval_model = ema.module if ema is not None else model
    script = utils.script_command(__file__)  # as the start-up note and the resume command name it
    log = utils.MetricsLog(args.log_dir, rt, args, completed_epochs=start_epoch, resumed=ckpt is not None,
                           data=data_record)
    if rt.is_main:
        mode = "fine-tuning" if args.pretrained_model_path else "scratch"
        if args.linear_probe:  # a probe of random features is a baseline, or a forgotten --pretrained_model_path
            mode = "linear probe" + ("" if args.pretrained_model_path else
                                     " of a randomly initialised encoder: no --pretrained_model_path")
        print(f"training a classifier ({mode}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"on {rt.device} ({rt.world_size} process(es)), {steps_per_epoch} steps/epoch, micro-batch "
              f"{micro_batch}, peak lr {peak_lr:.2e}, {rt.describe()}; the best epoch is picked on {selected_on}")
        if pretrained is not None:
            print(pretraining_note(args.pretrained_model_path, pretrained))
        utils.note_devices(args, rt, script)
        note = ema_note(args.ema_decay, args.total_epoch * steps_per_epoch) if ema is not None else None
        if note:
            print(note)
        if start_epoch >= args.total_epoch:
            print(f"{args.resume} has finished all {args.total_epoch} epochs: nothing to train; its report again:")

    def save_best():
        utils.save_atomic(checkpoint(best_state, config, data.classes, best_epoch, acc=best_acc,
                                     selected_on=selected_on, args=utils.plain_args(args), cwd=os.getcwd()),
                          args.output_model_path)

    def save_last(epoch, epoch_state=None):
        # every rank takes part
        state = utils.training_state(trainer, train_loader, rt, args, epoch_state, ema, data_record)
        if rt.is_main:  # the best weights too: a resume needs no other file, on any machine
            utils.save_atomic(checkpoint(model.state_dict(), config, data.classes, epoch, best_acc=best_acc,
                                         best_model=best_state, best_epoch=best_epoch, **state), last_path)

    resume = utils.resume_command(script, last_path, rt, args.device)
    clock = utils.EpochClock(rt.started)
    with utils.StopRequest(announce=rt.is_main) as stop:
        for epoch in range(start_epoch, args.total_epoch):
            train, epoch_state = trainer.train_epoch(model, train_loader, epoch_state, epoch=epoch,
                                                     total_epoch=args.total_epoch, log_interval=args.log_interval,
                                                     stop=stop)
            if train is None:  # SIGINT / SIGTERM / SIGHUP: save where we are, exit 128 + signal
                save_last(epoch, epoch_state)
                utils.exit_after_signal(last_path, resume, stop.signum, rt, log)
            epoch_state = None
            val = evaluate(eval_model, val_loader, rt, num_classes)
            last_acc = val["acc"]
            train_acc = train["extra_sums"][0] / max(train["images"], 1)
            record = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train_acc,
                      "val_loss": val["loss"], "val_acc": val["acc"], "val_acc5": val["acc5"], "lr": train["lr"],
                      "images_per_s": train["images_per_s"], "seconds": train["seconds"]}
            if trainer.compile_seconds is not None and epoch == start_epoch:
                record["compile_seconds"] = trainer.compile_seconds
            log.scalars({"cls/loss/train": train["loss"], "cls/loss/val": val["loss"], "cls/acc/train": train_acc,
                         "cls/acc/val": val["acc"], "cls/acc5/val": val["acc5"], "lr": train["lr"],
                         "images_per_s": train["images_per_s"]}, epoch + 1)
            if val["acc"] > best_acc or best_state is None:
                best_acc, best_epoch = val["acc"], epoch + 1
                best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
                if rt.is_main:
                    save_best()
            record["best_acc"] = best_acc
            log.line(record)
            stopping = utils.stop_reason(args, epoch + 1, clock, rt)
            if utils.checkpoint_due(args, epoch + 1) or stopping:
                save_last(epoch + 1)
            clock.lap()
            if rt.is_main:
                print(f"epoch {epoch + 1}/{args.total_epoch}: train loss {train['loss']:.4f} acc {train_acc:.2%}, "
                      f"val loss {val['loss']:.4f} acc {val['acc']:.2%} (best {best_acc:.2%}), "
                      f"{utils.format_rate(train['images_per_s'])}" + clock.left(args.total_epoch - epoch - 1))
            if stopping:
                if rt.is_main:
                    print(f"stopping after epoch {epoch + 1} {stopping}; resume with: {resume}")
                log.close()
                return {"best_acc": best_acc}

    if rt.is_main and not os.path.isfile(args.output_model_path):  # gone since an earlier start of a resumed run
        save_best()
    # the last epoch's weights on the test set: with --val_size no choice has looked at it; without, it is the
    # last epoch's val_acc, evaluated again when this start trained no epoch (a finished run, resumed again)
    if args.val_size or last_acc is None:
        last_acc = evaluate(eval_model, test_loader, rt, num_classes)["acc"]
    # the final report is of the best weights, as saved (every rank kept a copy: no shared disk needed)
    eval_model.load_state_dict(best_state)
    result = evaluate(eval_model, test_loader, rt, num_classes)
    if rt.is_main:
        # without --val_size the best epoch is chosen on the test set, as the original repository did, so the
        # last epoch's accuracy is printed beside it: it is the unbiased one
        last = f", last epoch {last_acc:.2%}" if last_acc is not None else ""
        if args.val_size:
            print(f"best held-out accuracy {best_acc:.2%} (epoch {best_epoch}); on the test set: those weights "
                  f"{result['acc']:.2%}{last}")
        else:
            print(f"best accuracy {best_acc:.2%} (epoch {best_epoch}){last}")
        print(per_class_table(result, data.classes))
        if not log.reported:  # a finished run resumed again: TensorBoard has this image at this step already
            log.image("cls/confusion", confusion_image(result["confusion"]), args.total_epoch)
        log.line({"final": True, "epoch": args.total_epoch, "acc": result["acc"], "acc5": result["acc5"],
                  "best_epoch": best_epoch, "best_acc": best_acc, "selected_on": selected_on,
                  "last_epoch_acc": last_acc, "per_class": dict(zip(data.classes, result["per_class"]))})
        if args.export_timm:
            write_timm_export(eval_model, config, args.export_timm)
    log.close()
    return {"best_acc": best_acc, "best_epoch": best_epoch, "last_epoch_acc": last_acc, "final": result}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
