"""What both training scripts share: data, device-side loaders and augmentation, the optimizer step with
gradient accumulation, the learning-rate schedule, checkpoints, logging, signals and distributed setup."""
import argparse
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:
    import fcntl  # output locks (lock_output); Windows has no flock, and goes without them
except ImportError:
    fcntl = None

CHECKPOINT_FORMAT = "cifar-mae/1"


# ---------------------------------------------------------------------------------------------- errors

class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): one line on stderr, no traceback."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


class NonFiniteLoss(Exception):
    def __init__(self, epoch, step):
        where = f"in epoch {epoch} " if epoch is not None else ""
        super().__init__(f"non-finite loss {where}at optimizer step {step}; stopping without saving "
                         "(the last checkpoint on disk is the last good one). Lower the learning rate, pass "
                         "--skip_nonfinite N to skip a few bad steps, or, if it ran in fp16, use --amp bf16 (GPUs "
                         "from A100 / RTX 30xx on) or --amp off")
        self.epoch, self.step = epoch, step


class ClosedPipeGuard:
    """Stands in for sys.stdout or sys.stderr while a script runs. Once the reader of the pipe behind it is gone
    (`| head` has its lines, or a `| tee` died of the same Ctrl-C as the run), or its terminal has hung up,
    what is printed there goes to /dev/null instead of raising an error from whichever print comes next,
    StopRequest's handler included: the run goes on, and a stop still saves its checkpoint. A stream closed
    before the start (`2>&-`, which Python makes None) writes to /dev/null from the start.

    Text the stream's encoding cannot hold (a class folder or path whose name is not UTF-8, which Python reads
    as lone surrogates, on a strict UTF-8 stdout) is written with backslash escapes, as Python's stderr does,
    instead of ending the run at the report after its training."""

    def __init__(self, stream, name):
        self.owned = stream is None  # Python's None for a stream whose fd was closed at start (`2>&-`)
        self.stream = open(os.devnull, "w") if self.owned else stream
        self.name, self.broken = name, False

    def write(self, text):
        try:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self.stream, "encoding", None) or "utf-8"
                self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
                return len(text)
        except OSError as e:
            self._divert(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            self._divert(e)

    def _divert(self, error):
        """A closed pipe (EPIPE) or a hung-up terminal (EIO, after an SSH session drops) ends the stream's
        output; any other error is raised as it was."""
        if not (isinstance(error, BrokenPipeError) or error.errno == errno.EIO):
            raise error
        if self.broken:
            return
        self.broken = True
        with contextlib.suppress(OSError, ValueError):  # ValueError: io.UnsupportedOperation, a stream without fd
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())  # the stream's own buffer drains there too, also at exit
            os.close(devnull)
        if self.name == "stdout":
            print("note: standard output is gone (a closed pipe or a hung-up terminal); the run goes on without "
                  "printing there", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def cli_main(main):
    """Wrap a script's main(args): a UserError or NonFiniteLoss ends with one line on stderr and an exit code;
    a closed pipe on stdout or stderr does not end it (ClosedPipeGuard); the output locks it took are released
    when it returns (lock_output)."""

    @functools.wraps(main)
    def wrapper(args):
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = ClosedPipeGuard(sys.stdout, "stdout"), ClosedPipeGuard(sys.stderr, "stderr")
        try:
            return main(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.code)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        except torch.OutOfMemoryError as e:  # the first line names the device and how much was asked for
            print(f"error: out of device memory ({str(e).splitlines()[0] if str(e) else 'no details'}); a smaller "
                  "--max_device_batch_size needs less and trains the same objective, since gradients are averaged "
                  "over micro-batches; nothing was saved since the last checkpoint", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C outside a training epoch (loading data), or a second Ctrl-C
            print("\ninterrupted; nothing was saved since the last checkpoint", file=sys.stderr)
            sys.exit(130)
        finally:
            release_output_locks()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for guard in (sys.stdout, sys.stderr):
                guard.flush()  # a pipe closed since the last print is diverted now, not at exit
                if guard.owned:
                    guard.stream.close()
            sys.stdout, sys.stderr = streams
    return wrapper


def finite_float(text):
    """float() for flags: nan and inf pass float() and most range checks (nan < 0 is False), then poison training."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def path_arg(text):
    """argparse type of every flag that names a file or folder. A leading ~ is the home folder: bash leaves
    `--data_dir=~/data` and a quoted "~/data" as they are, which would make (or download CIFAR-10 into) a folder
    named ~. An empty value is refused: from a job script's unset variable (`--eval_only "$CKPT"`) it would
    otherwise read as no flag at all, and start a training run, or train from scratch."""
    if not text:
        raise argparse.ArgumentTypeError("empty (an unset variable in a script?)")
    return os.path.expanduser(text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that also records the flags the command line gave, as args.given_flags: a resume (and a
    checkpoint's sizes) can then tell `--batch_size 4096` from no flag at all where 4096 is the default.
    Every type=float flag, in argument groups too, takes finite numbers only (finite_float)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)  # argparse looks a flag's type up here before calling it

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        defaults = [(action, action.default) for action in self._actions]
        try:  # parsed again with no defaults: only what was given is set
            for action in self._actions:
                action.default = argparse.SUPPRESS
            given = super().parse_known_args(args, None)[0]
        finally:
            for action, default in defaults:
                action.default = default
        namespace.given_flags = sorted(vars(given))
        return namespace, extras


def check_positive(args, *names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")


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


def check_writable(path, flag, is_dir=False):
    """Fail before training, not after the first epoch, when an output path cannot be written.

    Creates nothing: the nearest existing folder on the way must be a writable folder.
    """
    target = os.path.realpath(path)  # where a symbolic link points: that folder is written (write_atomic)
    if not is_dir and os.path.isdir(target):
        raise UserError(f"{flag} {path} is a folder, not a file")
    if not is_dir and path.endswith(tuple(filter(None, (os.sep, os.altsep)))):  # realpath drops the slash
        raise UserError(f"{flag} {path} names a folder (it ends with {path[-1]}); give a file name")
    folder = target if is_dir else os.path.dirname(target)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: cannot write there, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write to {existing} (permission denied)")


# ---------------------------------------------------------------------------------------------- runtime

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp: the autocast dtype


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype = None  # None: full precision
    compile: bool = False
    compile_mode: str = None  # torch.compile's mode; None: its default
    local_rank: int = 0  # the process's index on its own machine
    started: float = 0.0  # time.perf_counter() when the run was set up: --stop_after_minutes counts from here

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def amp(self):
        """The --amp value of this precision: bf16, fp16 or off."""
        return {v: k for k, v in AMP_DTYPES.items()}[self.amp_dtype]

    def describe(self):
        """amp and compile settings, for the start-up line."""
        mode = f" ({self.compile_mode})" if self.compile and self.compile_mode else ""
        return f"amp {self.amp}, compile {self.compile}{mode}"

    def autocast(self):
        """One autocast context for the whole run: bf16/fp16 on CUDA, nothing on CPU."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(args):
    """Pick the device, join the process group under torchrun, seed every RNG, choose amp and compile."""
    started = time.perf_counter()
    check_seed(args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (try cuda or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but torch sees no CUDA device")
        if world_size > 1 or device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        count = torch.cuda.device_count()
        if device.index >= count and world_size > 1:
            raise UserError(f"process {local_rank} of this machine takes cuda:{local_rank}, but torch sees {count} "
                            f"CUDA device(s): start at most {count} processes per machine (--nproc_per_node)")
        if device.index >= count:
            raise UserError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1} "
                            "(CUDA_VISIBLE_DEVICES renumbers them from 0)")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type != "cpu":  # mps, xpu, ...: torch knows the name, but nothing here was run on them
        raise UserError(f"--device {name!r}: this project runs on cuda or cpu only (its training step sums losses "
                        "in float64 on the device, which Apple's mps does not have; other devices are untested)")
    default_amp, default_compile = cuda_defaults() if device.type == "cuda" else ("off", False)
    amp = args.amp or default_amp
    if amp != "off" and device.type != "cuda":
        raise UserError(f"--amp {amp} needs a CUDA device; use --amp off on {device.type}")
    use_compile = default_compile if args.compile is None else args.compile
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {'.'.join(map(str, capability))})"
        if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError(f"--amp bf16: {gpu} does not compute bf16 natively (from 8.0 on: A100, RTX 30xx, H100); "
                            "drop the flag for fp16, the default there")
        if use_compile and capability < (7, 0):
            raise UserError(f"--compile: {gpu} is older than the 7.0 that torch.compile's Triton kernels need; drop "
                            "the flag (off is the default there)")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    amp_dtype = AMP_DTYPES[amp]
    mode = getattr(args, "compile_mode", None)
    seed_everything(args.seed + rank)
    return Runtime(device, rank, world_size, amp_dtype, use_compile, None if mode == "default" else mode,
                   local_rank, started)


def note_devices(args, rt, script):
    """Start-up notes on the device a run got without asking for one.

    On the CPU: torch sees no GPU, so a run meant for one (the defaults are) would take days; say why (a torch
    built without CUDA, or no GPU or driver it can use). On one GPU of several: name the torchrun command that
    uses them all. Not the first with --device cpu; not the second when --device names a GPU's index (cuda:1: a
    GPU picked on purpose, say one run per GPU)."""
    if args.device is None and rt.device.type == "cpu":
        why = (f"this torch, {torch.__version__}, is built without CUDA" if torch.version.cuda is None else
               f"this torch, {torch.__version__} for CUDA {torch.version.cuda}, finds no GPU or no driver it can use")
        print(f"note: no CUDA device ({why}), so this runs on the CPU: fine for small models (README, Recipes: "
              "'without a GPU'), days for the default ViT-T/2. --device cpu says this is meant and drops this "
              "note", file=sys.stderr)
    picked = args.device is not None and torch.device(args.device).index is not None
    count = torch.cuda.device_count() if rt.device.type == "cuda" and not rt.distributed and not picked else 0
    if count > 1:
        print(f"note: torch sees {count} CUDA devices and this run uses one ({rt.device}); torchrun "
              f"--nproc_per_node={count} {script} with the same flags trains on all {count}, with the same "
              "--batch_size split between them (CUDA_VISIBLE_DEVICES picks which)")


def cuda_defaults():
    """--amp and --compile defaults for the current CUDA device: bf16 where the GPU computes it natively
    (compute capability 8.0 on: A100, RTX 30xx, H100), else fp16 with a GradScaler (V100, T4, RTX 20xx such as
    the original's 2080 Ti); torch.compile where its Triton kernels run (capability 7.0 on)."""
    amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return amp, torch.cuda.get_device_capability() >= (7, 0)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)  # timm's Mixup draws from numpy
    random.seed(seed)  # timm's RandAugment draws from Python's random


def all_reduce_sum(values, rt):
    """Sum a 1-D float tensor over ranks (a copy; the input is left alone)."""
    values = values.clone()
    if rt.distributed:
        dist.all_reduce(values)
    return values


DATA_DIR_HELP = ("a folder holding cifar-10-batches-py/, cifar-100-python/, train/ + test/ (or val/) image folders, "
                 "or the archive cifar-10-python.tar.gz or cifar-100-python.tar.gz; with none of these, CIFAR-10 "
                 "is downloaded into it. Not given with --resume, --eval_only or --pretrained_model_path: the data "
                 "that checkpoint's run used (where it is still there)")


def add_encoder_args(group):
    """The encoder's size flags, shared by both scripts (defaults: ViT-T/2 on 32x32 images)."""
    group.add_argument("--image_size", type=int, default=32, help="images are resized to this square size")
    group.add_argument("--patch_size", type=int, default=2, help="pixels per side of a patch (token)")
    group.add_argument("--emb_dim", type=int, default=192, help="encoder width")
    group.add_argument("--encoder_layer", type=int, default=12, help="encoder blocks")
    group.add_argument("--encoder_head", type=int, default=3, help="encoder attention heads")
    group.add_argument("--pos_embed", default="learned", choices=["learned", "sincos"],
                       help="learned, or fixed 2-D sin-cos position embeddings")
    return group


INTERPOLATIONS = ["bilinear", "bicubic"]


