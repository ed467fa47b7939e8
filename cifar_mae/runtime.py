"""Where and how a run computes: device, processes under torchrun, precision, compile, seeds, micro-batches."""
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cifar_mae.errors import UserError
from cifar_mae.flags import check_seed, AMP_DTYPES


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


def setup_runtime(seed, device=None, amp=None, compile=None, compile_mode="default"):
    """Pick the device (None: cuda when there is one), join the process group under torchrun, seed every RNG with
    seed + rank, choose amp and compile (None: the device's defaults); the arguments are the flags of their names."""
    started = time.perf_counter()
    check_seed(seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    amp = amp or default_amp
    if amp != "off" and device.type != "cuda":
        raise UserError(f"--amp {amp} needs a CUDA device; use --amp off on {device.type}")
    use_compile = default_compile if compile is None else compile
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
    seed_everything(seed + rank)
    mode = None if compile_mode == "default" else compile_mode
    return Runtime(device, rank, world_size, amp_dtype, use_compile, mode, local_rank, started)


def note_devices(rt, asked, script):
    """Start-up notes on the device a run got without asking for one.

    On the CPU: torch sees no GPU, so a run meant for one (the defaults are) would take days; say why (a torch
    built without CUDA, or no GPU or driver it can use). On one GPU of several: name the torchrun command that
    uses them all. Not the first with --device cpu; not the second when --device names a GPU's index (cuda:1: a
    GPU picked on purpose, say one run per GPU). asked: --device, or None."""
    if asked is None and rt.device.type == "cpu":
        why = (f"this torch, {torch.__version__}, is built without CUDA" if torch.version.cuda is None else
               f"this torch, {torch.__version__} for CUDA {torch.version.cuda}, finds no GPU or no driver it can use")
        print(f"note: no CUDA device ({why}), so this runs on the CPU: fine for small models (README: 'Without a "
              "GPU: the CPU recipe'), days for the default ViT-T/2. --device cpu says this is meant and drops this "
              "note", file=sys.stderr)
    picked = asked is not None and torch.device(asked).index is not None
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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode inside the block (no drop path, BatchNorm's running statistics); the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
# memory per image, and 64 runs at the same images/s as larger ones
CPU_MICRO_BATCH = 64


def split_batch(batch_size, max_micro_batch, rt, gpu_micro_batch, even=False):
    """(local batch per rank, micro-batch) of --batch_size and --max_device_batch_size, with the checks gradient
    accumulation needs.

    A max_micro_batch given is used as it is. Not given (None), the micro-batch is the largest divisor of
    the batch per process up to gpu_micro_batch on a GPU and CPU_MICRO_BATCH on the CPU (an even one if `even`
    and there is one: mixup pairs the images of a micro-batch)."""
    if batch_size % rt.world_size:
        raise UserError(f"--batch_size {batch_size} must be a multiple of the number of processes "
                        f"({rt.world_size})")
    local = batch_size // rt.world_size
    if max_micro_batch is None:
        ceiling = gpu_micro_batch if rt.device.type == "cuda" else min(gpu_micro_batch, CPU_MICRO_BATCH)
        divisors = [d for d in range(1, min(ceiling, local) + 1) if local % d == 0]
        return local, max([d for d in divisors if d % 2 == 0] if even and local % 2 == 0 else divisors)
    micro = min(max_micro_batch, local)
    if local % micro:
        raise UserError(f"--batch_size {batch_size} ({local} per process) is not a multiple of the "
                        f"micro-batch {micro} (--max_device_batch_size); pick sizes that divide")
    return local, micro
