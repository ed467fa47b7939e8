"""What pretraining does with its masks beyond training: the loss of a micro-batch, the reconstruction figure,
and the held-out reconstruction loss, the last two from the same fixed masks at every call."""
import contextlib

import torch
from einops import rearrange

from cifar_mae.augment import denormalize
from cifar_mae.loaders import eval_batches
from cifar_mae.runtime import all_reduce_sum, evaluating, unwrap


def mae_loss(model, images, labels):
    """Pretraining loss of one micro-batch -> (loss, no extra sums)."""
    predicted, mask = model(images)
    return unwrap(model).loss(images, predicted, mask), images.new_zeros(0)


@contextlib.contextmanager
def fixed_masks(rt):
    """Masks drawn from seed 0 in a forked RNG: the same at every call, the training RNG streams untouched."""
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


@torch.no_grad()
def reconstruction_grid(model, images, rt):
    """Masked input | reconstruction with visible patches | original, in [0, 1]; the same masks every epoch."""
    with evaluating(model), fixed_masks(rt), rt.autocast():
        predicted, mask = model(images)
    reconstruction = model.reconstruct(images, predicted, mask)
    grid = torch.cat([images * (1 - mask), reconstruction, images], dim=0)
    pairs = 2 if len(images) % 2 == 0 else 1  # two images side by side per row when they pair up
    grid = rearrange(grid, "(v h1 w1) c h w -> c (h1 h) (w1 v w)", w1=pairs, v=3)
    return denormalize(grid)


@torch.no_grad()
def reconstruction_loss(model, loader, rt, mask_ratio):
    """Mean masked-patch loss over a split, every image weighted alike; masks from a fixed seed in a forked RNG."""
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss * images, images
    with evaluating(model), fixed_masks(rt):
        for images, _ in eval_batches(loader, rt, "test reconstruction loss"):
            with rt.autocast():
                predicted, mask = model(images, mask_ratio)
            sums[0] += model.loss(images, predicted, mask).double() * len(images)
            sums[1] += len(images)
    total, count = all_reduce_sum(sums, rt).tolist()
    return total / count