def add_augmentation_args(group, crop_scale):
    group.add_argument("--crop_scale", type=float, nargs=2, default=crop_scale, metavar=("MIN", "MAX"),
                       help="random-resized-crop area range; 1 1 turns cropping off")
    group.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                       help="filter of the random-resized-crop (the official MAE recipes use bicubic)")
    group.add_argument("--flip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flip")
    return group


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CUDAGRAPH_MODES = ["reduce-overhead", "max-autotune"]  # the modes in which torch.compile adds CUDA graphs


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


# ---------------------------------------------------------------------------------------------- data

@dataclass
class ImageData:
    """A whole labelled dataset as uint8 tensors: train/test images (N, C, H, W), labels (N,) int64."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list


def load_data(data_dir, image_size, rt=None):
    """CIFAR-10 or CIFAR-100 batches (cifar-10-batches-py/, cifar-100-python/), an ImageFolder tree (train/ and
    test/ or val/), or a download of CIFAR-10.

    Under torchrun the first process of each machine downloads or decodes (and caches) first, and the others
    then read what it left: one decode per machine, whether or not the machines share a disk."""
    first = rt is None or not rt.distributed or rt.local_rank == 0
    if not first:
        dist.barrier()
    try:
        data = _find_and_load(data_dir, image_size, quiet=rt is not None and not rt.is_main)
    finally:
        if first and rt is not None and rt.distributed:
            dist.barrier()
    return data


def _data_kind(data_dir):
    """What load_data finds in data_dir: torchvision's CIFAR10 or CIFAR100 class (its folder, or the archive the
    CIFAR site serves), "folders", or None (download)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    own = _own_cifar_folder(data_dir)
    if own is not None:
        return own
    for dataset in (CIFAR10, CIFAR100):  # cifar-10-batches-py/, cifar-100-python/
        if os.path.isdir(os.path.join(data_dir, dataset.base_folder)):
            return dataset
    if os.path.isdir(os.path.join(data_dir, "train")):
        return "folders"
    for dataset in (CIFAR10, CIFAR100):  # cifar-10-python.tar.gz, cifar-100-python.tar.gz
        if os.path.isfile(os.path.join(data_dir, dataset.filename)):
            return dataset
    return None


def _own_cifar_folder(data_dir):
    """torchvision's CIFAR10 or CIFAR100 class when data_dir is its batches' own folder (cifar-10-batches-py/ or
    cifar-100-python/, which a root shared by both downloads holds side by side), else None."""
    from torchvision.datasets import CIFAR10, CIFAR100
    name = os.path.basename(os.path.abspath(data_dir))
    return next((d for d in (CIFAR10, CIFAR100) if d.base_folder == name and os.path.isdir(data_dir)), None)


def dataset_name(data_dir):
    """A short name of the data in data_dir, for default log folders: cifar10, cifar100 or the folder's name."""
    kind = _data_kind(data_dir)
    if kind == "folders":
        return os.path.basename(os.path.abspath(data_dir)) or "images"
    return "cifar100" if kind is not None and kind.__name__ == "CIFAR100" else "cifar10"


def default_log_dir(data_dir, model_path):
    """logs/<dataset>/<checkpoint's file name without .pth>: runs that write differently named checkpoints keep
    their logs apart (check_fresh_log_dir refuses to start a new run over another's logs)."""
    return os.path.join("logs", dataset_name(data_dir), os.path.splitext(os.path.basename(model_path))[0])


# the folders inside an ImageFolder tree that load_data reads (torchvision's CIFAR folders may be passed themselves)
DATASET_FOLDERS = ("train", "test", "val")
# archives a --data_dir may hold instead of a dataset (the CIFAR site's own are extracted, _download_cifar)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.xz", ".tar.bz2", ".7z", ".rar")


def _find_and_load(data_dir, image_size, quiet=False):
    from torchvision.datasets import CIFAR10, CIFAR100
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):  # such as the archive itself
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: pass the folder that holds the data")
    kind = _data_kind(data_dir)
    if kind == "folders":
        for test_name in ("test", "val"):
            if os.path.isdir(os.path.join(data_dir, test_name)):
                return _load_image_folders(data_dir, test_name, image_size)
        raise UserError(f"{data_dir} has train/ but neither test/ nor val/ beside it")
    if kind is None and os.path.isdir(data_dir):  # before a download into it, a folder that is not the dataset's:
        # one inside the dataset (an ImageFolder split such as train/, or one of its classes)
        inner = above = os.path.abspath(data_dir)
        for _ in range(2):
            inner, above = above, os.path.dirname(above)
            if os.path.basename(inner) in DATASET_FOLDERS and _data_kind(above) is not None:
                raise UserError(f"--data_dir {data_dir} is a folder inside the dataset; pass the folder that holds "
                                f"it: --data_dir {shlex.quote(above)}")
        # the folder above it, as the JPEG archive unpacks (hidden folders left out: another machine's download in
        # progress on a shared disk is one)
        inside = sorted(e.path for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith(".")
                        and _data_kind(e.path) is not None)
        if inside:
            raise UserError(f"--data_dir {data_dir} holds no dataset itself, but {inside[0]} does: pass "
                            f"--data_dir {shlex.quote(inside[0])}")
        packed = sorted(name for name in os.listdir(data_dir) if name.lower().endswith(ARCHIVE_SUFFIXES))
        if packed:  # such as the JPEG copy of CIFAR-10, cifar10-jpeg.tar.gz: meant to be used, not downloaded over
            archive, into = shlex.quote(os.path.join(data_dir, packed[0])), shlex.quote(data_dir)
            raise UserError(f"--data_dir {data_dir} holds no dataset, only the archive {packed[0]}: unpack it (for a "
                            f".tar.gz: tar -xzf {archive} -C {into}) and pass the folder that holds train/ and test/ "
                            "(or cifar-10-batches-py/)")
    kind = kind or CIFAR10
    if _own_cifar_folder(data_dir):
        return _load_cifar_batches(os.path.dirname(os.path.abspath(data_dir)), image_size, kind)
    if not os.path.isdir(os.path.join(data_dir, kind.base_folder)):
        _download_cifar(data_dir, kind)
    elif kind is CIFAR10 and os.path.isdir(os.path.join(data_dir, CIFAR100.base_folder)) and not quiet:
        # torchvision downloads both into one root: CIFAR-10 is the default, CIFAR-100 is one flag away
        print(f"note: {data_dir} holds CIFAR-10 and CIFAR-100; this is CIFAR-10 (for CIFAR-100 pass --data_dir "
              f"{shlex.quote(os.path.join(data_dir, CIFAR100.base_folder))})", file=sys.stderr)
    return _load_cifar_batches(data_dir, image_size, kind)


def _download_cifar(data_dir, dataset=None):
    """torchvision's CIFAR-10 (or `dataset`: CIFAR10 or CIFAR100) into a temporary folder, moved into place only
    when complete: extracted from the archive the CIFAR site serves when data_dir holds it (its md5 checked),
    else downloaded."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, extract_archive
    dataset = dataset or CIFAR10
    archive = os.path.join(data_dir, dataset.filename)
    from_archive = os.path.isfile(archive)  # else a download
    if from_archive and not check_integrity(archive, dataset.tgz_md5):
        raise UserError(f"{archive} is not the archive the CIFAR site serves (its md5 differs: a download that "
                        "stopped part way?); delete it or fetch it again")
    looked = (f"no CIFAR-10 in {os.path.abspath(data_dir)} (looked for cifar-10-batches-py/, cifar-100-python/, "
              "train/ with test/ or val/ class folders, and the archives cifar-10-python.tar.gz and "
              "cifar-100-python.tar.gz)")
    target = os.path.join(data_dir, dataset.base_folder)
    tmp, created, path = None, None, os.path.abspath(data_dir)
    while not os.path.exists(path):  # the outermost folder this creates
        created, path = path, os.path.dirname(path)
    try:
        os.makedirs(data_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".cifar-download-", dir=data_dir)  # beside the target: one atomic rename
        if from_archive:  # its md5 was checked above
            print(f"extracting {archive} (once) ...", file=sys.stderr)
            extract_archive(archive, tmp)
        else:
            print(f"{looked}; downloading CIFAR-10 with torchvision ...", file=sys.stderr)
            with contextlib.redirect_stdout(sys.stderr):
                dataset(tmp, train=True, download=True)
        try:
            os.rename(os.path.join(tmp, dataset.base_folder), target)
        except OSError:
            if not os.path.isdir(target):  # else another process (another machine on a shared disk) was first
                raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = f"extracting {archive}" if from_archive else f"{looked}, and downloading it"
        raise UserError(f"{what} failed ({reason}); pass --data_dir with a folder holding "
                        "cifar-10-batches-py/, cifar-100-python/ or train/ + test/ image folders (see README, 'Data: "
                        "local or offline')") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and not any(files for _, _, files in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)  # a failed download leaves no empty folders behind


def _resize(images, image_size):
    """uint8 (N, C, h, w) -> uint8 (N, C, image_size, image_size); a no-op at the same size."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _load_cifar_batches(data_dir, image_size, dataset):
    """torchvision's CIFAR10 or CIFAR100 files (the pickled batches its download writes) as uint8 tensors."""

    class LocalCIFAR(dataset):
        """torchvision's reader without its md5 checks, so subsets and copies of the batches load too."""

        def _check_integrity(self):
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                       for name, _ in self.train_list + self.test_list)

        def _load_meta(self):
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]

    folder = os.path.join(data_dir, dataset.base_folder)
    splits = []
    for train in (True, False):
        try:
            ds = LocalCIFAR(data_dir, train=train)
        except RuntimeError:
            missing = [n for n, _ in dataset.train_list + dataset.test_list + [(dataset.meta["filename"], 0)]
                       if not os.path.isfile(os.path.join(folder, n))]
            raise UserError(f"{folder} is incomplete: missing {', '.join(missing)}") from None
        except Exception:
            split_list = dataset.train_list if train else dataset.test_list
            bad = _first_unreadable_pickle(folder, [n for n, _ in split_list] + [dataset.meta["filename"]])
            raise UserError(f"cannot read {bad}: the file is corrupt or truncated") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits += [_resize(images, image_size), torch.tensor(ds.targets, dtype=torch.int64)]
    return ImageData(*splits, classes=list(ds.classes))


