"""Runs a training script that waits before one optimizer step until a stop signal has arrived, so a test's
signal lands at a known step on a machine of any speed:

    python tests/paused_run.py STEP READY_FILE SCRIPT [FLAGS ...]

Before the 0-based global optimizer step STEP it writes READY_FILE and waits (60 s at most) for SIGINT,
SIGTERM or SIGHUP; then the step runs and the script stops as it would on a signal anywhere else."""
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_mae import engine, stopping  # noqa: E402

step_at, ready, script = int(sys.argv[1]), sys.argv[2], sys.argv[3]
arrived = []
handle, train_step = stopping.StopRequest._handle, engine.Trainer.step


def recording_handle(self, signum, frame):
    arrived.append(signum)
    handle(self, signum, frame)


def waiting_step(self, images, labels, step):
    if step == step_at:
        open(ready, "w").close()
        deadline = time.monotonic() + 60
        while not arrived and time.monotonic() < deadline:
            time.sleep(0.01)
    return train_step(self, images, labels, step)


stopping.StopRequest._handle, engine.Trainer.step = recording_handle, waiting_step
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
