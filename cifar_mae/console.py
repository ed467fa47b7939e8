"""What a run prints: progress bars, rates and durations, and the commands it tells the user to type."""
import os
import shlex
import sys

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs):
    """tqdm's bar on stderr, cleared when done; redrawn once a second on a terminal, once a minute into a log file
    (each redraw stays in the file)."""
    interval = 1.0 if sys.stderr.isatty() else 60.0
    return tqdm(iterable, leave=False, dynamic_ncols=True, mininterval=interval, **kwargs)


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