def _first_unreadable_pickle(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if name.endswith("meta"):
                continue
            np.asarray(entry["data"]).reshape(-1, 3, 32, 32)
            assert len(entry["labels"] if "labels" in entry else entry["fine_labels"]) == len(entry["data"])
        except Exception:
            return path
    return folder


def _load_image_folders(data_dir, test_name, image_size):
    train_root, test_root = os.path.join(data_dir, "train"), os.path.join(data_dir, test_name)
    train_classes, test_classes = _class_folders(train_root), _class_folders(test_root)
    for root, classes in ((train_root, train_classes), (test_root, test_classes)):  # before decoding anything
        if not classes:  # torchvision's own error for this is a ValueError about class_to_index
            raise UserError(f"{root} holds no class folders (an ImageFolder tree has one folder of images per "
                            "class)")
    if train_classes != test_classes:
        def only(a, b):  # up to 3 names of a that b lacks
            names = sorted(set(a) - set(b))
            return ", ".join(map(readable_name, names[:3])) + (", ..." if len(names) > 3 else "") or "-"
        raise UserError(f"the class folders of {train_root} ({len(train_classes)}) and {test_root} "
                        f"({len(test_classes)}) differ: only in {test_name}/: {only(test_classes, train_classes)}; "
                        f"only in train/: {only(train_classes, test_classes)} (both need one folder of images "
                        "per class, with the same names; a split laid out otherwise, such as Tiny-ImageNet's "
                        "val/images/ with val_annotations.txt, needs sorting into class folders first)")
    train = _decode_folder(train_root, image_size)
    test = _decode_folder(test_root, image_size)
    return ImageData(train[0], train[1], test[0], test[1], classes=train[2])


def _class_folders(directory):
    """An ImageFolder split's classes: its folders, sorted, hidden ones left out; none if it is no folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def load_rgb(path):
    """An image file as an RGB PIL image; a file PIL cannot read is a UserError that names it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def read_image(path, image_size):
    """An image file -> uint8 (3, image_size, image_size), resized (bicubic) when its size differs."""
    img = load_rgb(path)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _visible_image(path, root):
    """An image file of an ImageFolder tree that is not hidden, nor inside a hidden folder (such as Jupyter's
    .ipynb_checkpoints/, or macOS's ._NAME.jpg copies, which hold no image)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    parts = os.path.relpath(path, root).split(os.sep)
    return path.lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)


def _decode_folder(root, image_size):
    """Decode an ImageFolder tree once into uint8 tensors, cached beside it for later runs. Hidden files and
    folders are left out (_visible_image). _load_image_folders has checked that root holds class folders."""
    from torchvision.datasets import ImageFolder

    class VisibleImageFolder(ImageFolder):
        def find_classes(self, directory):
            names = _class_folders(directory)
            return names, {name: i for i, name in enumerate(names)}

    folder = VisibleImageFolder(root, loader=load_rgb, is_valid_file=lambda path: _visible_image(path, root),
                                allow_empty=True)  # an empty class is named below, as torchvision does not
    counts = torch.bincount(torch.tensor(folder.targets, dtype=torch.int64), minlength=len(folder.classes))
    if (counts == 0).any():
        raise UserError(f"{root}: class folder {folder.classes[int((counts == 0).nonzero()[0])]!r} holds no images")
    # the cache is keyed by the file list and sizes, so an edited tree is decoded again
    listing = [(os.path.relpath(p, root), os.path.getsize(p)) for p, _ in folder.samples]
    key = f"{image_size}:{hash_json(listing)}"
    caches = decode_cache_paths(root, image_size)
    for cache in filter(os.path.isfile, caches):
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached["images"], cached["labels"], [readable_name(c) for c in cached["classes"]]
        except Exception:
            pass  # a broken cache is rebuilt
    images = torch.empty(len(folder), 3, image_size, image_size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        decoded = pool.map(lambda path: read_image(path, image_size), [path for path, _ in folder.samples],
                           chunksize=256)
        for i, image in enumerate(progress_bar(decoded, total=len(folder),
                                               desc=f"decoding {root} (once, then cached)")):
            images[i] = image
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    classes = [readable_name(c) for c in folder.classes]
    entry = {"key": key, "images": images, "labels": labels, "classes": classes}
    try:
        save_atomic(entry, caches[0])
    except UserError as beside:  # a read-only dataset (shared on a cluster) or a full disk
        try:
            save_atomic(entry, caches[1])
            print(f"note: {beside}; cached in {caches[1]} instead", file=sys.stderr)
        except UserError as e:  # the run goes on without the cache
            print(f"note: {beside}; {e}; the next run decodes the images again", file=sys.stderr)
    return images, labels, classes


def decode_cache_paths(root, image_size):
    """Where the decoded images of an ImageFolder split are cached: in .cache/ beside the split's folder, or,
    where that cannot be written (a read-only shared dataset), in the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache, then cifar-mae/), under a name made from the split's absolute path."""
    root = os.path.abspath(root)
    name = f"{os.path.basename(root)}-{image_size}.pt"
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(os.path.dirname(root), ".cache", name),
            os.path.join(user_cache, "cifar-mae", f"{hash_json(root)}-{name}")]


def readable_name(name):
    """A file name as text that any UTF-8 output takes: bytes that are not UTF-8 (a folder unzipped from an
    archive made with another code page, which Python reads as lone surrogates) become backslash escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def holdout_split(num_images, size, seed=0):
    """Indexes (kept, held_out) that set `size` of `num_images` training images aside, both sorted.

    The split depends on `seed` only (not on a run's --seed), so runs with different seeds pick their best
    epoch on the same held-out images."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def hash_json(obj):
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- augmentation

def sample_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), generator=None, device=None, tries=10):
    """Random-resized-crop boxes for n images -> float (n, 4) of whole pixels, (x0, y0, w, h).

    torchvision's RandomResizedCrop.get_params, batched: up to `tries` draws of an area fraction (uniform in
    `scale`) and a log aspect ratio (uniform in log `ratio`), w and h rounded to whole pixels; the first draw
    that fits is taken, at a uniform whole-pixel position; if none fits, the central crop of torchvision's
    fallback. Every sample makes all draws, so the work is fixed and the draws per sample are too.
    """
    u = torch.rand(n, tries + 1, 2, generator=generator, device=device, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :tries, 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, :tries, 1]
    w = torch.sqrt(area * torch.exp(log_ratio)).round()  # half to even, as Python's round
    h = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)                            # (n, tries)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    in_ratio = width / height  # the fallback: the whole image, or its centre at the nearest allowed ratio
    fallback_w = width if in_ratio <= max(ratio) else round(height * max(ratio))
    fallback_h = height if in_ratio >= min(ratio) else round(width / min(ratio))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    x0 = torch.where(found, (u[:, tries, 0] * (width - w + 1)).floor(), (width - w) // 2)
    y0 = torch.where(found, (u[:, tries, 1] * (height - h + 1)).floor(), (height - h) // 2)
    return torch.stack([x0, y0, w, h], dim=1).float()


def crop_resize_flip(images, boxes, flip, out_size, interpolation="bilinear"):
    """Crop each box, resize it to out_size and mirror it where flip, as torchvision's resized_crop does on
    PIL images (enlarging): a horizontal pass, then a vertical one, each rounded to whole numbers 0-255 as
    PIL's 8-bit passes are. Bilinear gives PIL's pixels; bicubic comes within one grey level of them (PIL's
    bicubic weights are fixed-point numbers).

    images: float (n, C, H, W) of whole numbers 0-255; boxes: (n, 4) (x0, y0, w, h) whole pixels; flip: bool
    (n,) -> float (n, C, out, out) of whole numbers. A box whose size equals out_size reproduces the slice.
    """
    if interpolation == "bicubic":
        out = _resize_bicubic(images, boxes, out_size)
        return torch.where(flip[:, None, None, None], out.flip(-1), out)
    n, _, height, width = images.shape
    steps = torch.arange(out_size, device=images.device, dtype=images.dtype) + 0.5
    centres = lambda size: (2 * torch.arange(size, device=images.device, dtype=images.dtype) + 1) / size - 1

    def along(start, length, size):  # each output pixel's place in grid_sample's coordinates (n, out)
        place = start[:, None] + steps * (length[:, None] / out_size) - 0.5  # in pixel indexes
        # PIL resizes the cropped image, so it never reads outside the box: at the box's edges its two taps
        # become one, which is the place clamped to the edge pixel's centre
        place = torch.minimum(torch.maximum(place, start[:, None]), (start + length - 1)[:, None])
        return (2 * place + 1) / size - 1

    x0, y0, w, h = boxes.to(images.dtype).unbind(1)
    grid_x = along(x0, w, width)
    grid_x = torch.where(flip[:, None], grid_x.flip(-1), grid_x)
    across = torch.stack([grid_x[:, None, :].expand(-1, height, -1),
                          centres(height)[None, :, None].expand(n, -1, out_size)], dim=-1)  # (n, H, out, 2)
    rows = _round_pixels(F.grid_sample(images, across, mode="bilinear", padding_mode="border",
                                       align_corners=False))                              # (n, C, H, out)
    down = torch.stack([centres(out_size)[None, None, :].expand(n, out_size, -1),
                        along(y0, h, height)[:, :, None].expand(-1, -1, out_size)], dim=-1)  # (n, out, out, 2)
    return _round_pixels(F.grid_sample(rows, down, mode="bilinear", padding_mode="border", align_corners=False))


def _round_pixels(x):
    """To whole numbers 0-255, halves up, as PIL's 8-bit resampling passes round."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def _pil_bicubic_matrix(start, length, in_size, out_size):
    """PIL's bicubic resize (a = -0.5) of the spans [start, start + length) of rows of in_size pixels onto
    out_size pixels, when enlarging, as float64 matrices (n, out_size, in_size) of 4 taps per row.

    As PIL resizing a cropped image: taps on pixels outside the span's pixels are dropped and the rest
    renormalised. (When shrinking, PIL widens the filter; this does not.)
    """
    steps = torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5
    centre = start.double()[:, None] + steps * (length.double() / out_size)[:, None]     # (n, out) pixels
    index = (centre - 0.5).floor()[..., None] + torch.arange(-1, 3, device=start.device)  # (n, out, 4)
    weight = _cubic_kernel(index + 0.5 - centre[..., None], a=-0.5)
    low, high = start.double().floor(), (start.double() + length.double()).ceil().clamp(max=in_size)
    weight = weight * ((index >= low[:, None, None]) & (index < high[:, None, None]))
    weight = weight / weight.sum(-1, keepdim=True)
    matrix = weight.new_zeros(len(start), out_size, in_size)
    return matrix.scatter_add_(2, index.clamp(0, in_size - 1).long(), weight)


def _resize_bicubic(images, boxes, out_size):
    """Each box of each image resized to out_size with PIL's bicubic: a horizontal pass, then a vertical one,
    each rounded to whole numbers in 0-255 as PIL's 8-bit passes are -> (n, C, out, out).

    Two small matmuls per image in float64: in float32 a CUDA matmul may run in TF32, whose 10-bit mantissa
    would move values by a tenth of a grey level."""
    _, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    along_width = _pil_bicubic_matrix(x0, w, width, out_size)                            # (n, out, W)
    along_height = _pil_bicubic_matrix(y0, h, height, out_size)                          # (n, out, H)
    rows = _round_pixels(images.double() @ along_width.transpose(1, 2)[:, None])      # (n, C, H, out)
    return _round_pixels(along_height[:, None] @ rows).to(images.dtype)


# RandAugment, per sample on the device. timm's rand_augment_transform runs on one PIL image at a time and
# torchvision's RandAugment draws one op for a whole batch, so neither fits a batch on the GPU. This keeps
# timm's policy (parsed by timm itself: op list, magnitude, its noise and cap, layer count, probability) and
# timm's magnitude-to-argument rules, and applies the ops to a batch with tensor ops: every sample draws its
# own ops, magnitudes, signs and (for the geometric ops) bilinear or bicubic filter, as timm draws them.
# Images are float tensors holding whole numbers 0-255 (what a uint8 holds, converted once per layer).
# Each colour op: x (n, C, H, W), level = magnitude / 10 (n,), sign = -1 or +1 (n,) -> (n, C, H, W).
# Each geometric op: the parameter of affine_coefficients it sets, and that parameter from level and sign.

def _column(values):
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _truncate(values):
    """PIL's float -> uint8: clip to 0-255, drop the fraction."""
    return values.clamp_(0, 255).floor_()


def _blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), truncated."""
    return _truncate(degenerate + _column(factor) * (x - degenerate))


def _luma(x):
    """PIL's convert("L"), exact: (n, 3, H, W) -> (n, 1, H, W)."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _color_degenerate(x):
    return _luma(x).expand_as(x)


def _contrast_degenerate(x):
    return _luma(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()  # PIL: int(mean + 0.5)


def _smooth(x):
    """PIL's SMOOTH filter (3x3: 1 around, 5 in the middle, / 13, rounded) inside, border pixels kept.

    Sums of whole numbers are exact in float32, and sum / 13 is never a tie, so the rounding matches PIL's.
    """
    box = F.avg_pool2d(x, 3, stride=1, divisor_override=1)  # 3x3 sums
    smoothed = x.clone()
    smoothed[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1]).div_(13).round_()
    return smoothed


def _enhance_ops(name, degenerate):
    def decreasing(x, level, sign):  # factor in [0.1, 1.9], grows with the level
        return _blend(degenerate(x), x, level * 1.8 + 0.1)

    def increasing(x, level, sign):  # factor 1 -/+ up to 0.9, farther from 1 with the level
        return _blend(degenerate(x), x, (1.0 + sign * level * 0.9).clamp(min=0.1))
    return {name: decreasing, name + "Increasing": increasing}


def _posterize(x, bits):
    step = _column(2.0 ** (8 - bits.clamp(0, 8)))
    return (x / step).floor_().mul_(step)


def _solarize(x, threshold):
    return torch.where(x >= _column(threshold), 255 - x, x)


def _solarize_add(x, add):
    return torch.where(x < 128, (x + _column(add)).clamp_(max=255), x)


def _solarize_level(level):
    return (level * 256).floor().clamp(max=256)


def _autocontrast(x, level, sign):
    """PIL's ImageOps.autocontrast: each channel stretched from its min-max to 0-255, in PIL's arithmetic."""
    low, high = x.amin(dim=(2, 3), keepdim=True).double(), x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(high, 255.0) / (high - low).clamp(min=1)  # a true division, as PIL (not 255 * 1/d)
    stretched = _truncate(x.double() * scale - low * scale).float()
    return torch.where(high > low, stretched, x)


def _equalize(x, level, sign):
    from torchvision.transforms.v2 import functional as TF
    return TF.equalize(x.to(torch.uint8)).float()


RANDAUG_COLOR_OPS = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda x, level, sign: 255 - x,
    "Posterize": lambda x, level, sign: _posterize(x, (level * 4).floor()),
    "PosterizeIncreasing": lambda x, level, sign: _posterize(x, 4 - (level * 4).floor()),
    "Solarize": lambda x, level, sign: _solarize(x, _solarize_level(level)),
    "SolarizeIncreasing": lambda x, level, sign: _solarize(x, 256 - _solarize_level(level)),
    "SolarizeAdd": lambda x, level, sign: _solarize_add(x, (level * 110).floor().clamp(max=128)),
    **_enhance_ops("Color", _color_degenerate),
    **_enhance_ops("Contrast", _contrast_degenerate),
    **_enhance_ops("Brightness", torch.zeros_like),
    **_enhance_ops("Sharpness", _smooth),
}

