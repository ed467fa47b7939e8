"""Training steps and epochs: optimizer steps with gradient accumulation (Trainer), an epoch's steps
(Trainer.train_epoch), when checkpoints are due and what stops a run (--stop_after_*, a non-finite loss); the
lifecycle (cifar_mae/lifecycle.py) runs the epochs."""
import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cifar_mae.console import format_duration, progress_bar
from cifar_mae.errors import NonFiniteLoss
from cifar_mae.optim import set_lr
from cifar_mae.runtime import all_reduce_sum, synchronize, unwrap

CUDAGRAPH_MODES = ["reduce-overhead", "max-autotune"]  # the torch.compile modes that add CUDA graphs


@dataclass
class EpochState:
    """Where an epoch stands: its order, how many steps are done, the on-device sums so far."""
    order: torch.Tensor
    step: int = 0
    sums: torch.Tensor = None  # float64 [sum of loss * n, n, extra sums ...] on the device

    def state_dict(self, rt):
        """A collective under torchrun: the sums of every rank, added up (restore_training_state gives them all
        to rank 0), so a resume with any number of processes counts each image once."""
        return {"order": self.order.cpu(), "step": self.step, "sums": all_reduce_sum(self.sums, rt).cpu()}


class Trainer:
    """One optimizer step per global batch: micro-batches, averaged gradients, amp, clipping, EMA, lr.

    loss_fn(model, images, labels) -> (mean loss over the micro-batch, extra per-sample sums (k,) float).
    after_step(step): what the model does after each optimizer step besides the EMA (MoCo's key encoder).
    """

    def __init__(self, model, loss_fn, optimizer, lr_fn, rt, *, micro_batch, clip_grad=None, ema=None,
                 skip_nonfinite=0, num_extra=0, after_step=None):
        self.model, self.loss_fn, self.optimizer, self.lr_fn, self.rt = model, loss_fn, optimizer, lr_fn, rt
        self.micro_batch, self.clip_grad, self.ema, self.after_step = micro_batch, clip_grad, ema, after_step
        self.skip_nonfinite, self.skipped, self.num_extra = skip_nonfinite, 0, num_extra
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # CUDA graphs (CUDAGRAPH_MODES) reuse their output memory on every replay, so with gradient
        # accumulation autograd must not adopt a graph's output as .grad: gradients live in tensors of our own,
        # summed into in place, and each micro-batch starts a new graph step
        self.cudagraphs = rt.compile and rt.compile_mode in CUDAGRAPH_MODES
        if self.cudagraphs:
            for p in self.params:
                p.grad = torch.zeros_like(p)
        self.compile_seconds = None
        self.epoch = None  # set by run_epoch, for messages

    def step(self, images, labels, step):
        """One optimizer step on this rank's share of the global batch -> sums (2 + k,) float64 on the device.

        `step` is the 0-based global step (it sets the lr); messages count steps from 1.
        """
        set_lr(self.optimizer, self.lr_fn(step))
        total = images.shape[0]
        chunks = list(zip(images.split(self.micro_batch), labels.split(self.micro_batch)))
        sums = torch.zeros(2 + self.num_extra, dtype=torch.float64, device=images.device)
        for i, (x, y) in enumerate(chunks):
            sync = not self.rt.distributed or i == len(chunks) - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.rt.autocast():
                    loss, extra = self.loss_fn(self.model, x, y)
                # mean over the global batch = sum of micro-batch means weighted by their share
                scaled = loss * (x.shape[0] / total)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            # device-side sums only: adding Python numbers launches kernels, it copies nothing to the host
            sums[0] += loss.detach().double() * x.shape[0]
            sums[1] += x.shape[0]
            if self.num_extra:
                sums[2:] += extra.double().reshape(-1)
        # every rank takes the same decision: gradients were averaged over all of them
        if self.skip_nonfinite and not torch.isfinite(all_reduce_sum(sums[:1], self.rt)).item():
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
            if self.skipped > self.skip_nonfinite:
                raise NonFiniteLoss(self.epoch, step + 1)
            print(f"warning: skipped optimizer step {step + 1} (non-finite loss), {self.skipped} of "
                  f"{self.skip_nonfinite} allowed", file=sys.stderr)
            return sums.zero_()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
        if self.ema is not None:
            self.ema.update(unwrap(self.model))  # ema = decay * ema + (1 - decay) * live, from the first step
        if self.after_step is not None:
            self.after_step(step)
        return sums

    def run_epoch(self, loader, state, *, epoch, first_step, log_interval, stop, desc, show):
        """Train one epoch from state.step. -> dict of epoch metrics, or None when a stop was requested.

        first_step is the global optimizer step of this epoch's step 0. Losses stay on the device and are
        read back every log_interval steps (and at the end), which is also when non-finite losses stop it.
        """
        steps, self.epoch = len(loader), epoch
        if state.sums is None:
            state.sums = torch.zeros(2 + self.num_extra, dtype=torch.float64, device=self.rt.device)
        with progress_bar(total=steps, initial=state.step, desc=desc, disable=not show) as bar:
            # closed (and cleared) on every way out, errors included
            start_time, timed_images, timed_from = time.perf_counter(), 0, state.step
            for images, labels in loader.batches(state.order, state.step):
                state.sums += self.step(images, labels, first_step + state.step)
                state.step += 1
                timed_images += images.shape[0] * self.rt.world_size
                if self.rt.compile and self.compile_seconds is None:  # compile time kept out of images/s
                    synchronize(self.rt.device)
                    self.compile_seconds = time.perf_counter() - start_time
                    start_time, timed_images, timed_from = time.perf_counter(), 0, state.step
                bar.update(1)
                if state.step % log_interval == 0 or state.step == steps:
                    totals = all_reduce_sum(state.sums, self.rt).tolist()
                    if not math.isfinite(totals[0]):
                        raise NonFiniteLoss(epoch, first_step + state.step)
                    bar.set_postfix(loss=f"{totals[0] / max(totals[1], 1):.4f}",
                                    lr=f"{self.lr_fn(first_step + state.step - 1):.2e}")
                if self.stop_requested(stop, state.step, log_interval, steps):
                    return None
        synchronize(self.rt.device)
        seconds = time.perf_counter() - start_time
        totals = all_reduce_sum(state.sums, self.rt).tolist()
        metrics = {"loss": totals[0] / max(totals[1], 1), "images": int(totals[1]),
                   "lr": self.lr_fn(first_step + steps - 1), "seconds": seconds,
                   # None (JSON null) when no step was timed: the epoch's only step compiled, or a resume after its
                   # last step
                   "images_per_s": timed_images / seconds if state.step > timed_from else None}
        metrics["extra_sums"] = totals[2:]
        return metrics

    def train_epoch(self, model, loader, state, *, epoch, total_epoch, log_interval, stop):
        """Train epoch `epoch` (0-based) from `state` (a fresh one when None). -> (metrics or None, state)."""
        state = state or EpochState(loader.order.new_epoch())
        model.train()
        metrics = self.run_epoch(loader, state, epoch=epoch + 1, first_step=epoch * len(loader),
                                 log_interval=log_interval, stop=stop, desc=f"epoch {epoch + 1}/{total_epoch}",
                                 show=self.rt.is_main)
        return metrics, state

    def stop_requested(self, stop, step, log_interval, steps):
        if not self.rt.distributed:
            return stop.signum is not None
        if step % log_interval and step != steps:
            return False  # ranks agree on stopping only where they already sync
        flag = torch.tensor([0 if stop.signum is None else stop.signum], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item()) or None
        return stop.signum is not None


