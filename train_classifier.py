"""Train a ViT classifier on CIFAR-10: from scratch, fine-tuned from an MAE checkpoint, or as a linear probe.

    python train_classifier.py                                            # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pth      # fine-tune the MAE encoder
    python train_classifier.py --eval_only vit-t-classifier.pth           # top-1, top-5, per-class table
"""
import os
import sys

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3

from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import checkpoint, last_checkpoint_path, load_checkpoint, restore_training_state, \
    resume_checkpoint, training_state
from cifar_mae.classification import ClassificationLoss, confusion_image, confusion_table, ema_note, evaluate, \
    per_class_table, selection_split
from cifar_mae.console import resume_command, script_command
from cifar_mae.datasets import data_info, default_log_dir, load_data
from cifar_mae.engine import Trainer, fit
from cifar_mae.errors import UserError, cli_main
from cifar_mae.flags import ArgumentParser, DATA_DIR_HELP, add_augmentation_args, add_config_arg, add_encoder_args, \
    add_runtime_args, check_positive, check_schedule, path_arg, plain_args, resolve_model, take_saved, timm_name
from cifar_mae.loaders import make_loader
from cifar_mae.metrics import MetricsLog
from cifar_mae.optim import make_optimizer, peak_lr, schedule
from cifar_mae.outputs import auto_resume, check_export_path, claim_outputs, data_dir_from
from cifar_mae.pretrained import load_encoder, pretraining_note, read_pretrained
from cifar_mae.randaug import DeviceRandAugment, randaug_policy
from cifar_mae.timm_export import classifier_export, write_timm_state
from cifar_mae.runtime import note_devices, setup_runtime, split_batch, wrap_model
from model import build_classifier, check_config, output_stem

GPU_MICRO_BATCH = 256  # the micro-batch ceiling on a GPU when --max_device_batch_size is not given
NO_WEIGHT_DECAY = {"cls_token", "pos_embed"}