RANDAUG_AFFINE_OPS = {
    "Rotate": ("degrees", lambda level, sign, height, width: sign * level * 30.0),
    "ShearX": ("shear_x", lambda level, sign, height, width: sign * level * 0.3),
    "ShearY": ("shear_y", lambda level, sign, height, width: sign * level * 0.3),
    "TranslateXRel": ("translate_x", lambda level, sign, height, width: sign * level * 0.45 * width),
    "TranslateYRel": ("translate_y", lambda level, sign, height, width: sign * level * 0.45 * height),
}


def affine_coefficients(height, width, degrees, shear_x, shear_y, translate_x, translate_y):
    """PIL's affine coefficients (n, 6) of timm's geometric ops, from per-sample parameters (n,) each.

    A sample sets at most one parameter (the rest 0), as one op of a layer: PIL's Image.rotate(degrees) about
    the centre (counter-clockwise), its shear (x + shear_x y, shear_y x + y) or translation. With the others
    0 the terms cancel exactly, so each op gets exactly its own coefficients. The rotation is computed as
    Image.rotate computes it (angle mod 360, cos and sin rounded to 15 decimals), so the source points agree
    with PIL's up to float rounding.
    """
    angle = -torch.deg2rad(torch.remainder(degrees.to(torch.float64), 360.0))
    cos, sin = torch.round(angle.cos(), decimals=15), torch.round(angle.sin(), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    return torch.stack([cos, sin + shear_x, (cos * -cx + sin * -cy + 0.0) + cx + translate_x,
                        -sin + shear_y, cos, (-sin * -cx + cos * -cy + 0.0) + cy + translate_y], dim=1)


@functools.lru_cache(maxsize=8)
def _pixel_centres(height, width, device):
    """u, v (H, W) each: the centre of each pixel, in pixels from the top-left corner."""
    v, u = torch.meshgrid(torch.arange(height, device=device) + 0.5, torch.arange(width, device=device) + 0.5,
                          indexing="ij")
    return u, v


def _cubic_kernel(t, a):
    """The cubic convolution kernel at distances t: PIL's bicubic uses a = -0.5 to resize, a = -1 for affine
    transforms (Geometry.c)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def _cubic_weights(d):
    """PIL's bicubic for affine transforms: weights of the taps at offsets -1, 0, 1, 2 from the floor, at
    fraction d (...) -> (..., 4)."""
    return _cubic_kernel(torch.stack([d + 1, d, d - 1, d - 2], dim=-1), a=-1.0)


def _bicubic(x, source_x, source_y):
    """x (n, C, H, W) float sampled at the source points (n, H, W) with PIL's bicubic; edge pixels repeated."""
    n, channels, height, width = x.shape
    start_x, start_y = (source_x - 0.5).floor(), (source_y - 0.5).floor()
    wx = _cubic_weights((source_x - 0.5 - start_x).float())                             # (n, H, W, 4)
    wy = _cubic_weights((source_y - 0.5 - start_y).float())
    offsets = torch.arange(-1, 3, device=x.device)
    ix = (start_x.long()[..., None] + offsets).clamp_(0, width - 1)                     # (n, H, W, 4)
    iy = (start_y.long()[..., None] + offsets).clamp_(0, height - 1)
    flat, out = x.flatten(2), x.new_zeros(n, channels, height * width)
    for j in range(4):  # tap by tap, summed in place: no (n, C, H, W, 16) intermediate, no matmul (TF32 on CUDA)
        for i in range(4):
            index = (iy[..., j] * width + ix[..., i]).flatten(1)[:, None].expand(-1, channels, -1)
            out.addcmul_(flat.gather(2, index), (wy[..., j] * wx[..., i]).flatten(1)[:, None])
    return out.view(n, channels, height, width)


def warp_affine(x, coefficients, fill=128, bicubic=None):
    """Resample each image with PIL's affine convention and filters (bilinear, or bicubic where `bicubic`),
    `fill` outside.

    x: (n, C, H, W) whole numbers 0-255; coefficients: (n, 6) = (a, b, c, d, e, f): the output pixel centred
    at (u, v), in pixels from the top-left corner, takes the input at (a u + b v + c, d u + e v + f).
    bicubic: (n,) bool or None (all bilinear). Within one grey level of PIL's, which works in float64.
    """
    n, channels, height, width = x.shape
    u, v = _pixel_centres(height, width, x.device)
    # elementwise, not a matmul: on CUDA a matmul may run in TF32, whose 10-bit mantissa would move the
    # source points by hundredths of a pixel
    a, b, c, d, e, f = coefficients.to(torch.float64)[:, :, None, None].unbind(1)   # (n, 1, 1) each
    source_x, source_y = a * u + b * v + c, d * u + e * v + f                          # (n, H, W) pixels
    grid = torch.stack([source_x / width, source_y / height], dim=-1).float() * 2 - 1  # align_corners=False
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if bicubic is not None:
        warped = torch.where(bicubic[:, None, None, None], _bicubic(x, source_x, source_y), warped)
    # as PIL: a source point inside the image interpolates its nearest pixels (edge pixels repeated), one
    # outside takes the fill
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    warped = torch.where(inside[:, None], warped, float(fill))
    # truncated as PIL's; the 1e-3 keeps float noise from turning 7.0 into 6
    return _truncate(warped.add_(1e-3))


def _pil_posterize(image, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: a black image, as Pillow gave before it began to refuse 0 bits."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def randaug_policy(config, fill=128):
    """timm's RandAugment transform for a policy string, or a UserError naming the string.

    Pillow 13 refuses ImageOps.posterize(image, 0) (12.3 allowed it), which timm's PosterizeIncreasing asks for at
    magnitude 10 (rand-m9-mstd0.5 gets there in 2 % of its draws), so its posterize ops get one that doesn't.
    """
    from timm.data import rand_augment_transform
    try:
        policy = rand_augment_transform(config, {"img_mean": (fill,) * 3})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        detail = f" ({e})" if str(e) else ""
        raise UserError(f"--randaug {config!r} is not a timm RandAugment policy such as "
                        f"rand-m9-mstd0.5-inc1{detail}") from None
    for op in policy.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _pil_posterize
    return policy


class DeviceRandAugment:
    """timm's RandAugment policy (e.g. "rand-m9-mstd0.5-inc1"), per sample on a batch on `device`."""

    def __init__(self, config, fill=128, device=None):
        policy = randaug_policy(config, fill)
        self.names = [op.name for op in policy.ops]
        unknown = [name for name in self.names if name not in RANDAUG_COLOR_OPS and name not in RANDAUG_AFFINE_OPS]
        if unknown:
            raise UserError(f"--randaug {config!r}: the device loader has no {', '.join(unknown)}; "
                            "use --loader torch for it")
        op = policy.ops[0]
        resample = op.kwargs["resample"]
        resample = list(resample) if isinstance(resample, (list, tuple)) else [resample]
        if any(mode not in (Image.BILINEAR, Image.BICUBIC) for mode in resample):
            raise UserError(f"--randaug {config!r}: the device loader has bilinear and bicubic filters only; "
                            "use --loader torch")
        self.bicubic_share = resample.count(Image.BICUBIC) / len(resample)  # timm draws one per op call
        self.fill, self.num_layers, self.prob = fill, policy.num_layers, op.prob
        self.magnitude, self.magnitude_std = float(op.magnitude), float(op.magnitude_std)
        self.magnitude_max = float(op.magnitude_max or 10)
        self.weights = None if policy.choice_weights is None else torch.as_tensor(policy.choice_weights,
                                                                                   device=device)
        if self.weights is not None and self.num_layers > len(self.names):
            raise UserError(f"--randaug {config!r}: {self.num_layers} layers from {len(self.names)} weighted ops")

    def draw(self, n, generator, device):
        """Per-sample choices for every layer: op index (n, L) (-1: skipped), level and sign (n, L) float64."""
        layers = self.num_layers
        if self.weights is None:  # timm: np.random.choice with replacement, or without it when weighted
            ops = torch.randint(len(self.names), (n, layers), generator=generator, device=device)
        else:
            ops = torch.multinomial(self.weights.expand(n, -1), layers, replacement=False, generator=generator)
        u = torch.rand(n, layers, 4, generator=generator, device=device, dtype=torch.float64)
        gauss = torch.randn(n, layers, generator=generator, device=device, dtype=torch.float64)
        ops = torch.where(u[..., 0] < self.prob, ops, -1)           # timm: skip when random() > prob
        sign = torch.where(u[..., 1] > 0.5, -1.0, 1.0).to(torch.float64)  # timm: negate when random() > 0.5
        if math.isinf(self.magnitude_std):
            magnitude = u[..., 2] * self.magnitude
        else:
            magnitude = self.magnitude + self.magnitude_std * gauss
        level = magnitude.clamp(0, self.magnitude_max) / 10
        bicubic = u[..., 3] < self.bicubic_share  # timm: random.choice(resample) per op call; a share of 0 or 1: fixed
        return ops, level, sign, bicubic

    def apply(self, x, ops, level, sign, bicubic=None):
        """x (n, C, H, W) whole numbers 0-255, uint8 or float, with the drawn choices -> float, the same kind.

        bicubic (n, L) bool: the filter of each image's geometric op in each layer (None: bilinear).
        """
        x = x.float()
        n, _, height, width = x.shape
        for layer in range(ops.shape[1]):
            op, lv, sg = ops[:, layer], level[:, layer], sign[:, layer]
            out, warped = x, None
            zero = torch.zeros_like(lv)
            params = {slot: zero for slot, _ in RANDAUG_AFFINE_OPS.values()}
            for index, name in enumerate(self.names):
                chosen = op == index
                if name in RANDAUG_AFFINE_OPS:
                    slot, value = RANDAUG_AFFINE_OPS[name]
                    params[slot] = torch.where(chosen, value(lv, sg, height, width), params[slot])
                    warped = chosen if warped is None else warped | chosen
                else:
                    out = torch.where(chosen[:, None, None, None], RANDAUG_COLOR_OPS[name](x, lv, sg), out)
            if warped is not None:  # one resampling for every geometric op of the layer
                coefficients = affine_coefficients(height, width, **params)
                filters = None if bicubic is None else bicubic[:, layer]
                out = torch.where(warped[:, None, None, None], warp_affine(x, coefficients, self.fill, filters), out)
            x = out
        return x

    def __call__(self, x, generator):
        return self.apply(x, *self.draw(len(x), generator, x.device))


def normalize(images):
    """uint8 or 0-255 float (N, C, H, W) -> float in [-1, 1] (mean 0.5, std 0.5 per channel, as the original)."""
    return images.float().div(127.5).sub(1.0)


def denormalize(images):
    """[-1, 1] -> [0, 1], for pictures."""
    return (images.float() * 0.5 + 0.5).clamp(0, 1)


def random_erase(images, prob, generator, area=(0.02, 1 / 3), min_aspect=0.3, attempts=10):
    """timm's RandomErasing(mode="pixel"), per sample and batched: normalised (n, C, H, W) -> the same.

    (timm's own loops over the batch in Python, one image at a time; torchvision's erases one box per batch.)

    With probability `prob` an image gets one rectangle of per-pixel N(0, 1) noise: area fraction uniform in
    `area`, log aspect uniform in [log min_aspect, -log min_aspect], the first of `attempts` draws that fits
    (none fits: no erasing), top-left corner uniform over the places where it fits, as timm draws them.
    """
    n, _, height, width = images.shape
    device = images.device
    erase = torch.rand(n, generator=generator, device=device) < prob
    u = torch.rand(n, attempts, 4, generator=generator, device=device, dtype=torch.float64)
    target = (area[0] + (area[1] - area[0]) * u[..., 0]) * height * width
    aspect = torch.exp(math.log(min_aspect) * (1 - 2 * u[..., 1]))
    box_h, box_w = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # round half to even
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits
    erase &= fits.any(dim=1)
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)                               # (n, 1)
    top = (u[..., 2].gather(1, first) * (height - box_h + 1)).floor()
    left = (u[..., 3].gather(1, first) * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    in_rows = (rows >= top) & (rows < top + box_h)                                            # (n, H)
    in_cols = (cols >= left) & (cols < left + box_w)                                          # (n, W)
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]                 # (n, H, W)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside[:, None], noise, images)


# ---------------------------------------------------------------------------------------------- loaders

class BatchOrder:
    """Which images each optimizer step takes: a permutation per epoch, the global batch split over ranks."""

    def __init__(self, num_images, batch_size, *, train, generator, rank=0, world_size=1):
        self.num_images, self.batch_size, self.train = num_images, batch_size, train
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.local_batch = batch_size // world_size

    def __len__(self):
        # training drops the last partial batch (a different one each epoch), so every step has equal weight
        if self.train:
            return self.num_images // self.batch_size
        return math.ceil(math.ceil(self.num_images / self.world_size) / self.local_batch)

    def new_epoch(self):
        """The order of this epoch: a permutation (training, on the generator's device) or 0..N-1."""
        if self.train:
            return torch.randperm(self.num_images, generator=self.generator, device=self.generator.device)
        return torch.arange(self.num_images, device=self.generator.device)

    def steps(self, order, start=0):
        """Yields this rank's index tensor for each step from `start`."""
        if self.train:  # step s takes the global batch order[s*B:(s+1)*B]; this rank its own slice of it
            for s in range(start, len(self)):
                begin = s * self.batch_size + self.rank * self.local_batch
                yield order[begin:begin + self.local_batch]
        else:
            shard = order[self.rank::self.world_size]
            for s in range(start, len(self)):
                idx = shard[s * self.local_batch:(s + 1) * self.local_batch]
                if len(idx):  # a shorter shard may run out one step early
                    yield idx


class DeviceLoader:
    """The whole dataset as uint8 on the device; batches are gathered, augmented and normalised there.

    Augmentation is per sample: random-resized-crop with area in `crop_scale` (None: no crop), drawn and
    resized with `interpolation` as torchvision's RandomResizedCrop does on PIL images (crop_resize_flip), a
    horizontal flip with probability 0.5, a timm RandAugment policy (`randaug`, None: off), normalisation, then random
    erasing with probability `reprob`, in that order (as timm's training transforms), all drawn from this
    loader's own generator.
    """

    def __init__(self, images, labels, batch_size, *, device, train, seed=0, crop_scale=None, flip=False,
                 randaug=None, reprob=0.0, interpolation="bilinear", rank=0, world_size=1):
        self.images, self.labels = images.to(device), labels.to(device)
        self.image_size = images.shape[-1]
        self.crop_scale, self.flip = (tuple(crop_scale) if crop_scale else None), flip
        self.interpolation = interpolation
        self.randaug = DeviceRandAugment(randaug, device=device) if randaug else None
        self.reprob = reprob
        self.order_generator = torch.Generator(device=device)
        self.order_generator.manual_seed(seed)  # the same on every rank: one permutation split over ranks
        self.aug_generator = torch.Generator(device=device)
        self.aug_generator.manual_seed(seed + 1 + rank)
        self.order = BatchOrder(len(images), batch_size, train=train, generator=self.order_generator,
                                rank=rank, world_size=world_size)

    def __len__(self):
        return len(self.order)

    def augment(self, images):
        """uint8 (n, C, H, W) -> augmented, 0-255 (n, C, H, W): float after a crop or RandAugment, else uint8."""
        n, _, height, width = images.shape
        boxes = None
        if self.crop_scale is not None:
            boxes = sample_crop_boxes(n, height, width, self.crop_scale, generator=self.aug_generator,
                                      device=images.device)
        if self.flip:
            flip = torch.rand(n, generator=self.aug_generator, device=images.device) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=images.device)
        if boxes is not None:
            images = crop_resize_flip(images.float(), boxes, flip, self.image_size, self.interpolation)
        elif self.flip:  # flip only: a mirror, no resampling
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.randaug is not None:  # its ops work on whole numbers 0-255, which the crop gives, as PIL's does
            images = self.randaug(images, self.aug_generator)
        return images

    def batches(self, order, start=0):
        """Yields (images (n, C, H, W) normalised float, labels (n,)) per step, from step `start`."""
        for idx in self.order.steps(order, start):
            images = self.images[idx]
            if self.crop_scale is not None or self.flip or self.randaug is not None:
                images = self.augment(images)
            images = normalize(images)
            if self.reprob:
                images = random_erase(images, self.reprob, self.aug_generator)
            yield images, self.labels[idx]

    def state_dict(self):
        return {"order": self.order_generator.get_state(), "aug": self.aug_generator.get_state()}

    def load_state_dict(self, state):
        """-> the names of the streams whose saved state does not fit (load_generator_state)."""
        missed = [] if load_generator_state(self.order_generator, state["order"]) else ["order"]
        # "aug" is absent when the checkpoint came from --loader torch
        if "aug" in state and not load_generator_state(self.aug_generator, state["aug"]):
            missed.append("augmentation")
        return missed


