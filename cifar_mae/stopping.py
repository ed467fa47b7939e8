"""Stopping a run cleanly: the signals that ask it to save and exit, and the handler that records them."""
import signal
import sys


# Ctrl-C, a scheduler's kill, and the hang-up of a terminal (an SSH session that drops): each asks a run to save
# (Windows has no SIGHUP: the others, rather than an AttributeError at import)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


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
