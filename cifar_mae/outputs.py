"""What a run writes: outputs that can be written, are not another run's, and are locked while it runs; and
where a job on a saved model finds its data."""
import os
import shlex

from filelock import FileLock, Timeout

from cifar_mae.errors import UserError

_held_locks = []  # released by cli_main when the command ends


def check_writable(path, flag, is_dir=False):
    """Fail before any work, not after the data is read, when an output path cannot be written.

    Folders missing on the way are made and taken away again, the only sure test (a file system such as /proc
    refuses them to root as well); nothing is left behind.
    """
    target = os.path.realpath(path)  # where a symbolic link points: that folder is written (write_atomic)
    if not is_dir and os.path.isdir(target):
        raise UserError(f"{flag} {path} is a folder, not a file")
    if not is_dir and path.endswith(tuple(filter(None, (os.sep, os.altsep)))):  # realpath drops the slash
        raise UserError(f"{flag} {path} names a folder (it ends with {path[-1]}); give a file name")
    existing, missing = target if is_dir else os.path.dirname(target), []
    while not os.path.exists(existing):
        existing, missing = os.path.dirname(existing), [existing] + missing
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: cannot write there, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write to {existing} (permission denied)")
    made = []
    try:
        for folder in missing:
            os.mkdir(folder)
            made.append(folder)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder {folder} ({e.strerror or e})") from None
    finally:
        for folder in reversed(made):
            os.rmdir(folder)


def check_new_file(path, flag, overwrite):
    """An output that can be written and does not replace a file by accident (a typo could name a checkpoint)."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
    check_writable(path, flag)


def check_export_path(args, run_outputs=(), resumed_args=None):
    """Each export (--export_timm, --export_vil) names a new file (or --overwrite), and none the run itself writes
    (run_outputs), which the export at the end would replace. A resumed run's own export (resumed_args: the
    checkpoint's settings) may be there already: a finished run resumed again writes it again."""
    for name in ("export_timm", "export_vil"):
        path, flag = getattr(args, name, None), "--" + name
        if path is None:
            continue
        if os.path.realpath(path) in map(os.path.realpath, run_outputs):  # links: as write_atomic
            raise UserError(f"{flag} {path} names this run's own checkpoint; give another file (the export is "
                            "written at the end)")
        resumed = (resumed_args or {}).get(name)
        own = resumed is not None and os.path.realpath(resumed) == os.path.realpath(path)
        check_new_file(path, flag, args.overwrite or own)


def lock_output(path, flag):
    """Hold a lock (.NAME.lock beside the checkpoint) until the command ends, so that a second run given the same
    checkpoint (a job started twice, a resume of a run still going) stops with one line instead of both writing
    it. The kernel drops the lock with the process, so a run killed with -9 leaves nothing held."""
    target = os.path.realpath(path)  # a symbolic link: the file written (write_atomic)
    lock = FileLock(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock"))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{flag} {path} is being written by another run; wait for it to end, stop it, or give this "
                        f"run another {flag}") from None
    except OSError as e:  # a full disk
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})", code=1) from None
    _held_locks.append(lock)


def release_output_locks():
    while _held_locks:
        _held_locks.pop().release()


def claim_outputs(path, flag, log_dir, resume_path, *, resumed, overwrite, restarting, beside=()):
    """On the main process, before anything is written: the checkpoint `path` (with the files `beside` it, which
    the run also writes) and log_dir can be written, a new run does not replace another run's, and no other
    running run writes them (then it is locked); resume_path: the file that resumes it. resumed, overwrite: the
    run is resumed, or given --overwrite; restarting: --resume auto found no checkpoint (auto_resume)."""
    check_writable(path, flag)
    check_writable(log_dir, "--log_dir", is_dir=True)
    for output in (path, *beside):
        if os.path.isfile(output) and not resumed and not overwrite:  # a folder: check_writable says so
            raise UserError(f"{flag} {output} already exists; pass --resume {shlex.quote(resume_path)} to continue "
                            "that run or --overwrite to start over")
    check_fresh_log_dir(log_dir, resumed or overwrite or restarting)
    lock_output(path, flag)  # last: a refused start leaves no lock file


def check_fresh_log_dir(log_dir, may_replace):
    """A new run does not wipe the logs of another: MetricsLog restarts metrics.jsonl and TensorBoard's curves.
    may_replace: the run is resumed, given --overwrite, or --resume auto found no checkpoint, so the logs there are
    the same job's (auto_resume)."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if os.path.isfile(path) and os.path.getsize(path) and not may_replace:
        raise UserError(f"--log_dir {log_dir} already holds the logs of a run (metrics.jsonl); pass --overwrite to "
                        "replace them, --resume CHECKPOINT to continue that run, or another --log_dir")
