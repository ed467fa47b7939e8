"""Files written whole or not at all: a temporary file in the same folder, fsync, rename."""
import contextlib
import os
import tempfile

import torch

from cifar_mae.errors import UserError


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
