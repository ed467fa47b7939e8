"""The classifier's loss (with mixup/cutmix), its evaluation and reports, and the split the best epoch is
picked on."""
import math

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from cifar_mae.datasets import holdout_split
from cifar_mae.errors import UserError
from cifar_mae.loaders import eval_batches
from cifar_mae.runtime import all_reduce_sum


class ClassificationLoss:
    """Cross-entropy (soft targets under mixup/cutmix) -> (loss, [correct top-1 against the true labels])."""

    def __init__(self, args, num_classes):
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                               num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def __call__(self, model, images, labels):
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = self.criterion(logits.float(), targets)
        return loss, (logits.argmax(dim=-1) == labels).sum().reshape(1)


@torch.no_grad()
def evaluate(model, loader, rt, num_classes):
    """Test-set loss, top-1, top-5 and confusion matrix, summed per image over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, images, top-1, top-5
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    for images, labels in eval_batches(loader, rt, "evaluating"):
        with rt.autocast():
            logits = model(images).float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += len(labels)
        sums[2] += (top[:, 0] == labels).sum().double()
        sums[3] += (top == labels[:, None]).any(1).sum().double()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2).double()
    model.train(was_training)
    loss, count, top1, top5 = all_reduce_sum(sums, rt).tolist()
    confusion = all_reduce_sum(confusion, rt).view(num_classes, num_classes).cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {"loss": loss / count, "acc": top1 / count, "acc5": top5 / count, "per_class": per_class,
            "confusion": confusion}


def per_class_table(result, classes):
    width = max([12] + [len(name) for name in classes]) + 2  # an ImageFolder's class names may be long
    lines = [f"top-1 {result['acc']:.2%}  top-5 {result['acc5']:.2%}  (loss {result['loss']:.4f})",
             f"{'class':<{width}}accuracy"]
    lines += [f"{name:<{width}}{acc:.2%}" for name, acc in zip(classes, result["per_class"])]
    return "\n".join(lines)


def confusion_image(confusion, cell=16):
    """Row-normalised confusion matrix as a (1, K*cell, K*cell) grey image, true class per row."""
    rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    return rows.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None].float()


def ema_note(decay, steps):
    """A note when an EMA over `steps` optimizer steps would still hold over 10 % of the initial weights at the
    end (a decay meant for a longer run), else None."""
    left = decay ** steps
    if left <= 0.1:
        return None
    suggest = math.floor(0.01 ** (1 / steps) * 1e4) / 1e4
    return (f"note: --ema_decay {decay} over {steps} optimizer steps leaves {left:.0%} of the initial weights in the "
            f"EMA that is evaluated and saved; --ema_decay {suggest} or less leaves at most 1 %")


def selection_split(data, val_size):
    """(train images, train labels, images and labels the best epoch is picked on): the test set, as the original
    repository did, or with --val_size that many training images held out (the same ones for every --seed)."""
    if not val_size:
        return data.train_images, data.train_labels, data.test_images, data.test_labels
    if val_size >= len(data.train_images):
        raise UserError(f"--val_size {val_size} leaves no images to train on (the training set has "
                        f"{len(data.train_images)})")
    kept, held = holdout_split(len(data.train_images), val_size)
    return data.train_images[kept], data.train_labels[kept], data.train_images[held], data.train_labels[held]
