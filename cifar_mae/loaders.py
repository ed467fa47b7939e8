"""Batches for training and evaluation: the whole dataset on the device, augmented there (DeviceLoader), or
torchvision's DataLoader with PIL transforms in worker processes (TorchLoader)."""
import math
import random
import signal

import numpy as np
import torch
from PIL import Image

from cifar_mae.augment import crop_resize_flip, normalize, random_erase, sample_crop_boxes
from cifar_mae.console import progress_bar
from cifar_mae.errors import UserError
from cifar_mae.randaug import DeviceRandAugment, randaug_policy
from cifar_mae.stopping import STOP_SIGNALS


class BatchOrder:
    """Which images each optimizer step takes: a permutation per epoch, the global batch split over ranks."""

    def __init__(self, num_images, batch_size, *, train, generator, rank=0, world_size=1):
        self.num_images, self.batch_size, self.train = num_images, batch_size, train
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.local_batch = batch_size // world_size

    def __len__(self):
        # training drops the last partial batch (a different one each epoch), so every step has equal weight
        if self.train:
            return self.num_images // self.batch_size
        return math.ceil(math.ceil(self.num_images / self.world_size) / self.local_batch)

    def new_epoch(self):
        """The order of this epoch: a permutation (training, on the generator's device) or 0..N-1."""
        if self.train:
            return torch.randperm(self.num_images, generator=self.generator, device=self.generator.device)
        return torch.arange(self.num_images, device=self.generator.device)

    def steps(self, order, start=0):
        """Yields this rank's index tensor for each step from `start`."""
        if self.train:  # step s takes the global batch order[s*B:(s+1)*B]; this rank its own slice of it
            for s in range(start, len(self)):
                begin = s * self.batch_size + self.rank * self.local_batch
                yield order[begin:begin + self.local_batch]
        else:
            shard = order[self.rank::self.world_size]
            for s in range(start, len(self)):
                idx = shard[s * self.local_batch:(s + 1) * self.local_batch]
                if len(idx):  # a shorter shard may run out one step early
                    yield idx


class DeviceLoader:
    """The whole dataset as uint8 on the device; batches are gathered, augmented and normalised there.

    Augmentation is per sample: random-resized-crop with area in `crop_scale` (None: no crop), drawn and
    resized with `interpolation` as torchvision's RandomResizedCrop does on PIL images (crop_resize_flip), a
    horizontal flip with probability 0.5, a timm RandAugment policy (`randaug`, None: off), normalisation, then random
    erasing with probability `reprob`, in that order (as timm's training transforms), all drawn from this
    loader's own generator.
    """

    def __init__(self, images, labels, batch_size, *, device, train, seed=0, crop_scale=None, flip=False,
                 randaug=None, reprob=0.0, interpolation="bilinear", rank=0, world_size=1):
        self.images, self.labels = images.to(device), labels.to(device)
        self.image_size = images.shape[-1]
        self.crop_scale, self.flip = (tuple(crop_scale) if crop_scale else None), flip
        self.interpolation = interpolation
        self.randaug = DeviceRandAugment(randaug, device=device) if randaug else None
        self.reprob = reprob
        self.order_generator = torch.Generator(device=device)
        self.order_generator.manual_seed(seed)  # the same on every rank: one permutation split over ranks
        self.aug_generator = torch.Generator(device=device)
        self.aug_generator.manual_seed(seed + 1 + rank)
        self.order = BatchOrder(len(images), batch_size, train=train, generator=self.order_generator,
                                rank=rank, world_size=world_size)

    def __len__(self):
        return len(self.order)

    def augment(self, images):
        """uint8 (n, C, H, W) -> augmented, 0-255 (n, C, H, W): float after a crop or RandAugment, else uint8."""
        n, _, height, width = images.shape
        boxes = None
        if self.crop_scale is not None:
            boxes = sample_crop_boxes(n, height, width, self.crop_scale, generator=self.aug_generator,
                                      device=images.device)
        if self.flip:
            flip = torch.rand(n, generator=self.aug_generator, device=images.device) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=images.device)
        if boxes is not None:
            images = crop_resize_flip(images.float(), boxes, flip, self.image_size, self.interpolation)
        elif self.flip:  # flip only: a mirror, no resampling
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.randaug is not None:  # its ops work on whole numbers 0-255, which the crop gives, as PIL's does
            images = self.randaug(images, self.aug_generator)
        return images

    def batches(self, order, start=0):
        """Yields (images (n, C, H, W) normalised float, labels (n,)) per step, from step `start`."""
        for idx in self.order.steps(order, start):
            images = self.images[idx]
            if self.crop_scale is not None or self.flip or self.randaug is not None:
                images = self.augment(images)
            images = normalize(images)
            if self.reprob:
                images = random_erase(images, self.reprob, self.aug_generator)
            yield images, self.labels[idx]

    def state_dict(self):
        return {"order": self.order_generator.get_state(), "aug": self.aug_generator.get_state()}

    def load_state_dict(self, state):
        """-> the names of the streams whose saved state does not fit (load_generator_state)."""
        missed = [] if load_generator_state(self.order_generator, state["order"]) else ["order"]
        # "aug" is absent when the checkpoint came from --loader torch
        if "aug" in state and not load_generator_state(self.aug_generator, state["aug"]):
            missed.append("augmentation")
        return missed


