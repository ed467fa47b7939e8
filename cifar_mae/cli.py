"""The wrapper of every command's main(args): the errors a user can fix end in one line on stderr and an exit
code, and the process group and the output locks are released."""
import functools
import sys

import torch
import torch.distributed as dist

from cifar_mae.errors import NonFiniteLoss, UserError
from cifar_mae.outputs import release_output_locks


def cli_main(main):
    """Wrap a script's main(args): a UserError, NonFiniteLoss, out-of-memory or Ctrl-C outside training ends
    with one line on stderr and an exit code; the process group and the output locks are released."""

    @functools.wraps(main)
    def wrapper(args):
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