def load_generator_state(generator, state):
    """Set a generator's saved state when it is of this generator's kind -> whether it was. A device loader's
    generators live on the device, and a CUDA generator's state (16 bytes) does not fit a CPU one (5056), nor
    the other way round: a run resumed on another kind of device starts those streams afresh."""
    if state.numel() != generator.get_state().numel():
        return False
    generator.set_state(state)
    return True


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as PIL images through torchvision transforms: the plain, per-sample path.

    An item is (index, seed). With a seed, the transform's random draws (torchvision's from torch, timm's
    from numpy and Python's random) come from those RNGs seeded with it, so a sample's augmentation
    depends neither on the worker process nor on the number of workers. In the main process
    (num_workers 0) the three RNG states are put back afterwards: training keeps its own streams.
    """

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, seed = item
        image = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        if seed is None:
            return self.transform(image), self.labels[i]
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:
            saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        try:
            return self.transform(image), self.labels[i]
        finally:
            if in_main:
                torch.default_generator.set_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


# Ctrl-C, a scheduler's kill, and the hang-up of a terminal (an SSH session that drops): each asks a run to save
# (Windows has no SIGHUP: the others, rather than an AttributeError at import)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _worker_ignores_stop_signals(worker_id):
    """DataLoader workers leave STOP_SIGNALS to the main process, which finishes its step, saves and shuts them
    down: a Ctrl-C in a terminal reaches every process of the group, and a forked worker would otherwise run
    StopRequest's handler too (its message printed once per worker), or under spawn die on KeyboardInterrupt
    while the main process still waits for its batch."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class TorchLoader:
    """torchvision DataLoader with PIL transforms and worker processes (the original repository's way).

    Training samples are augmented from seeds of their own: each epoch draws one number from this loader's
    generator, and image i of that epoch gets that number + i. A resumed run (the epoch's number is in
    state_dict) repeats the augmentation of an uninterrupted one, whatever --num_workers.
    """

    def __init__(self, images, labels, batch_size, *, device, train, seed=0, crop_scale=None, flip=False,
                 randaug=None, reprob=0.0, interpolation="bilinear", num_workers=0, rank=0, world_size=1):
        from torchvision import transforms
        steps = []
        if crop_scale:
            steps.append(transforms.RandomResizedCrop(images.shape[-1], scale=tuple(crop_scale),
                                                      interpolation=transforms.InterpolationMode(interpolation)))
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        if randaug:
            steps.append(randaug_policy(randaug))
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
        if reprob:
            from timm.data.random_erasing import RandomErasing
            steps.append(RandomErasing(reprob, mode="pixel", device="cpu"))
        self.dataset = ArrayDataset(images.cpu(), labels.cpu(), transforms.Compose(steps))
        self.device, self.num_workers = device, num_workers
        self.augmented = len(steps) > 2  # more than ToTensor and Normalize
        self.order_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator().manual_seed(seed + 1 + rank)  # one draw per epoch
        self.epoch_seed = None
        self.order = BatchOrder(len(images), batch_size, train=train, generator=self.order_generator,
                                rank=rank, world_size=world_size)

    def __len__(self):
        return len(self.order)

    def batches(self, order, start=0):
        """As DeviceLoader.batches; start 0 begins a new epoch (a new epoch seed), start > 0 resumes one."""
        if self.augmented and (start == 0 or self.epoch_seed is None):
            self.epoch_seed = int(torch.randint(2 ** 62, (), generator=self.sample_generator))
        seed = self.epoch_seed if self.augmented else None
        batch_sampler = [[(i, None if seed is None else seed + i) for i in idx.tolist()]
                         for idx in self.order.steps(order, start)]
        # the DataLoader draws a base seed for its workers when it starts: from a generator of its own, not from
        # torch's global one, which a resumed epoch would then draw from once more than an uninterrupted one
        # (drop path draws from it); the samples are seeded one by one anyway
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda", persistent_workers=False,
                                             generator=torch.Generator(), worker_init_fn=_worker_ignores_stop_signals)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def state_dict(self):
        return {"order": self.order_generator.get_state(), "samples": self.sample_generator.get_state(),
                "epoch_seed": self.epoch_seed}

    def load_state_dict(self, state):
        """-> the names of the streams whose saved state does not fit (a device loader's on a GPU)."""
        missed = [] if load_generator_state(self.order_generator, state["order"]) else ["order"]
        if "samples" in state:  # absent when the checkpoint came from --loader device (or an older version)
            self.sample_generator.set_state(state["samples"])
            self.epoch_seed = state["epoch_seed"]
        return missed


def progress_bar(iterable=None, **kwargs):
    """tqdm's bar on stderr, cleared when done. On a terminal it redraws up to once a second; into a file or a
    pipe (`nohup python mae_pretrain.py > run.log 2>&1`) once a minute, since every redraw stays in the log
    (at tqdm's default of ten a second, about 60 MB a day of carriage-return lines)."""
    interval = 1.0 if sys.stderr.isatty() else 60.0
    return tqdm(iterable, leave=False, dynamic_ncols=True, mininterval=interval, **kwargs)


def eval_batches(loader, rt, desc):
    """One pass over an unaugmented loader, in dataset order, under a progress bar on the main process that
    clears itself (a pass takes a second on a GPU, minutes on a CPU)."""
    return progress_bar(loader.batches(loader.order.new_epoch()), total=len(loader), desc=desc,
                        disable=not rt.is_main)