def load_generator_state(generator, state):
    """Set a generator's saved state when it is of this generator's kind -> whether it was. A device loader's
    generators live on the device, and a CUDA generator's state (16 bytes) does not fit a CPU one (5056), nor
    the other way round: a run resumed on another kind of device starts those streams afresh."""
    if state.numel() != generator.get_state().numel():
        return False
    generator.set_state(state)
    return True


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as PIL images through torchvision transforms: the plain, per-sample path.

    An item is (index, seed). With a seed, the transform's random draws (torchvision's from torch, timm's
    from numpy and Python's random) come from those RNGs seeded with it, so a sample's augmentation
    depends neither on the worker process nor on the number of workers. In the main process
    (num_workers 0) the three RNG states are put back afterwards: training keeps its own streams.
    """

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, seed = item
        image = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        if seed is None:
            return self.transform(image), self.labels[i]
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:
            saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        try:
            return self.transform(image), self.labels[i]
        finally:
            if in_main:
                torch.default_generator.set_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


def _worker_ignores_stop_signals(worker_id):
    """DataLoader workers leave STOP_SIGNALS to the main process, which finishes its step, saves and shuts them
    down: a Ctrl-C in a terminal reaches every process of the group, and a forked worker would otherwise run
    StopRequest's handler too (its message printed once per worker), or under spawn die on KeyboardInterrupt
    while the main process still waits for its batch."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class TorchLoader:
    """torchvision DataLoader with PIL transforms and worker processes (the original repository's way).

    Training samples are augmented from seeds of their own: each epoch draws one number from this loader's
    generator, and image i of that epoch gets that number + i. A resumed run (the epoch's number is in
    state_dict) repeats the augmentation of an uninterrupted one, whatever --num_workers.
    """

    def __init__(self, images, labels, batch_size, *, device, train, seed=0, crop_scale=None, flip=False,
                 randaug=None, reprob=0.0, interpolation="bilinear", num_workers=0, rank=0, world_size=1):
        from torchvision import transforms
        steps = []
        if crop_scale:
            steps.append(transforms.RandomResizedCrop(images.shape[-1], scale=tuple(crop_scale),
                                                      interpolation=transforms.InterpolationMode(interpolation)))
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        if randaug:
            steps.append(randaug_policy(randaug))
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
        if reprob:
            from timm.data.random_erasing import RandomErasing
            steps.append(RandomErasing(reprob, mode="pixel", device="cpu"))
        self.dataset = ArrayDataset(images.cpu(), labels.cpu(), transforms.Compose(steps))
        self.device, self.num_workers = device, num_workers
        self.augmented = len(steps) > 2  # more than ToTensor and Normalize
        self.order_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator().manual_seed(seed + 1 + rank)  # one draw per epoch
        self.epoch_seed = None
        self.order = BatchOrder(len(images), batch_size, train=train, generator=self.order_generator,
                                rank=rank, world_size=world_size)

    def __len__(self):
        return len(self.order)

    def batches(self, order, start=0):
        """As DeviceLoader.batches; start 0 begins a new epoch (a new epoch seed), start > 0 resumes one."""
        if self.augmented and (start == 0 or self.epoch_seed is None):
            self.epoch_seed = int(torch.randint(2 ** 62, (), generator=self.sample_generator))
        seed = self.epoch_seed if self.augmented else None
        batch_sampler = [[(i, None if seed is None else seed + i) for i in idx.tolist()]
                         for idx in self.order.steps(order, start)]
        # the DataLoader draws a base seed for its workers when it starts: from a generator of its own, not from
        # torch's global one, which a resumed epoch would then draw from once more than an uninterrupted one
        # (drop path draws from it); the samples are seeded one by one anyway
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda", persistent_workers=False,
                                             generator=torch.Generator(), worker_init_fn=_worker_ignores_stop_signals)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def state_dict(self):
        return {"order": self.order_generator.get_state(), "samples": self.sample_generator.get_state(),
                "epoch_seed": self.epoch_seed}

    def load_state_dict(self, state):
        """-> the names of the streams whose saved state does not fit (a device loader's on a GPU)."""
        missed = [] if load_generator_state(self.order_generator, state["order"]) else ["order"]
        if "samples" in state:  # absent when the checkpoint came from --loader device (or an older version)
            self.sample_generator.set_state(state["samples"])
            self.epoch_seed = state["epoch_seed"]
        return missed


def eval_batches(loader, rt, desc):
    """One pass over an unaugmented loader, in dataset order, under a progress bar on the main process that
    clears itself (a pass takes a second on a GPU, minutes on a CPU)."""
    return progress_bar(loader.batches(loader.order.new_epoch()), total=len(loader), desc=desc,
                        disable=not rt.is_main)


def make_loader(rt, images, labels, batch_size, *, train, kind="device", seed=0, interpolation="bilinear",
                num_workers=0, crop_scale=None, flip=False, randaug=None, reprob=0.0):
    """The loader of `kind` (--loader) for one split (augmentation for training only; a crop scale of 1 1: none)."""
    if train and batch_size > len(images):
        raise UserError(f"--batch_size {batch_size} is larger than the training set ({len(images)} images)")
    crop_scale = crop_scale if train and list(crop_scale or [1, 1]) != [1, 1] else None
    common = dict(device=rt.device, train=train, seed=seed, crop_scale=crop_scale,
                  flip=flip and train, randaug=randaug if train else None, reprob=reprob if train else 0.0,
                  interpolation=interpolation, rank=rt.rank, world_size=rt.world_size)
    if kind == "torch":
        return TorchLoader(images, labels, batch_size, num_workers=num_workers, **common)
    return DeviceLoader(images, labels, batch_size, **common)