def checkpoint_due(epoch, save_every, total_epoch):
    """Whether the resumable checkpoint is written after `epoch` epochs (a stop writes one as well)."""
    return epoch % save_every == 0 or epoch == total_epoch


def stop_reason(epoch, total_epoch, clock, rt, after_epoch=None, after_minutes=None):
    """Why the run stops after `epoch` (1-based) of its `total_epoch` epochs, or None when it goes on (or is done):
    after_epoch (--stop_after_epoch) is reached, or one more epoch, as long as the mean one so far, would end past
    after_minutes (--stop_after_minutes). Rank 0's clock decides for every rank."""
    if epoch >= total_epoch:
        return None
    if after_epoch is not None and epoch >= after_epoch:
        return "as asked"
    if after_minutes is None:
        return None
    gone, epoch_seconds = clock.gone(), clock.epoch_seconds()
    reason = None
    if gone + epoch_seconds > after_minutes * 60:
        reason = (f"since another epoch (about {format_duration(epoch_seconds)}) would end past "
                  f"--stop_after_minutes {after_minutes:g} ({format_duration(gone)} gone)")
    if rt.distributed:
        box = [reason]
        dist.broadcast_object_list(box, src=0)
        reason = box[0]
    return reason


class EpochClock:
    """Wall time per epoch (training, evaluation, checkpoint: all of it) and what it makes of the epochs left.

    The first epoch of a process is counted only while it is the only one: it holds the compile time.
    `started`: the perf_counter time the run began (default: now), for the time gone.
    """

    def __init__(self, started=None):
        self.seconds, self.last = [], time.perf_counter()
        self.started = self.last if started is None else started

    def lap(self):
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def epoch_seconds(self):
        """The mean epoch so far, the one under way (since the last lap) counted as if it ended now."""
        return self._steady_mean(self.seconds + [time.perf_counter() - self.last])

    def gone(self):
        """Seconds since the run began."""
        return time.perf_counter() - self.started

    def left(self, epochs):
        """', about 1h 14m left' for `epochs` more epochs, or '' when none are left."""
        if not epochs or not self.seconds:
            return ""
        return f", about {format_duration(self._steady_mean(self.seconds) * epochs)} left"

    @staticmethod
    def _steady_mean(laps):
        steady = laps[1:] or laps
        return sum(steady) / len(steady)
