"""The command-line flags every training job shares, and the checks of their values."""
import argparse
import math
import os
import sys

import torch
import yaml

from cifar_mae.errors import UserError
from cifar_mae.model_config import DEFAULT_MODEL, MODELS, is_vil, resnet_arch


def finite_float(text):
    """float() for flags: nan and inf pass float() and most range checks (nan < 0 is False), then poison training."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def path_arg(text):
    """argparse type of every flag that names a file or folder: a leading ~ is the home folder (bash leaves
    `--data_dir=~/data` as it is), and an empty value (a script's unset variable) is refused, not read as no flag."""
    if not text:
        raise argparse.ArgumentTypeError("empty (an unset variable in a script?)")
    return os.path.expanduser(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not where the help already names it, nor where it is None."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose float flags, in argument groups too, take finite numbers only (finite_float), and which
    reads a recipe file given with -c (add_config_arg) into its defaults first, as timm's train.py does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)
        self.register("type", float, finite_float)  # argparse looks a flag's type up here before calling it

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        if any(action.dest == "config" for action in self._actions):
            first = argparse.ArgumentParser(add_help=False)
            first.add_argument("-c", "--config", type=path_arg, default=None)
            config = first.parse_known_args(args)[0].config
            if config:
                self.set_defaults(**self.read_config(config))
        return super().parse_known_args(args, namespace)

    def read_config(self, path):
        """A YAML mapping of flag names to values -> parser defaults, each value checked as its flag would be."""
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except OSError as e:
            self.exit(2, f"error: -c {path}: {e.strerror}\n")
        except yaml.YAMLError as e:
            self.exit(2, f"error: -c {path} is not YAML: {str(e).splitlines()[0]}\n")
        if not isinstance(values, dict):
            self.exit(2, f"error: -c {path} holds a {type(values).__name__}, not a mapping of flag names to values\n")
        actions = {action.dest: action for action in self._actions if action.dest not in ("help", "config")}
        defaults = {}
        for key, value in values.items():
            action = actions.get(str(key).replace("-", "_"))
            if action is None:
                self.exit(2, f"error: -c {path}: {key!r} is not a flag of this script (see --help)\n")
            try:
                defaults[action.dest] = config_value(action, value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                self.exit(2, f"error: -c {path}: {key}: {e}\n")
        return defaults


def config_value(action, value):
    """A recipe file's value for `action`'s flag, converted and checked as the command line would be."""
    if value is None:
        return None
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise TypeError(f"takes true or false, not {value!r}")
        return value
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            raise TypeError(f"takes a list of {action.nargs} values, not {value!r}")
        return [config_value(argparse.Action([], action.dest, type=action.type), v) for v in value]
    if isinstance(value, (bool, list, dict)):
        raise TypeError(f"takes one value, not {value!r}")
    value = action.type(str(value)) if action.type else value
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def add_config_arg(parser):
    parser.add_argument("-c", "--config", type=path_arg, default=None, metavar="FILE.yaml",
                        help="a recipe (configs/): flag names and values that become this run's defaults; flags "
                             "given on the command line win")


def check_positive(args, *names):
    check_interval(args, "(0, inf)", *names)


def check_interval(args, interval, *names):
    """Each named flag that is set lies in `interval`, written as the message gives it: "[0, 1)", "(0, 1]",
    "[0, inf)" (said as "must not be negative"), "(0, inf)" ("must be positive")."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        below = value < low or (interval[0] == "(" and value == low)
        above = value > high or (interval[-1] == ")" and value == high)
        if below or above:
            words = {"[0, inf)": "must not be negative", "(0, inf)": "must be positive"}
            said = words.get(interval, f"must lie in {interval}")
            raise UserError(f"--{name} {said}, got {value}")


def check_training_args(args, *positive):
    """The checks every training job shares, and those of its own flags that must be positive."""
    check_positive(args, "batch_size", "max_device_batch_size", "base_learning_rate", "total_epoch", "image_size",
                   "patch_size", "emb_dim", "encoder_layer", "encoder_head", "log_interval", "save_every",
                   "stop_after_epoch", "stop_after_minutes", *positive)
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop_scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    check_interval(args, "[0, 1)", "momentum")
    check_schedule(args)


VIT_FLAGS = ("patch_size", "emb_dim", "encoder_layer", "encoder_head", "pos_embed")


def check_backbone_args(args, kind, *refused):
    """--model names `kind` of backbone ("a ResNet", "a Vision-LSTM"), which none of the ViT's flags `refused`
    acts on: each must be unset (pos_embed: learned)."""
    given = [name for name in refused if getattr(args, name) not in (None, False, "learned")]
    if given:
        raise UserError(f"--{given[0]} acts on a ViT, and --model {args.model} is {kind}")


def check_backbone_flags(args, *vit_only):
    """The flags that act on one kind of backbone only: with a ResNet (--model) no ViT size flag nor the job's
    flags `vit_only`; with a Vision-LSTM none of those but its sizes; --vil_* and --export_vil with a ViL only."""
    vil = is_vil(args.model)
    vil_flags = [name for name in ("vil_pooling", "vil_conv", "export_vil") if getattr(args, name, None) is not None]
    if vil_flags and not vil:
        raise UserError(f"--{vil_flags[0]} acts on a Vision-LSTM, and --model {args.model} is not one")
    if resnet_arch(args.model):
        check_backbone_args(args, "a ResNet", *VIT_FLAGS, *vit_only)
    elif vil:
        check_backbone_args(args, "a Vision-LSTM", "encoder_head", "pos_embed", *vit_only)


def check_schedule(args):
    """A new run whose warmup outlasts it would never reach its peak learning rate nor decay; a kNN monitor
    (--knn_every) less often than the run is long would never run. Runs resumed keep what they started with."""
    if args.resume or getattr(args, "eval_only", None):
        return
    if args.warmup_epoch > args.total_epoch:
        raise UserError(f"--warmup_epoch {args.warmup_epoch} is longer than --total_epoch {args.total_epoch}: the "
                        "learning rate would never reach its peak nor decay; pass a shorter --warmup_epoch (a tenth "
                        "of the run, say)")
    if getattr(args, "knn_every", 0) > args.total_epoch:
        raise UserError(f"--knn_every {args.knn_every} is longer than --total_epoch {args.total_epoch}: the kNN "
                        "monitor would never run")


def check_seed(seed):
    """torch takes seeds below 2**64; each process seeds its generators with --seed plus a few."""
    if not 0 <= seed < 2 ** 63:
        raise UserError(f"--seed must lie in [0, 2**63), got {seed}")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp: the autocast dtype


DATA_DIR_HELP = ("a folder holding cifar-10-batches-py/, cifar-100-python/, train/ + test/ (or val/) image folders, "
                 "or the archive cifar-10-python.tar.gz or cifar-100-python.tar.gz; with none of these, CIFAR-10 "
                 "is downloaded into it (default: data; with --resume, --eval_only or --pretrained_model_path: "
                 "the data that checkpoint's run used, where it is still there)")


def add_training_args(parser, *, seed, batch_size, base_learning_rate, weight_decay, total_epoch, warmup_epoch,
                      gpu_micro_batch, checkpoint_flag, weight_decay_help="weight matrices only", optimizer="adamw"):
    """The flags every training job has, with the job's defaults: seeds, batch, learning rate and schedule, data
    and log folders (--log_dir's default named after the job's `checkpoint_flag`)."""
    parser.add_argument("--seed", type=int, default=seed, help="seeds every RNG (process k of a run takes seed + k)")
    parser.add_argument("-bs", "--batch_size", type=int, default=batch_size,
                        help="images per optimizer step (global)")
    parser.add_argument("--max_device_batch_size", type=int, default=None,
                        help="micro-batch per forward/backward; gradients are averaged over micro-batches, so this "
                             "changes memory use, not the objective (default: the largest divisor of the batch per "
                             f"process up to {gpu_micro_batch} on a GPU, 64 on the CPU)")
    parser.add_argument("--base_learning_rate", type=float, default=base_learning_rate,
                        help="lr = base * batch_size / 256")
    parser.add_argument("--weight_decay", type=float, default=weight_decay,
                        help=f"weight decay ({weight_decay_help})")
    parser.add_argument("--optimizer", default=optimizer, choices=["adamw", "sgd"],
                        help="adamw, or sgd with --momentum")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum (--optimizer sgd)")
    parser.add_argument("--total_epoch", type=int, default=total_epoch,
                        help="epochs; the cosine schedule ends with the last")
    parser.add_argument("--warmup_epoch", type=int, default=warmup_epoch, help="epochs of linear lr warmup")
    parser.add_argument("--data_dir", type=path_arg, default=None, help=DATA_DIR_HELP)
    parser.add_argument("--log_dir", type=path_arg, default=None,
                        help=f"TensorBoard events and metrics.jsonl (default: logs/<dataset>/<{checkpoint_flag}'s "
                             "name>)")


def add_encoder_args(group):
    """--model and the encoder's size flags, shared by both scripts (not given: --model's value)."""
    group.add_argument("--model", default=DEFAULT_MODEL, type=model_name,
                       help=f"a named size ({', '.join(MODELS)}), whose values the size flags below override; or "
                            "timm:NAME, a timm VisionTransformer built by timm.create_model with the size flags given")
    group.add_argument("--image_size", type=int, default=None, help="images are resized to this square size")
    group.add_argument("--patch_size", type=int, default=None, help="pixels per side of a patch (token)")
    group.add_argument("--emb_dim", type=int, default=None, help="encoder width")
    group.add_argument("--encoder_layer", type=int, default=None, help="encoder blocks")
    group.add_argument("--encoder_head", type=int, default=None, help="encoder attention heads")
    group.add_argument("--pos_embed", default="learned", choices=["learned", "sincos"],
                       help="learned, or fixed 2-D sin-cos position embeddings")
    return group


def model_name(text):
    """--model's type: a name in MODELS, or timm:NAME."""
    if text in MODELS or (text.startswith("timm:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a named size ({', '.join(MODELS)}) nor timm:NAME")


INTERPOLATIONS = ["bilinear", "bicubic"]


def add_augmentation_args(group, crop_scale):
    group.add_argument("--crop_scale", type=float, nargs=2, default=crop_scale, metavar=("MIN", "MAX"),
                       help="random-resized-crop area range; 1 1 turns cropping off")
    group.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                       help="filter of the random-resized-crop (the official MAE recipes use bicubic)")
    group.add_argument("--flip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    return group


def add_saved_model_args(group, evaluate_help, export_help):
    """--eval_only CHECKPOINT and --export_timm PATH, with what each does in the job."""
    group.add_argument("--eval_only", type=path_arg, default=None, metavar="CHECKPOINT", help=evaluate_help)
    group.add_argument("--export_timm", type=path_arg, default=None, metavar="PATH", help=export_help)
    return group


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    group.add_argument("--amp", default=None, choices=list(AMP_DTYPES),
                       help="mixed precision (default: bf16 on GPUs that have it natively, from A100 / RTX 30xx "
                            "on; fp16 on older GPUs; off on CPU)")
    group.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                       help="torch.compile the model (default: on for CUDA GPUs of compute capability 7.0 on, "
                            "off for older ones and CPU)")
    group.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                       help="torch.compile's mode: reduce-overhead adds CUDA graphs (for small, launch-bound "
                            "batches); max-autotune tries GEMM configurations at a longer compile")
    group.add_argument("--loader", default="device", choices=["device", "torch"],
                       help="device: whole dataset on the device, augmented there (fast, default); "
                            "torch: torchvision DataLoader with PIL transforms (slow)")
    group.add_argument("--num_workers", type=int, default=4, help="DataLoader workers (--loader torch only)")
    group.add_argument("--log_interval", type=int, default=50,
                       help="optimizer steps between loss read-backs (the only host-device syncs)")
    group.add_argument("--resume", type=path_arg, default=None,
                       help="checkpoint to resume from (everything is restored); auto: the run's own checkpoint when "
                            "it exists, else a fresh start (for jobs that are re-submitted after preemption)")
    group.add_argument("--overwrite", action="store_true", help="allow starting over an existing output checkpoint")
    group.add_argument("--save_every", type=int, default=1,
                       help="write the resumable checkpoint every N epochs (and at the last epoch and on a stop); "
                            "each write is a full fsync'ed copy, so a larger N saves time on short epochs")
    group.add_argument("--stop_after_epoch", type=int, default=None,
                       help="save and stop once this epoch is done (to split a long run; go on with --resume)")
    group.add_argument("--stop_after_minutes", type=float, default=None,
                       help="save and stop after the last epoch that ends within this many minutes of the start, "
                            "judged by the mean epoch so far (for jobs with a time limit; go on with --resume auto)")
    group.add_argument("--skip_nonfinite", type=int, default=0,
                       help="skip up to N optimizer steps whose loss is NaN/inf before stopping "
                            "(checks every step, one sync each, only when N > 0)")
    return parser