def make_loader(args, rt, images, labels, batch_size, *, train, crop_scale=None, flip=False, randaug=None,
                reprob=0.0):
    """The loader that --loader names, for one split (augmentation for training only)."""
    common = dict(device=rt.device, train=train, seed=args.seed, crop_scale=crop_scale if train else None,
                  flip=flip and train, randaug=randaug if train else None, reprob=reprob if train else 0.0,
                  interpolation=args.interpolation, rank=rt.rank, world_size=rt.world_size)
    if args.loader == "torch":
        return TorchLoader(images, labels, batch_size, num_workers=args.num_workers, **common)
    return DeviceLoader(images, labels, batch_size, **common)


# ---------------------------------------------------------------------------------------------- schedule

def lr_at(step, peak_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup to peak_lr, then cosine to min_lr.

    Step 0 gets peak_lr / warmup_steps, step warmup_steps - 1 and step warmup_steps get peak_lr,
    step total_steps gets min_lr.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Apply lr to every group, times the group's lr_scale (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(param_groups, lr, rt, betas=(0.9, 0.999)):
    """AdamW (fused on CUDA) over groups that carry their own weight decay (and lr_scale)."""
    fused = rt.device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


# ---------------------------------------------------------------------------------------------- training

class StopRequest:
    """STOP_SIGNALS ask the run to finish its step, save and exit 128 + the signal's number (SIGINT 130, SIGTERM
    143, SIGHUP 129); a second SIGINT aborts. `announce`: say so on stderr (the main rank; under torchrun every
    rank gets the signal)."""

    def __init__(self, announce=True):
        self.signum, self.announce = None, announce
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under nohup, whose whole point is to outlive the terminal
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(press Ctrl-C again to abort without saving)", file=sys.stderr)


@dataclass
class EpochState:
    """Where an epoch stands: its order, how many steps are done, the on-device sums so far."""
    order: torch.Tensor
    step: int = 0
    sums: torch.Tensor = None  # float64 [sum of loss * n, n, extra sums ...] on the device

    def state_dict(self, rt):
        """A collective under torchrun: the sums of every rank, added up (restore_training_state gives them all
        to rank 0), so a resume with any number of processes counts each image once."""
        return {"order": self.order.cpu(), "step": self.step, "sums": all_reduce_sum(self.sums, rt).cpu()}


class Trainer:
    """One optimizer step per global batch: micro-batches, averaged gradients, amp, clipping, EMA, lr.

    loss_fn(model, images, labels) -> (mean loss over the micro-batch, extra per-sample sums (k,) float).
    """

    def __init__(self, model, loss_fn, optimizer, lr_fn, rt, *, micro_batch, clip_grad=None, ema=None,
                 skip_nonfinite=0, num_extra=0):
        self.model, self.loss_fn, self.optimizer, self.lr_fn, self.rt = model, loss_fn, optimizer, lr_fn, rt
        self.micro_batch, self.clip_grad, self.ema = micro_batch, clip_grad, ema
        self.skip_nonfinite, self.skipped, self.num_extra = skip_nonfinite, 0, num_extra
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # CUDA graphs (CUDAGRAPH_MODES) reuse their output memory on every replay, so with gradient
        # accumulation autograd must not adopt a graph's output as .grad: gradients live in tensors of our own,
        # summed into in place, and each micro-batch starts a new graph step
        self.cudagraphs = rt.compile and rt.compile_mode in CUDAGRAPH_MODES
        if self.cudagraphs:
            for p in self.params:
                p.grad = torch.zeros_like(p)
        self.compile_seconds = None
        self.epoch = None  # set by run_epoch, for messages

    def step(self, images, labels, step):
        """One optimizer step on this rank's share of the global batch -> sums (2 + k,) float64 on the device.

        `step` is the 0-based global step (it sets the lr); messages count steps from 1.
        """
        set_lr(self.optimizer, self.lr_fn(step))
        total = images.shape[0]
        chunks = list(zip(images.split(self.micro_batch), labels.split(self.micro_batch)))
        sums = torch.zeros(2 + self.num_extra, dtype=torch.float64, device=images.device)
        for i, (x, y) in enumerate(chunks):
            sync = not self.rt.distributed or i == len(chunks) - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.rt.autocast():
                    loss, extra = self.loss_fn(self.model, x, y)
                # mean over the global batch = sum of micro-batch means weighted by their share
                scaled = loss * (x.shape[0] / total)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            # device-side sums only: adding Python numbers launches kernels, it copies nothing to the host
            sums[0] += loss.detach().double() * x.shape[0]
            sums[1] += x.shape[0]
            if self.num_extra:
                sums[2:] += extra.double().reshape(-1)
        # every rank takes the same decision: gradients were averaged over all of them
        if self.skip_nonfinite and not torch.isfinite(all_reduce_sum(sums[:1], self.rt)).item():
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
            if self.skipped > self.skip_nonfinite:
                raise NonFiniteLoss(self.epoch, step + 1)
            print(f"warning: skipped optimizer step {step + 1} (non-finite loss), {self.skipped} of "
                  f"{self.skip_nonfinite} allowed", file=sys.stderr)
            return sums.zero_()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))  # ema = decay * ema + (1 - decay) * live, from the first step
        return sums

    def run_epoch(self, loader, state, *, epoch, first_step, log_interval, stop, desc, show):
        """Train one epoch from state.step. -> dict of epoch metrics, or None when a stop was requested.

        first_step is the global optimizer step of this epoch's step 0. Losses stay on the device and are
        read back every log_interval steps (and at the end), which is also when non-finite losses stop it.
        """
        steps, self.epoch = len(loader), epoch
        if state.sums is None:
            state.sums = torch.zeros(2 + self.num_extra, dtype=torch.float64, device=self.rt.device)
        with progress_bar(total=steps, initial=state.step, desc=desc, disable=not show) as bar:
            # closed (and cleared) on every way out, errors included
            start_time, timed_images, timed_from = time.perf_counter(), 0, state.step
            for images, labels in loader.batches(state.order, state.step):
                state.sums += self.step(images, labels, first_step + state.step)
                state.step += 1
                timed_images += images.shape[0] * self.rt.world_size
                if self.rt.compile and self.compile_seconds is None:  # compile time kept out of images/s
                    synchronize(self.rt.device)
                    self.compile_seconds = time.perf_counter() - start_time
                    start_time, timed_images, timed_from = time.perf_counter(), 0, state.step
                bar.update(1)
                if state.step % log_interval == 0 or state.step == steps:
                    totals = all_reduce_sum(state.sums, self.rt).tolist()
                    if not math.isfinite(totals[0]):
                        raise NonFiniteLoss(epoch, first_step + state.step)
                    bar.set_postfix(loss=f"{totals[0] / max(totals[1], 1):.4f}",
                                    lr=f"{self.lr_fn(first_step + state.step - 1):.2e}")
                if self.stop_requested(stop, state.step, log_interval, steps):
                    return None
        synchronize(self.rt.device)
        seconds = time.perf_counter() - start_time
        totals = all_reduce_sum(state.sums, self.rt).tolist()
        metrics = {"loss": totals[0] / max(totals[1], 1), "images": int(totals[1]),
                   "lr": self.lr_fn(first_step + steps - 1), "seconds": seconds,
                   # None (JSON null) when no step was timed: the epoch's only step compiled, or a resume after its
                   # last step
                   "images_per_s": timed_images / seconds if state.step > timed_from else None}
        metrics["extra_sums"] = totals[2:]
        return metrics

    def train_epoch(self, model, loader, state, *, epoch, total_epoch, log_interval, stop):
        """Train epoch `epoch` (0-based) from `state` (a fresh one when None). -> (metrics or None, state)."""
        state = state or EpochState(loader.order.new_epoch())
        model.train()
        metrics = self.run_epoch(loader, state, epoch=epoch + 1, first_step=epoch * len(loader),
                                 log_interval=log_interval, stop=stop, desc=f"epoch {epoch + 1}/{total_epoch}",
                                 show=self.rt.is_main)
        return metrics, state

    def stop_requested(self, stop, step, log_interval, steps):
        if not self.rt.distributed:
            return stop.signum is not None
        if step % log_interval and step != steps:
            return False  # ranks agree on stopping only where they already sync
        flag = torch.tensor([0 if stop.signum is None else stop.signum], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item()) or None
        return stop.signum is not None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unwrap(model):
    """The plain module behind DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def wrap_model(model, rt):
    """DDP under torchrun, then torch.compile when on."""
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index]
                                                          if rt.device.type == "cuda" else None)
    if rt.compile:
        model = torch.compile(model, mode=rt.compile_mode)
    return model


# the micro-batch on the CPU unless --max_device_batch_size is given: ViT-T/2 pretraining takes about 23 MB of host
# memory per image (measured: 12.3 GiB at 512), so the GPU default of 1024 was killed by the kernel's OOM killer on
# a 24 GiB machine, without a word; 64 takes 2.5 GiB (the classifier's 3.3 GiB) at the same images/s
CPU_MICRO_BATCH = 64


def split_batch(args, rt, even=False):
    """(local batch per rank, micro-batch) with the checks gradient accumulation needs.

    A --max_device_batch_size given is used as it is; the default is a ceiling (CPU_MICRO_BATCH on the CPU), and
    the micro-batch is the largest divisor of the batch per process under it (an even one if `even` and there is
    one: mixup pairs the images of a micro-batch)."""
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of the number of processes "
                        f"({rt.world_size})")
    local = args.batch_size // rt.world_size
    if "max_device_batch_size" not in getattr(args, "given_flags", ["max_device_batch_size"]):
        ceiling = args.max_device_batch_size if rt.device.type == "cuda" else \
            min(args.max_device_batch_size, CPU_MICRO_BATCH)
        divisors = [d for d in range(1, min(ceiling, local) + 1) if local % d == 0]
        return local, max([d for d in divisors if d % 2 == 0] if even and local % 2 == 0 else divisors)
    micro = min(args.max_device_batch_size, local)
    if local % micro:
        raise UserError(f"--batch_size {args.batch_size} ({local} per process) is not a multiple of the "
                        f"micro-batch {micro} (--max_device_batch_size); pick sizes that divide")
    return local, micro


# ---------------------------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path, write):
    """write(f) into a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the previous complete file or the new one, never a torn one. A write
    that fails (a full disk) is a UserError with exit code 1 that says so. A symbolic link (a checkpoint linked
    to a larger disk) is written through: the file it points to is replaced, and the link stays.
    """
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from a shared group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            before = "the file that was there is unchanged" if os.path.exists(path) else "nothing was written"
            raise UserError(f"could not write {path} ({e.strerror or e}); {before}", code=1) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


LEGACY_HELP = ("it is a whole pickled model (torch.save(model)) like the original repository wrote; loading it "
               "would run code stored in the file, so it is refused. If you trust the file, convert it once with "
               "`python tools/convert_legacy.py {path} converted.pth --execute_pickled_code`")


def load_checkpoint(path, kind=None, what="checkpoint"):
    """Load a checkpoint of this project with weights_only=True; a clear UserError for anything else."""
    if path and os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a checkpoint file")
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise UserError(f"{what} {path}: " + LEGACY_HELP.format(path=path)) from None
        raise UserError(f"{what} {path} cannot be read safely: not a checkpoint of this project") from None
    except Exception:
        raise UserError(f"{what} {path} cannot be read: the file is truncated or not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{what} {path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag)")
    if kind is not None and ckpt.get("kind") != kind:
        names = {"mae_pretrain": "an MAE pretraining", "classifier": "a classifier"}
        raise UserError(f"{what} {path} is {names.get(ckpt.get('kind'), repr(ckpt.get('kind')))} checkpoint, "
                        f"but {names[kind]} checkpoint is needed here")
    return ckpt


def training_state(trainer, loader, rt, args, epoch_state=None, ema=None, data=None):
    """What --resume needs beyond the weights, as plain values and tensors (a collective under torchrun);
    data: the data_info of what the run trains on, which a resume compares (note_resumed_data)."""
    return {"data": data, "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch_state": epoch_state.state_dict(rt) if epoch_state is not None else None,
            "rng": rng_state(rt, loader), "args": plain_args(args), "world_size": rt.world_size, "cwd": os.getcwd()}


def restore_training_state(ckpt, model, trainer, loader, rt, ema=None):
    """Load what training_state saved (and the weights). -> (completed epochs, EpochState or None)."""
    model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scaler is not None and ckpt["scaler"]:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"], rt, loader)
    saved = ckpt["epoch_state"]
    if saved is None:
        return ckpt["epoch"], None
    if len(saved["order"]) != loader.order.num_images:  # the epoch goes on through the same permutation
        raise UserError(f"the checkpoint was saved in the middle of an epoch over {len(saved['order'])} training "
                        f"images, and there are {loader.order.num_images} now: resume it on the data it was "
                        "trained on")
    sums = saved["sums"] if rt.rank == 0 else torch.zeros_like(saved["sums"])  # all ranks' sums: rank 0 holds them
    return ckpt["epoch"], EpochState(saved["order"].to(rt.device), saved["step"], sums.to(rt.device))


def note_resumed_data(ckpt, data, path):
    """A resumed run goes on with whatever --data_dir holds now; say so when those are other images than the
    ones it trained on (moving the same data elsewhere is fine: the fingerprint is of the pixels)."""
    saved = ckpt.get("data")
    if saved and data and saved["fingerprint"] != data["fingerprint"]:
        print(f"note: {data['dir']} holds other data than {path} was trained on ({saved['dir']}: fingerprint "
              f"{saved['fingerprint']}, now {data['fingerprint']}); the resumed epochs train on the data there now",
              file=sys.stderr)


def plain_args(args):
    """argparse values as plain types, safe for weights_only checkpoints."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


