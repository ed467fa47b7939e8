"""The errors a user can fix, and the wrapper that turns them into one line on stderr and an exit code."""
import functools
import sys

import torch
import torch.distributed as dist


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


def cli_main(main):
    """Wrap a script's main(args): a UserError, NonFiniteLoss, out-of-memory or Ctrl-C outside training ends
    with one line on stderr and an exit code; the process group and the output locks are released."""

    @functools.wraps(main)
    def wrapper(args):
        from cifar_mae.outputs import release_output_locks
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
    return wrapper
