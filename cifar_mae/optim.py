"""The optimizer and its learning rate, a pure function of the optimizer step (warmup, then cosine)."""
import functools
import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay


def lr_at(step, peak_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup to peak_lr, then cosine to min_lr.

    Step 0 gets peak_lr / warmup_steps, step warmup_steps - 1 and step warmup_steps get peak_lr,
    step total_steps gets min_lr.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Apply lr to every group, times the group's lr_scale (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model, weight_decay, no_weight_decay=(), layer_decay=None):
    """AdamW groups: weight decay on weight matrices only (none on biases, norms and the parameters named in
    no_weight_decay); with layer_decay < 1, timm's layer-wise learning-rate scales (the model's group_matcher)."""
    if layer_decay is not None and layer_decay < 1:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_weight_decay,
                                        layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay)


def make_optimizer(param_groups, lr, rt, betas=(0.9, 0.999), kind="adamw", momentum=0.9):
    """AdamW, or SGD with momentum (`kind`, --optimizer; fused on CUDA), over groups that carry their own weight
    decay (and lr_scale)."""
    fused = rt.device.type == "cuda"
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, fused=fused)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


def peak_lr(base_learning_rate, batch_size):
    """The linear scaling rule: base learning rate x batch size / 256."""
    return base_learning_rate * batch_size / 256


def schedule(peak, warmup_epoch, total_epoch, steps_per_epoch):
    """The learning rate of each optimizer step: warmup and length given in epochs, counted in optimizer steps."""
    return functools.partial(lr_at, peak_lr=peak, warmup_steps=warmup_epoch * steps_per_epoch,
                             total_steps=total_epoch * steps_per_epoch)
