"""What a run leaves in its log folder: TensorBoard scalars and images, metrics.jsonl (a line per epoch) and
runs.jsonl (a line per start of the job)."""
import contextlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

import torch

from cifar_mae.errors import UserError


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


def run_info(settings, rt, data=None):
    """What one start of a job ran: when, the command, every setting (a plain dict), the code and software, the
    hardware, and which data (data: its data_info)."""
    import timm
    info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
            "args": settings, "commit": source_version(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else rt.device.type,
            "processes": rt.world_size, "amp": rt.amp,
            "compile": rt.compile}
    if data is not None:
        info["data"] = data
    return info


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


class MetricsLog:
    """TensorBoard scalars/images plus one JSON line per epoch in log_dir/metrics.jsonl; main rank only.

    On resume after epoch k, TensorBoard events and JSON lines past epoch k (and a finished run's closing line)
    are discarded, so a resumed run's logs read as one run; `reported` says whether that closing line was there
    (TensorBoard keeps what was logged at step k, such as the closing images, so they are not logged again).
    log_dir/runs.jsonl gets one line per start of the job (run_info: the first start, then each resume), and
    TensorBoard the same as text. A write that fails (a full disk), of either, is a UserError with exit code 1.
    """

    def __init__(self, log_dir, rt, settings, completed_epochs=0, resumed=False, data=None):
        self.writer, self.log_dir = None, log_dir
        self.reported = False  # whether the closing report of this run, up to completed_epochs, was logged
        if not rt.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
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
        info = run_info(settings, rt, data)
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

    def text(self, tag, text, epoch):
        if self.writer:
            with self.writing_events():
                self.writer.add_text(tag, text, global_step=epoch)

    def line(self, record):
        if self.writer:
            write_log(self.path, json.dumps(record) + "\n")
            with self.writing_events():
                self.writer.flush()

    def close(self):
        if self.writer:
            with self.writing_events():
                self.writer.close()
