"""The errors a run ends with: ones the user can fix, and a loss that is no longer finite."""
import contextlib


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): one line on stderr, no traceback."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def as_user_error(prefix="", suffix=""):
    """A ValueError raised inside (a model configuration that cannot work, say) ends the run as a UserError."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{prefix}{e}{suffix}") from None


class NonFiniteLoss(Exception):
    def __init__(self, epoch, step):
        where = f"in epoch {epoch} " if epoch is not None else ""
        super().__init__(f"non-finite loss {where}at optimizer step {step}; stopping without saving "
                         "(the last checkpoint on disk is the last good one). Lower the learning rate, pass "
                         "--skip_nonfinite N to skip a few bad steps, or, if it ran in fp16, use --amp bf16 (GPUs "
                         "from A100 / RTX 30xx on) or --amp off")
        self.epoch, self.step = epoch, step