def rng_state(rt, loader):
    """Every RNG stream a run draws from, as tensors and plain values; gathered from all ranks."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss],
             "loader": loader.state_dict()}
    if rt.distributed:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, state)
        return gathered
    return [state]


def set_rng_state(states, rt, loader):
    if len(states) != rt.world_size:
        # the epochs' order is drawn alike on every rank, so it goes on; the per-rank streams cannot
        missed = loader.load_state_dict({"order": states[0]["loader"]["order"]})
        print(f"warning: the checkpoint holds RNG states of {len(states)} processes, this run has "
              f"{rt.world_size}; the order of the images goes on, the other random streams (augmentation, masks, "
              "dropout) start afresh", file=sys.stderr)
        note_missed_streams(missed, rt)
        return
    state = states[rt.rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    note_missed_streams(loader.load_state_dict(state["loader"]), rt)


def note_missed_streams(missed, rt):
    if missed and rt.is_main:
        print(f"warning: the data loader's random streams in the checkpoint ({', '.join(missed)}) come from a run "
              f"on another kind of device; they start afresh on {rt.device.type}, so from here on the order and "
              "augmentation of the images differ from an uninterrupted run's", file=sys.stderr)


# settings a resumed run takes from its checkpoint unless given again: they change speed or rounding only, or
# (data_dir) where the data is found, so that `--resume PATH` alone goes on with the run's own data, and the same
# data moved to another folder can be named
SOFT_RESUME_KEYS = ["max_device_batch_size", "amp", "compile", "compile_mode", "loader", "num_workers", "log_interval",
                    "skip_nonfinite", "save_every", "data_dir"]


def checkpoint_due(args, epoch):
    """Whether the resumable checkpoint is written after `epoch` epochs (a stop writes one as well)."""
    return epoch % args.save_every == 0 or epoch == args.total_epoch


def stop_reason(args, epoch, clock, rt):
    """Why the run stops after `epoch` (1-based) epochs of its schedule, or None when it goes on (or is done):
    --stop_after_epoch, or --stop_after_minutes when one more epoch, as long as the mean one so far, would end
    past it. Rank 0's clock decides for every rank."""
    if epoch >= args.total_epoch:
        return None
    if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
        return "as asked"
    if args.stop_after_minutes is None:
        return None
    gone, epoch_seconds = clock.gone(), clock.epoch_seconds()
    reason = None
    if gone + epoch_seconds > args.stop_after_minutes * 60:
        reason = (f"since another epoch (about {format_duration(epoch_seconds)}) would end past "
                  f"--stop_after_minutes {args.stop_after_minutes:g} ({format_duration(gone)} gone)")
    if rt.distributed:
        box = [reason]
        dist.broadcast_object_list(box, src=0)
        reason = box[0]
    return reason


SIZES_FROM_CHECKPOINT = "drop the flag: the model's sizes come from the checkpoint"  # hint for --eval_only


def resolve_resume_args(args, parser, saved_args, keys, what="the checkpoint being resumed", soft_keys=(),
                        hint="drop the flag (or start a new run to change it)"):
    """Take a checkpoint's value of each key (a resumed run keeps its settings, a pretrained encoder its
    sizes); a flag of `keys` given with a different value is an error rather than a silent change, while a
    flag of `soft_keys` given explicitly simply wins. What was given: args.given_flags (ArgumentParser), else
    the flags whose value is not the default."""
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    given_flags = getattr(args, "given_flags", None)
    for key in list(keys) + list(soft_keys):
        default, current = parser.get_default(key), getattr(args, key)
        saved = saved_args.get(key, default)
        given = key in given_flags if given_flags is not None else norm(current) != norm(default)
        if given and norm(current) != norm(saved):
            if key in soft_keys:
                continue
            raise UserError(f"--{key} {current} conflicts with {what}, which has {saved}; {hint}")
        setattr(args, key, saved)


PATH_KEYS = ["data_dir", "log_dir", "model_path", "output_model_path", "pretrained_model_path", "export_timm"]


def check_run_folder(args, ckpt, own_checkpoint):
    """A run resumed from its own checkpoint (own_checkpoint: its path as the run named it) but from another
    working folder would take the relative paths in its checkpoint (data, checkpoint, logs) to mean the new
    folder: it would look for its data there and write a second, split copy of its checkpoints and logs. That
    is refused with the folder to go to, unless each such path is given again. A copy of the run elsewhere (its
    checkpoint not in the old place) is a run of its own and goes on where it is."""
    started_in = ckpt.get("cwd")  # absent in checkpoints from before it was saved
    if not started_in or os.path.abspath(started_in) == os.getcwd() or \
            os.path.abspath(os.path.join(started_in, own_checkpoint)) != os.path.abspath(args.resume):
        return
    given = set(getattr(args, "given_flags", None) or ())
    taken = {key: getattr(args, key) for key in PATH_KEYS if key in ckpt["args"] and key not in given}
    relative = [f"--{key} {path}" for key, path in taken.items() if path and not os.path.isabs(path)]
    if relative:
        raise UserError(f"{args.resume} is a run started in {started_in}, whose paths are relative to it "
                        f"({', '.join(relative)}); resume it from there (cd {shlex.quote(started_in)}), or give those "
                        "flags")


def data_dir_from(args, ckpt, path):
    """A job that starts from a saved model (--eval_only, --pretrained_model_path, tools/reconstruct.py) and is
    given no --data_dir takes the data its run trained on: a relative path means the folder that run started in
    (or, for a run's folder copied elsewhere, this one). -> a note for the user, or None. Where that data is gone,
    the default stays, and the note says so."""
    saved = ckpt.get("args", {}).get("data_dir")  # absent in best-weights files from before it was saved
    if not saved or "data_dir" in getattr(args, "given_flags", ["data_dir"]):
        return None
    for folder in dict.fromkeys([os.path.join(ckpt.get("cwd") or "", saved), saved]):  # join keeps an absolute one
        if os.path.exists(folder):
            if os.path.abspath(folder) == os.path.abspath(args.data_dir):
                return None
            args.data_dir = folder
            return f"note: no --data_dir given: using {folder}, the data {path} was trained on"
    if os.path.normpath(saved) == os.path.normpath(args.data_dir):  # the default, missing: its own error follows
        return None
    return f"note: no --data_dir given, and the data {path} was trained on ({saved}) is not there: using " \
           f"{args.data_dir}"


def timm_vit_kwargs(config, num_classes, global_pool):
    """timm.create_model keyword arguments of the VisionTransformer that a model config describes."""
    return dict(img_size=config["image_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
                embed_dim=config["emb_dim"], depth=config["encoder_layer"], num_heads=config["encoder_head"],
                num_classes=num_classes, global_pool=global_pool)


def write_timm_state(state, kwargs, path):
    """Save a state_dict for timm's VisionTransformer and print the create_model call that loads it."""
    save_atomic(state, path)
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {path}; load it with:\n  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, "
          f"{call})\n  model.load_state_dict(torch.load({path!r}, weights_only=True))")


def auto_resume(args, path):
    """--resume auto: resume from `path`, the run's own checkpoint, when it is there; else start afresh.
    -> True when it starts afresh: logs already in the log dir are then this job's, from an attempt that ended
    before its first checkpoint (preempted with --save_every N), and may be replaced."""
    if args.resume != "auto":
        return False
    args.resume = path if os.path.isfile(path) else None
    return args.resume is None


def check_new_file(path, flag, overwrite):
    """An output that can be written and does not replace a file by accident (a typo could name a checkpoint)."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
    check_writable(path, flag)


def check_export_path(args, run_outputs=(), resumed_export=None):
    """--export_timm names a new file (or --overwrite), and none the run itself writes (run_outputs), which the
    export at the end would replace. A resumed run's own export (resumed_export: the checkpoint's --export_timm)
    may be there already: a finished run resumed again writes it again."""
    if args.export_timm is None:
        return
    if os.path.realpath(args.export_timm) in map(os.path.realpath, run_outputs):  # links: as write_atomic
        raise UserError(f"--export_timm {args.export_timm} names this run's own checkpoint; give another file (the "
                        "export is written at the end)")
    own = resumed_export is not None and os.path.realpath(resumed_export) == os.path.realpath(args.export_timm)
    check_new_file(args.export_timm, "--export_timm", args.overwrite or own)


def last_checkpoint_path(path):
    """Where the full training state lives beside a classifier's best-weights file: name-last.pth."""
    root, ext = os.path.splitext(path)
    return f"{root}-last{ext or '.pth'}"


_held_locks = []  # [file descriptor, lock file, folders made for it] of lock_output, released by cli_main
LOCKED_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK)  # flock's "held by another"; ENOLCK and the like: no locks


def lock_output(path, flag, is_dir=False):
    """Hold an exclusive lock on an output (a checkpoint, or a log dir with is_dir) until the command ends, so
    that a second run given the same one stops with one line instead of both writing it: a sweep started with
    `&` under one default name, a job started twice, a resume of a run that is still going.

    The lock is flock on a hidden file beside the checkpoint (.NAME.lock) or in the log dir (.lock), so it also
    holds between machines on a shared file system that has locks. The kernel drops it with the process: a
    run killed with -9 leaves a lock file that the next run takes over. A file system without locks, and
    Windows, go unchecked. Folders made for the lock file are removed again if they are empty at the end.
    """
    if fcntl is None:
        return
    target = os.path.realpath(path)  # a symbolic link: the file written (write_atomic)
    folder = target if is_dir else os.path.dirname(target)
    lock_path = os.path.join(folder, ".lock" if is_dir else f".{os.path.basename(target)}.lock")
    made, missing = [], folder  # check_writable has found the nearest existing folder writable
    while not os.path.isdir(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    held = [None, None, made]
    _held_locks.append(held)  # released at the end whatever happens below, so the folders made go again
    try:
        os.makedirs(folder, exist_ok=True)
        fd, holder = _flock(lock_path)
    except OSError as e:  # a full disk
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})", code=1) from None
    if holder is not None:
        raise UserError(f"{flag} {path} is being written by another run ({holder or 'starting'}); wait for it to "
                        f"end, stop it, or give this run another {flag}")
    if fd is None:  # no locks on this file system: go on unchecked
        return
    held[:2] = fd, lock_path
    with contextlib.suppress(OSError):  # who holds it, for the message of a run that finds it taken
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, started "
                     f"{datetime.now().astimezone().strftime('%Y-%m-%d %H:%M')}\n".encode())


