"""A run's settings, resolved once, at the edge: parse -> recipe file (flags.ArgumentParser) -> checkpoint
defaults -> named size -> checks -> output names, into frozen Settings that the library only reads. Every
assignment to a setting is in this file."""
import argparse
import os

from cifar_mae.checkpoint import last_checkpoint_path, load_checkpoint
from cifar_mae.datasets import default_log_dir
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.model_config import MODELS, timm_name
from cifar_mae.timm_vit import TIMM_KWARGS, timm_sizes


class Settings(argparse.Namespace):
    """A run's settings once resolved: the library reads them and never assigns to them."""

    def __init__(self, args):
        for key, value in vars(args).items():
            object.__setattr__(self, key, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are resolved once, at the start of a run; {name} cannot change after that")


def resolve_settings(args, parser, task):
    """Parse -> recipe file -> checkpoint defaults -> named size -> checks -> output names, once.
    -> (frozen Settings, the checkpoint resumed or None, whether --resume auto starts afresh, the task's defaults)"""
    restarting = auto_resume(args, task.default_checkpoint(args))
    ckpt = resume_checkpoint(args, parser, task.kind)
    defaults = task.take_defaults(args, parser, ckpt) if ckpt is None else None
    resolve_model(args)
    task.check_args(args)
    setattr(args, task.output_setting, task.output_path(args))
    args.data_dir = args.data_dir or "data"
    args.log_dir = args.log_dir or default_log_dir(args.data_dir, getattr(args, task.output_setting))
    return Settings(args), ckpt, restarting, defaults


def resolve_eval_settings(args, parser, task):
    """--eval_only CHECKPOINT: the settings of an evaluation of the saved model, which brings its sizes and its
    data folder. -> (frozen Settings, the checkpoint, a note on the data folder or None)"""
    ckpt = load_checkpoint(args.eval_only, task.kind, "--eval_only")
    config = ckpt["model_config"]
    sizes = {k: v for k, v in config.items() if k != "mask_ratio"}  # an MAE is evaluated at --mask_ratio if given
    saved = {**config, "model": ckpt.get("args", {}).get("model", args.model)}  # its name, for its kind of model
    take_saved(args, parser, saved, f"--eval_only {args.eval_only}", fixed=sizes)
    resolve_model(args)
    task.check_eval_args(args)
    note = data_dir_from(args, ckpt, args.eval_only)
    return Settings(args), ckpt, note


def plain(value):
    """A setting as a checkpoint keeps it: a tuple (nargs) as a list."""
    return list(value) if isinstance(value, tuple) else value


def plain_args(args):
    """argparse values as plain types, safe for weights_only checkpoints."""
    return {k: plain(v) for k, v in vars(args).items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


# settings that belong to one start of a job, never taken from a checkpoint
PER_START = {"resume", "overwrite", "device", "stop_after_epoch", "stop_after_minutes", "eval_only"}


def take_saved(args, parser, saved, what, fixed=()):
    """Take a checkpoint's settings as defaults, as timm's config files set a parser's defaults: a flag left at
    its default takes the saved value, a flag given with another value wins, except those in `fixed` (the
    model's sizes, which the saved weights need), which are an error."""
    for key, value in saved.items():
        if key in PER_START or not hasattr(args, key):
            continue
        current = plain(getattr(args, key))
        if current == plain(parser.get_default(key)) or current == plain(value):
            setattr(args, key, value)
        elif key in fixed:
            raise UserError(f"--{key} {current} conflicts with {what}, which has {value}; drop the flag: the "
                            "model's sizes come from the checkpoint")


def resolve_model(args):
    """Each size flag not given (None) takes --model's value (timm's sizes, for timm:NAME); the decoder's only
    where the script has them."""
    if timm_name(args.model):
        with as_user_error("--model "):
            sizes = timm_sizes(timm_name(args.model), **{k: getattr(args, k) for k in TIMM_KWARGS})
    else:
        sizes = MODELS[args.model]
    for key, value in sizes.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def auto_resume(args, path):
    """--resume auto: resume from `path`, the run's own checkpoint, when it is there; else start afresh.
    -> True when it starts afresh: logs already in the log dir are then this job's, from an attempt that ended
    before its first checkpoint (preempted with --save_every N), and may be replaced."""
    if args.resume != "auto":
        return False
    args.resume = path if os.path.isfile(path) else None
    return args.resume is None


def data_dir_from(args, ckpt, path):
    """A job on a saved model (--resume, --eval_only, --pretrained_model_path, tools/reconstruct.py) given no
    --data_dir takes the data its run trained on, where it is still there, else `data`. -> a note, or None."""
    if args.data_dir is not None:
        return None
    saved = ckpt.get("args", {}).get("data_dir")
    args.data_dir = saved if saved and os.path.exists(saved) else "data"
    if not saved or saved == "data":
        return None
    if args.data_dir == saved:
        return f"note: no --data_dir given: using {saved}, the data {path} was trained on"
    return f"note: no --data_dir given, and the data {path} was trained on ({saved}) is not there: using data"


def resume_checkpoint(args, parser, kind):
    """--resume PATH: its checkpoint, whose settings the run takes as defaults (take_saved), or None."""
    if not args.resume:
        return None
    ckpt = load_checkpoint(args.resume, kind, "--resume")
    if "optimizer" not in ckpt:
        raise UserError(f"--resume {args.resume} holds only weights; resume from the training state written "
                        f"beside it ({last_checkpoint_path(args.resume)})")
    take_saved(args, parser, ckpt["args"], f"--resume {args.resume}", fixed=ckpt["model_config"])
    return ckpt