def get_args_parser():
    parser = ArgumentParser("ViT classifier")
    add_config_arg(parser)
    parser.add_argument("--seed", type=int, default=2022, help="seeds every RNG (process k of a run takes seed + k)")
    parser.add_argument("-bs", "--batch_size", type=int, default=128, help="images per optimizer step (global)")
    parser.add_argument("--max_device_batch_size", type=int, default=None,
                        help="micro-batch per forward/backward (default: the largest divisor of the batch per "
                             f"process up to {GPU_MICRO_BATCH} on a GPU, 64 on the CPU)")
    parser.add_argument("--base_learning_rate", type=float, default=1e-3, help="lr = base * batch_size / 256")
    parser.add_argument("--weight_decay", type=float, default=0.05,
                        help="AdamW weight decay (none on biases, norms, cls token, position embeddings)")
    parser.add_argument("--total_epoch", type=int, default=100, help="epochs; the cosine schedule ends with the last")
    parser.add_argument("--warmup_epoch", type=int, default=5, help="epochs of linear lr warmup")
    parser.add_argument("--pretrained_model_path", type=path_arg, default=None,
                        help="MAE checkpoint whose encoder to fine-tune, or a timm VisionTransformer state_dict "
                             "that fits --model (resampled to its image and patch size); none: train from scratch")
    parser.add_argument("--output_model_path", type=path_arg, default=None,
                        help="best-accuracy weights; the full training state goes to NAME-last.pth beside it "
                             "(default: vit-t-classifier-from_pretrained.pth or vit-t-classifier-from_scratch.pth for "
                             "the default model, else MODEL-classifier-...)")
    parser.add_argument("--data_dir", type=path_arg, default=None,
                        help=DATA_DIR_HELP)
    parser.add_argument("--log_dir", type=path_arg, default=None,
                        help="TensorBoard events and metrics.jsonl (default: logs/<dataset>/<--output_model_path's "
                             "name>)")
    parser.add_argument("--val_size", type=int, default=0,
                        help="hold out this many training images (a fixed random subset) and pick the best epoch on "
                             "them instead of on the test set, which is then only used for the final report")
    model = add_encoder_args(
        parser.add_argument_group("model (from scratch; a pretrained checkpoint brings its own sizes)"))
    model.add_argument("--global_pool", action="store_true", help="mean of patch tokens + norm instead of cls")
    model.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the last block")
    model.add_argument("--linear_probe", action="store_true",
                       help="freeze the encoder (eval mode, no gradient); train BatchNorm + linear head")
    recipe = add_augmentation_args(parser.add_argument_group("recipe"), [0.35, 1.0])
    recipe.add_argument("--randaug", default=None,
                        help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (per sample on the device, "
                             "or timm's own on PIL images with --loader torch)")
    recipe.add_argument("--reprob", type=float, default=0.0,
                        help="random erasing probability (timm's RandomErasing, mode pixel; per sample on the device)")
    recipe.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    recipe.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    recipe.add_argument("--mix_prob", type=float, default=1.0,
                        help="share of batches mixed when --mixup or --cutmix is on (timm Mixup's prob)")
    recipe.add_argument("--mix_switch_prob", type=float, default=0.5,
                        help="with both on: share of the mixed batches that take cutmix rather than mixup")
    recipe.add_argument("--tta", default="none", choices=["none", "flip"],
                        help="flip: also report the top-1 of each image's and its mirror image's mean logits")
    recipe.add_argument("--label_smoothing", type=float, default=0.0, help="of the (mixed) targets")
    recipe.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    recipe.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this")
    recipe.add_argument("--ema", action="store_true", help="keep an EMA of the weights; evaluate and save it")
    recipe.add_argument("--ema_decay", type=float, default=0.9999, help="per optimizer step")
    actions = parser.add_argument_group("other jobs")
    actions.add_argument("--eval_only", type=path_arg, default=None, metavar="CHECKPOINT",
                         help="evaluate a saved classifier on the test set and exit")
    actions.add_argument("--export_timm", type=path_arg, default=None, metavar="PATH",
                         help="also write the classifier as a state_dict for timm's VisionTransformer")
    return add_runtime_args(parser)




def validate(args):
    check_positive(args, "batch_size", "max_device_batch_size", "base_learning_rate", "total_epoch",
                   "image_size", "patch_size", "emb_dim", "encoder_layer", "encoder_head", "log_interval",
                   "clip_grad", "save_every", "stop_after_epoch", "stop_after_minutes")
    for name in ("weight_decay", "warmup_epoch", "mixup", "cutmix", "num_workers", "val_size"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("label_smoothing", "drop_path"):
        if not 0 <= getattr(args, name) < 1:
            raise UserError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    for name in ("reprob", "mix_prob", "mix_switch_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} must lie in [0, 1], got {getattr(args, name)}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UserError(f"--layer_decay must lie in (0, 1], got {args.layer_decay}")
    if not 0 < args.ema_decay < 1:
        raise UserError(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop_scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    check_schedule(args)
    try:  # a bad configuration fails here, before the data is read (a pretrained encoder brings its own)
        if not args.pretrained_model_path:
            check_config(args.image_size, args.patch_size, {"encoder": args.emb_dim},
                         {"encoder": args.encoder_head})
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.linear_probe and args.drop_path:
        raise UserError("--linear_probe keeps the encoder frozen; --drop_path would have nothing to act on")
    if args.randaug and args.loader == "device":  # a bad policy fails here, before the data is loaded
        DeviceRandAugment(args.randaug)
    elif args.randaug:
        randaug_policy(args.randaug)


def new_classifier(config, drop_path=0.0):
    """build_classifier, with a configuration that cannot work as a UserError."""
    try:
        return build_classifier(config, drop_path)
    except ValueError as e:
        raise UserError(str(e)) from None


def classifier_config(args, num_classes):
    return dict(image_size=args.image_size, patch_size=args.patch_size, emb_dim=args.emb_dim,
                encoder_layer=args.encoder_layer, encoder_head=args.encoder_head, in_chans=3,
                pos_embed=args.pos_embed, num_classes=num_classes, global_pool=args.global_pool,
                linear_probe=args.linear_probe, timm_model=timm_name(args))


def default_output_path(args):
    """Where a run writes its weights when not told: a name that says whether the encoder started pretrained."""
    args.output_model_path = args.output_model_path or \
        f"{output_stem(args.model)}-classifier-from_{'pretrained' if args.pretrained_model_path else 'scratch'}.pth"


def check_classes(ckpt, data, what):
    """Labels are indexes into the class list, so a saved classifier only fits data with its classes, in order."""
    if ckpt["classes"] != list(data.classes):
        raise UserError(f"{what} was trained on the classes {ckpt['classes']}, but --data_dir has "
                        f"{list(data.classes)}")


def eval_only(args):
    check_export_path(args)
    ckpt = load_checkpoint(args.eval_only, "classifier", "--eval_only")
    config = ckpt["model_config"]
    take_saved(args, get_args_parser(), config, f"--eval_only {args.eval_only}", fixed=config)
    resolve_model(args)
    data_note = data_dir_from(args, ckpt, args.eval_only)
    rt = setup_runtime(args)
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
    data = load_data(args.data_dir, config["image_size"], rt, labels_for="a classifier")
    check_classes(ckpt, data, f"--eval_only {args.eval_only}")
    loader = make_loader(args, rt, data.test_images, data.test_labels, 1024, train=False)
    result = evaluate(model, loader, rt, config["num_classes"], args.tta)
    if rt.is_main:
        print(per_class_table(result, data.classes))
        if args.export_timm:
            write_timm_state(*classifier_export(model, config), args.export_timm)
    return result


def make_param_groups(model, args):
    if args.layer_decay is not None and args.layer_decay < 1:
        return param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY,
                                        layer_decay=args.layer_decay)
    return param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)


def build_model(args, ckpt, pretrained, data):
    """(classifier, its config): resumed, from a pretrained encoder, or from scratch."""
    num_classes = len(data.classes)
    if ckpt is not None:
        check_classes(ckpt, data, f"--resume {args.resume}")
        return new_classifier(ckpt["model_config"], args.drop_path), ckpt["model_config"]
    config = classifier_config(args, num_classes)
    model = new_classifier(config, args.drop_path)
    if pretrained is not None:
        load_encoder(model, pretrained, f"--pretrained_model_path {args.pretrained_model_path}")
    return model, config


def make_trainer(args, rt, model, num_classes, steps_per_epoch, micro_batch):
    """AdamW (layer-wise decay with --layer_decay), the EMA with --ema, the loss with mixup/cutmix."""
    optimizer = make_optimizer(make_param_groups(model, args), peak_lr(args), rt)
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    return Trainer(wrap_model(model, rt), ClassificationLoss(args, num_classes), optimizer,
                   schedule(args, steps_per_epoch), rt, micro_batch=micro_batch, clip_grad=args.clip_grad, ema=ema,
                   skip_nonfinite=args.skip_nonfinite, num_extra=1)


def make_loaders(args, rt, data):
    """(training, selection, test) loaders: the best epoch is picked on the test set, as the original repository
    did, or with --val_size on that many held-out training images."""
    train_images, train_labels, val_images, val_labels = selection_split(data, args.val_size)
    train_loader = make_loader(args, rt, train_images, train_labels, args.batch_size, train=True,
                               crop_scale=args.crop_scale, flip=args.flip, randaug=args.randaug, reprob=args.reprob)
    test_loader = make_loader(args, rt, data.test_images, data.test_labels, 1024, train=False)
    val_loader = make_loader(args, rt, val_images, val_labels, 1024, train=False) if args.val_size else test_loader
    return train_loader, val_loader, test_loader


def start_note(args, rt, model, micro_batch, steps, selected_on, pretrained):
    mode = "fine-tuning" if args.pretrained_model_path else "scratch"
    if args.linear_probe:  # a probe of random features is a baseline, or a forgotten --pretrained_model_path
        mode = "linear probe" + ("" if args.pretrained_model_path else
                                 " of a randomly initialised encoder: no --pretrained_model_path")
    print(f"training a classifier ({mode}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"on {rt.device} ({rt.world_size} process(es)), {steps} steps/epoch, micro-batch {micro_batch}, peak lr "
          f"{peak_lr(args):.2e}, {rt.describe()}; the best epoch is picked on {selected_on}")
    if pretrained is not None:
        print(pretraining_note(args.pretrained_model_path, pretrained))
    note = ema_note(args.ema_decay, args.total_epoch * steps) if args.ema else None
    if note:
        print(note)


def final_report(args, rt, log, eval_model, best, last_acc, test_loader, data, config):
    """The best weights on the test set: per-class table, confusion image, closing log line, timm export."""
    if args.val_size or last_acc is None:  # with --val_size no choice has looked at the test set
        last_acc = evaluate(eval_model, test_loader, rt, config["num_classes"])["acc"]
    eval_model.load_state_dict(best["model"])  # every rank kept a copy: no shared disk needed
    result = evaluate(eval_model, test_loader, rt, config["num_classes"], args.tta)
    if rt.is_main:
        # without --val_size the best epoch is picked on the test set, as the original repository did, so the
        # last epoch's accuracy is printed beside it: it is the unbiased one
        if args.val_size:
            print(f"best held-out accuracy {best['acc']:.2%} (epoch {best['epoch']}); on the test set: those "
                  f"weights {result['acc']:.2%}, last epoch {last_acc:.2%}")
        else:
            print(f"best accuracy {best['acc']:.2%} (epoch {best['epoch']}), last epoch {last_acc:.2%}")
        print(per_class_table(result, data.classes))
        if not log.reported:  # a finished run resumed again: TensorBoard has this image at this step already
            log.image("cls/confusion", confusion_image(result["confusion"], data.classes), args.total_epoch)
            log.text("cls/confusion", confusion_table(result["confusion"], data.classes), args.total_epoch)
        log.line({"final": True, "epoch": args.total_epoch, "acc": result["acc"], "acc5": result["acc5"],
                  "best_epoch": best["epoch"], "best_acc": best["acc"], "selected_on": best["selected_on"],
                  "last_epoch_acc": last_acc, "per_class": dict(zip(data.classes, result["per_class"])),
                  **({"acc_flip": result["acc_flip"]} if "acc_flip" in result else {})})
        if args.export_timm:
            write_timm_state(*classifier_export(eval_model, config), args.export_timm)
    return {"best_acc": best["acc"], "best_epoch": best["epoch"], "last_epoch_acc": last_acc, "final": result}


@cli_main
def main(args):
    if args.eval_only:
        return eval_only(args)
    if args.resume == "auto":  # the run's own checkpoint: its default name when none is given
        default_output_path(args)
    restarting = auto_resume(args, last_checkpoint_path(args.output_model_path or ""))
    ckpt = resume_checkpoint(args, get_args_parser(), "classifier")
    pretrained, note = read_pretrained(args, get_args_parser()) if ckpt is None else (None, None)
    resolve_model(args)
    validate(args)
    default_output_path(args)
    args.data_dir = args.data_dir or "data"
    args.log_dir = args.log_dir or default_log_dir(args.data_dir, args.output_model_path)
    last_path = last_checkpoint_path(args.output_model_path)
    rt = setup_runtime(args)
    if rt.is_main and note:
        print(note, file=sys.stderr)
    if rt.is_main:
        claim_outputs(args, args.output_model_path, "--output_model_path", restarting, last_path, beside=[last_path])
        check_export_path(args, run_outputs=(args.output_model_path, last_path),
                          resumed_export=ckpt["args"].get("export_timm") if ckpt is not None else None)
    _, micro_batch = split_batch(args, rt, GPU_MICRO_BATCH, even=bool(args.mixup or args.cutmix))
    data = load_data(args.data_dir, args.image_size, rt, labels_for="a classifier")
    data_record = data_info(args.data_dir, data) if rt.is_main else None
    model, config = build_model(args, ckpt, pretrained, data)
    model.to(rt.device)
    train_loader, val_loader, test_loader = make_loaders(args, rt, data)
    selected_on = f"{args.val_size} held-out training images" if args.val_size else "the test set"
    trainer = make_trainer(args, rt, model, len(data.classes), len(train_loader), micro_batch)
    start_epoch, epoch_state = restore_training_state(ckpt, args.resume, model, trainer, train_loader, rt,
                                                      data_record)
    best = {"acc": 0.0, "epoch": None, "model": None} if ckpt is None else \
        {"acc": ckpt["best_acc"], "epoch": ckpt["best_epoch"], "model": ckpt["best_model"]}
    eval_model, last_acc = (trainer.ema.module if args.ema else model), None
    log = MetricsLog(args.log_dir, rt, args, completed_epochs=start_epoch, resumed=ckpt is not None,
                     data=data_record)
    if rt.is_main:
        start_note(args, rt, model, micro_batch, len(train_loader), selected_on, pretrained)
        note_devices(args, rt, script_command(__file__))

    def save_best():
        save_atomic(checkpoint("classifier", best["model"], config, best["epoch"], classes=list(data.classes),
                               acc=best["acc"], selected_on=selected_on, args=plain_args(args)),
                    args.output_model_path)

    def after_epoch(epoch, train):
        nonlocal last_acc
        val = evaluate(eval_model, val_loader, rt, len(data.classes), args.tta)
        last_acc, train_acc = val["acc"], train["extra_sums"][0] / max(train["images"], 1)
        log.scalars({"cls/loss/train": train["loss"], "cls/loss/val": val["loss"], "cls/acc/train": train_acc,
                     "cls/acc/val": val["acc"], "cls/acc5/val": val["acc5"], "cls/acc_flip/val": val.get("acc_flip"),
                     "lr": train["lr"],
                     "images_per_s": train["images_per_s"]}, epoch)
        if val["acc"] > best["acc"] or best["model"] is None:
            best.update(acc=val["acc"], epoch=epoch,
                        model={k: v.detach().clone() for k, v in eval_model.state_dict().items()})
            if rt.is_main:
                save_best()
        record = {"train_loss": train["loss"], "train_acc": train_acc, "val_loss": val["loss"],
                  "val_acc": val["acc"], "val_acc5": val["acc5"], "best_acc": best["acc"],
                  **({"val_acc_flip": val["acc_flip"]} if "acc_flip" in val else {})}
        return record, (f"train loss {train['loss']:.4f} acc {train_acc:.2%}, val loss {val['loss']:.4f} acc "
                        f"{val['acc']:.2%} (best {best['acc']:.2%})")

    def save(epoch, epoch_state):
        state = training_state(trainer, train_loader, rt, args, epoch_state, data_record)  # a collective
        if rt.is_main:  # the best weights too: a resume needs no other file, on any machine
            save_atomic(checkpoint("classifier", model.state_dict(), config, epoch, classes=list(data.classes),
                                   best_acc=best["acc"], best_model=best["model"], best_epoch=best["epoch"], **state),
                        last_path)

    done = fit(args, rt, trainer, model, train_loader, log, start_epoch=start_epoch, epoch_state=epoch_state,
               after_epoch=after_epoch, save=save,
               resume=(last_path, resume_command(script_command(__file__), last_path, rt, args.device)))
    if done and rt.is_main and not os.path.isfile(args.output_model_path):  # gone since an earlier start
        save_best()
    result = final_report(args, rt, log, eval_model, dict(best, selected_on=selected_on), last_acc, test_loader,
                          data, config) if done else {"best_acc": best["acc"]}
    log.close()
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