def _flock(lock_path):
    """Open lock_path (made if missing) and take flock on it without waiting -> (fd, None) when taken; (None,
    what the file says of its holder) when another process holds it; (None, None) without locks."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file in a shared folder: flock needs no write access
            fd = os.open(lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 1000).decode(errors="replace").strip() if e.errno in LOCKED_ERRNOS else None
            os.close(fd)
            return None, holder
        try:  # the previous holder may have removed the file between open and flock: lock the one at the path
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd, None
        except FileNotFoundError:
            pass
        os.close(fd)


def release_output_locks():
    """Release lock_output's locks, remove their files and the folders made for them that stayed empty."""
    while _held_locks:
        fd, lock_path, made = _held_locks.pop()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # before the lock goes, so a run that opened it retries (samestat)
            os.close(fd)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def claim_outputs(args, path, flag, restarting, beside=()):
    """On the main process, before anything is written: the checkpoint `path` (with the files `beside` it, which
    the run also writes) and args.log_dir can be written, no other running run writes them (locked until the
    command ends), and a new run does not replace another run's (check_fresh_output, check_fresh_log_dir)."""
    check_writable(path, flag)
    check_writable(args.log_dir, "--log_dir", is_dir=True)
    lock_output(path, flag)
    lock_output(args.log_dir, "--log_dir", is_dir=True)
    for output in (path, *beside):
        check_fresh_output(output, args, flag)
    check_fresh_log_dir(args.log_dir, args, restarting)


def check_fresh_output(path, args, flag):
    if os.path.isfile(path) and not args.resume and not args.overwrite:  # a folder: check_writable says so
        raise UserError(f"{flag} {path} already exists; pass --resume {shlex.quote(path)} to continue that run or "
                        "--overwrite to start over")


def check_fresh_log_dir(log_dir, args, restarting=False):
    """A new run does not wipe the logs of another: MetricsLog restarts metrics.jsonl and TensorBoard's curves.
    restarting: --resume auto found no checkpoint, so the logs there are the same job's (auto_resume)."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if os.path.isfile(path) and os.path.getsize(path) and not (args.resume or args.overwrite or restarting):
        raise UserError(f"--log_dir {log_dir} already holds the logs of a run (metrics.jsonl); pass --overwrite to "
                        "replace them, --resume CHECKPOINT to continue that run, or another --log_dir")


# ---------------------------------------------------------------------------------------------- logging

def source_version():
    """The git commit of this code, with "-dirty" when tracked files differ from it; None outside a checkout."""
    root = os.path.dirname(os.path.abspath(__file__))
    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def run_info(args, rt, data=None):
    """What one start of a job ran: when, the command, every setting, the code and software, the hardware, and
    which data (data: its data_info)."""
    import timm
    info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
            "args": plain_args(args), "commit": source_version(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else rt.device.type,
            "processes": rt.world_size, "amp": rt.amp,
            "compile": rt.compile}
    if data is not None:
        info["data"] = data
    return info


def data_info(data_dir, data):
    """Where the data came from, its sizes, and a fingerprint of its decoded pixels, labels and class names:
    equal for equal data whatever the files' format, so two runs can tell whether they trained on the same
    images (the JPEG copy of CIFAR-10 and the original batches differ)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(tensor.cpu().contiguous().numpy())
    digest.update(json.dumps(list(data.classes)).encode())
    return {"dir": os.path.abspath(data_dir), "name": dataset_name(data_dir), "train_images": len(data.train_images),
            "test_images": len(data.test_images), "classes": len(data.classes), "fingerprint": digest.hexdigest()}


def read_json_lines(path):
    """The records of a JSON-lines log. A line that does not parse is left out: only the last can be one, torn
    by a crash or a full disk in the middle of its write."""
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def write_log(path, text, mode="a"):
    """Append (or with mode "w", write) text to a log file; a failed write (a full disk) is a UserError with
    exit code 1, as a failed checkpoint write is."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the last checkpoint on disk is as it was",
                        code=1) from None


def _quiet_event_writer_failure(args, hook):
    """TensorBoard writes its events in a thread, which re-raises a failed write (a full disk) and so prints a
    traceback; MetricsLog raises the same error in the main thread as one line, so the thread's is left out.
    Every other thread failure goes to `hook`, the threading.excepthook that was in place."""
    if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
        hook(args)


def _quiet_event_writer_failures():
    """Put _quiet_event_writer_failure in front of the current threading.excepthook, once."""
    current = threading.excepthook
    if getattr(current, "func", None) is not _quiet_event_writer_failure:
        threading.excepthook = functools.partial(_quiet_event_writer_failure, hook=current)


class MetricsLog:
    """TensorBoard scalars/images plus one JSON line per epoch in log_dir/metrics.jsonl; main rank only.

    On resume after epoch k, TensorBoard events and JSON lines past epoch k (and a finished run's closing line)
    are discarded, so a resumed run's logs read as one run; `reported` says whether that closing line was there
    (TensorBoard keeps what was logged at step k, such as the closing images, so they are not logged again).
    log_dir/runs.jsonl gets one line per start of the job (run_info: the first start, then each resume), and
    TensorBoard the same as text. A write that fails (a full disk), of either, is a UserError with exit code 1.
    """

    def __init__(self, log_dir, rt, args, completed_epochs=0, resumed=False, data=None):
        self.writer, self.log_dir = None, log_dir
        self.reported = False  # whether the closing report of this run, up to completed_epochs, was logged
        if not rt.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        _quiet_event_writer_failures()
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        kept = []
        if completed_epochs and os.path.isfile(self.path):
            # the closing report of a finished run ("final": true) goes too: a resumed run writes its own, and a
            # run resumed after its last epoch (--resume auto once more) reports again rather than twice
            records = read_json_lines(self.path)
            kept = [json.dumps(record) + "\n" for record in records
                    if not record.get("final") and record.get("epoch", 0) <= completed_epochs]
            self.reported = any(record.get("final") and record.get("epoch") == completed_epochs
                                for record in records)
        write_log(self.path, "".join(kept), "w")
        with self.writing_events():
            self.writer = SummaryWriter(log_dir, purge_step=completed_epochs + 1)
        info = run_info(args, rt, data)
        write_log(os.path.join(log_dir, "runs.jsonl"), json.dumps(info) + "\n", "a" if resumed else "w")
        with self.writing_events():
            self.writer.add_text("run", "```\n" + json.dumps(info, indent=1) + "\n```", global_step=completed_epochs)

    @contextlib.contextmanager
    def writing_events(self):
        try:
            yield
        except OSError as e:  # raised here, or in the writer's thread and raised again by its next call
            raise UserError(f"could not write the TensorBoard events in {self.log_dir} ({e.strerror or e}); the "
                            "last checkpoint on disk is as it was", code=1) from None

    def scalars(self, values, epoch):
        if self.writer:
            with self.writing_events():
                for tag, value in values.items():
                    if value is not None:  # images_per_s of an epoch without a timed step
                        self.writer.add_scalar(tag, value, global_step=epoch)

    def image(self, tag, image, epoch):
        if self.writer:
            with self.writing_events():
                self.writer.add_image(tag, image, global_step=epoch)

    def line(self, record):
        if self.writer:
            write_log(self.path, json.dumps(record) + "\n")
            with self.writing_events():
                self.writer.flush()

    def close(self):
        if self.writer:
            with self.writing_events():
                self.writer.close()


class EpochClock:
    """Wall time per epoch (training, evaluation, checkpoint: all of it) and what it makes of the epochs left.

    The first epoch of a process is counted only while it is the only one: it holds the compile time.
    `started`: the perf_counter time the run began (default: now), for the time gone.
    """

    def __init__(self, started=None):
        self.seconds, self.last = [], time.perf_counter()
        self.started = self.last if started is None else started

    def lap(self):
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def epoch_seconds(self):
        """The mean epoch so far, the one under way (since the last lap) counted as if it ended now."""
        return self._steady_mean(self.seconds + [time.perf_counter() - self.last])

    def gone(self):
        """Seconds since the run began."""
        return time.perf_counter() - self.started

    def left(self, epochs):
        """', about 1h 14m left' for `epochs` more epochs, or '' when none are left."""
        if not epochs or not self.seconds:
            return ""
        return f", about {format_duration(self._steady_mean(self.seconds) * epochs)} left"

    @staticmethod
    def _steady_mean(laps):
        steady = laps[1:] or laps
        return sum(steady) / len(steady)


def format_rate(images_per_s):
    """An epoch's images/s for its printed line (None: no step of it was timed)."""
    return "images/s not timed" if images_per_s is None else f"{images_per_s:.0f} images/s"


def format_duration(seconds):
    """Seconds as its two largest units: '3d 4h', '1h 14m', '12m 5s', '45s'."""
    rest, parts = int(round(seconds)), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2]) or "0s"


def script_command(script_file):
    """How a command typed in the current folder names a script: its path from here (mae_pretrain.py when run
    in the repository, as the README does), else its absolute path; shell-quoted."""
    path = os.path.abspath(script_file)
    try:
        relative = os.path.relpath(os.path.realpath(path))  # as os.getcwd(): a checkout reached by a link counts
    except ValueError:  # another drive, on Windows
        relative = os.pardir
    return shlex.quote(path if relative.startswith(os.pardir) else relative)


def resume_command(script, path, rt, device=None):
    """The command that goes on with a run from its checkpoint (which holds its settings and --data_dir). The
    --device the run was given is not among them (a resume may move to another machine): it is in the command
    (a sweep of one run per GPU, --device cuda:1, would otherwise resume on cuda:0)."""
    flags = f"--resume {shlex.quote(path)}" + (f" --device {shlex.quote(device)}" if device else "")
    if not rt.distributed:
        return f"python {script} {flags}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if per_node == rt.world_size:
        return f"torchrun --nproc_per_node={per_node} {script} {flags}"
    return f"torchrun {script} {flags} on every node, with this run's launch options"


def exit_after_signal(path, command, signum, rt, log):
    """After the checkpoint of an interrupted run is written: say how to resume (command: resume_command's),
    exit 128 + signal number."""
    log.close()
    if rt.is_main:
        print(f"stopped; checkpoint saved to {path}. Resume with: {command}", file=sys.stderr)
    sys.exit(128 + signum)


# ---------------------------------------------------------------------------------------------- kNN monitor

@torch.no_grad()
def extract_features(forward, loader, rt, desc):
    """Features and labels of a whole split (no augmentation), gathered from all ranks in dataset order."""
    feats, labels = [], []
    for images, y in eval_batches(loader, rt, desc):
        with rt.autocast():
            feats.append(forward(images).float())
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if rt.distributed:  # shards are order[rank::world]: interleave them back
        sizes = [None] * rt.world_size
        dist.all_gather_object(sizes, feats.shape[0])
        width = max(sizes)
        pad = lambda t: torch.cat([t, t.new_zeros((width - t.shape[0],) + t.shape[1:])])
        all_f = [torch.empty_like(pad(feats)) for _ in sizes]
        all_y = [torch.empty_like(pad(labels)) for _ in sizes]
        dist.all_gather(all_f, pad(feats))
        dist.all_gather(all_y, pad(labels))
        feats = torch.stack(all_f, 1).flatten(0, 1)
        labels = torch.stack(all_y, 1).flatten(0, 1)
        keep = torch.stack([torch.arange(width, device=feats.device) < s for s in sizes], 1).flatten()
        feats, labels = feats[keep], labels[keep]
    return feats, labels


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=200, temperature=0.07,
                 chunk=1024):
    """Weighted kNN (InstDisc / MoCo monitor): cosine similarity, top-k neighbours voting exp(sim / T).

    Each query's votes are scaled by exp(-its top similarity / T), which changes no decision and keeps a small
    T from overflowing to inf (where every class would tie)."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())
        correct += (votes.argmax(dim=1) == test_labels[start:start + chunk]).sum()
    return float(correct) / test_feats.shape[0]


def knn_monitor(encoder, train_loader, test_loader, num_classes, rt, k=200, temperature=0.07):
    """kNN accuracy of the encoder's cls feature; no gradients, mode restored, no global RNG drawn."""
    was_training = encoder.training
    encoder.eval()
    try:
        forward = lambda x: encoder.forward_features(x)[:, 0]
        train = extract_features(forward, train_loader, rt, "kNN: training-set features")
        test = extract_features(forward, test_loader, rt, "kNN: test-set features")
        return knn_accuracy(*train, *test, num_classes, k=k, temperature=temperature)
    finally:
        encoder.train(was_training)
