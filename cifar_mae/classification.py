"""The classifier's loss (with mixup/cutmix), its evaluation and reports, and the split the best epoch is
picked on."""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from PIL import Image, ImageDraw, ImageFont
from timm.loss import SoftTargetCrossEntropy

from cifar_mae.datasets import holdout_split
from cifar_mae.errors import UserError
from cifar_mae.loaders import eval_batches
from cifar_mae.pretrained import pretraining_note
from cifar_mae.runtime import all_reduce_sum, evaluating
from cifar_mae.timm_export import write_classifier_exports


class ClassificationLoss:
    """Cross-entropy (soft targets under mixup/cutmix) -> (loss, [correct top-1 against the true labels])."""

    def __init__(self, num_classes, mixup=0.0, cutmix=0.0, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.0):
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mix_prob, switch_prob=mix_switch_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model, images, labels):
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images)
        loss = self.criterion(logits.float(), targets)
        return loss, (logits.argmax(dim=-1) == labels).sum().reshape(1)


@torch.no_grad()
def evaluate(model, loader, rt, num_classes, tta=None):
    """Test-set loss, top-1, top-5 and confusion matrix, summed per image over all ranks; with tta "flip" also
    the top-1 of the mean logits of each image and its mirror image (acc_flip)."""
    sums = torch.zeros(5, dtype=torch.float64, device=rt.device)  # loss, images, top-1, top-5, top-1 with flip
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    with evaluating(model):
        for images, labels in eval_batches(loader, rt, "evaluating"):
            with rt.autocast():
                logits = model(images).float()
            top = logits.topk(min(5, num_classes), dim=1).indices
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += len(labels)
            sums[2] += (top[:, 0] == labels).sum().double()
            sums[3] += (top == labels[:, None]).any(1).sum().double()
            confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2).double()
            if tta == "flip":
                with rt.autocast():
                    mean_logits = (logits + model(images.flip(-1)).float()) / 2
                sums[4] += (mean_logits.argmax(dim=1) == labels).sum().double()
    loss, count, top1, top5, top1_flip = all_reduce_sum(sums, rt).tolist()
    confusion = all_reduce_sum(confusion, rt).view(num_classes, num_classes).cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    result = {"loss": loss / count, "acc": top1 / count, "acc5": top5 / count, "per_class": per_class,
              "confusion": confusion}
    if tta == "flip":
        result["acc_flip"] = top1_flip / count
    return result


def per_class_table(result, classes):
    width = max([12] + [len(name) for name in classes]) + 2  # an ImageFolder's class names may be long
    flip = f"  top-1 with flip TTA {result['acc_flip']:.2%}" if "acc_flip" in result else ""
    lines = [f"top-1 {result['acc']:.2%}  top-5 {result['acc5']:.2%}{flip}  (loss {result['loss']:.4f})",
             f"{'class':<{width}}accuracy"]
    lines += [f"{name:<{width}}{acc:.2%}" for name, acc in zip(classes, result["per_class"])]
    return "\n".join(lines)


def confusion_table(confusion, classes):
    """The confusion matrix as a Markdown table of counts (TensorBoard's Text tab): true class per row."""
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(int(n)) for n in row) + " |" for name, row in zip(classes, confusion)]
    return "\n".join(lines)


def confusion_image(confusion, classes):
    """The confusion matrix as a figure, float (3, H, W) in [0, 1]: a row per true class, a column per predicted
    one, each cell shaded by its share of the row and holding its count (up to 20 classes), names on both axes."""
    k = len(classes)
    cell = 34 if k <= 20 else 12
    font = ImageFont.load_default()
    text_width = lambda text: int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(text, font=font))
    margin = max(map(text_width, classes)) + 24  # names, and the axis title beside them
    image = Image.new("RGB", (margin + k * cell + 1, margin + k * cell + 1), "white")
    draw = ImageDraw.Draw(image)
    rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    for i in range(k):
        for j in range(k):
            shade = int(255 * (1 - float(rows[i, j])))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell, margin + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            if k <= 20:
                count = str(int(confusion[i, j]))
                draw.text((box[0] + (cell - text_width(count)) / 2, box[1] + cell / 2 - 5), count, font=font,
                          fill="white" if shade < 128 else "black")
        draw.text((margin - 4 - text_width(classes[i]), margin + i * cell + cell / 2 - 5), classes[i], font=font,
                  fill="black")
    top = Image.new("RGB", (margin, k * cell), "white")  # the predicted classes' names, written upwards
    top_draw = ImageDraw.Draw(top)
    for j, name in enumerate(classes):
        top_draw.text((4, j * cell + cell / 2 - 5), name, font=font, fill="black")
    image.paste(top.rotate(90, expand=True), (margin, 0))  # read upwards, each above its column
    draw.text((margin, 2), "predicted class", font=font, fill="black")
    side = Image.new("RGB", (text_width("true class") + 2, 12), "white")
    ImageDraw.Draw(side).text((0, 0), "true class", font=font, fill="black")
    image.paste(side.rotate(90, expand=True), (2, margin))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


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


def check_classes(ckpt, data, what):
    """Labels are indexes into the class list, so a saved classifier only fits data with its classes, in order."""
    if ckpt["classes"] != list(data.classes):
        raise UserError(f"{what} was trained on the classes {ckpt['classes']}, but --data_dir has "
                        f"{list(data.classes)}")


def log_epoch(log, epoch, train, val, best_acc):
    """An epoch's TensorBoard scalars. -> (its metrics.jsonl record, the text of its line)"""
    train_acc = train["extra_sums"][0] / max(train["images"], 1)
    log.scalars({"cls/loss/train": train["loss"], "cls/loss/val": val["loss"], "cls/acc/train": train_acc,
                 "cls/acc/val": val["acc"], "cls/acc5/val": val["acc5"], "cls/acc_flip/val": val.get("acc_flip"),
                 "lr": train["lr"], "images_per_s": train["images_per_s"]}, epoch)
    record = {"train_loss": train["loss"], "train_acc": train_acc, "val_loss": val["loss"], "val_acc": val["acc"],
              "val_acc5": val["acc5"], "best_acc": best_acc,
              **({"val_acc_flip": val["acc_flip"]} if "acc_flip" in val else {})}
    return record, (f"train loss {train['loss']:.4f} acc {train_acc:.2%}, val loss {val['loss']:.4f} acc "
                    f"{val['acc']:.2%} (best {best_acc:.2%})")


class BestEpoch:
    """The best epoch so far by accuracy on the images it is picked on: val_size held-out training images
    (--val_size), or the test set (0). Its weights are kept on every rank (no shared disk needed) for the closing
    report and the resumable checkpoint (ckpt: the one resumed)."""

    def __init__(self, val_size, ckpt=None):
        self.held_out, self.last_acc = bool(val_size), None  # last_acc: of the last epoch this start trained
        self.selected_on = f"{val_size} held-out training images" if val_size else "the test set"
        self.acc, self.epoch, self.model = (0.0, None, None) if ckpt is None else \
            (ckpt["best_acc"], ckpt["best_epoch"], ckpt["best_model"])

    def update(self, acc, epoch, model):
        """-> whether `epoch`, with accuracy `acc`, is the best so far; then the model's weights are kept."""
        self.last_acc = acc
        if acc <= self.acc and self.model is not None:
            return False
        self.acc, self.epoch = acc, epoch
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def state(self):
        """What the resumable checkpoint keeps of it."""
        return {"best_acc": self.acc, "best_model": self.model, "best_epoch": self.epoch}


def final_report(rt, log, eval_model, best, test_loader, data, config, *, tta, step, exports):
    """The best weights on the test set: per-class table, confusion image and closing log line (at `step`, the last
    epoch); then the exports (write_classifier_exports)."""
    last_acc = best.last_acc
    if best.held_out or last_acc is None:  # with --val_size no choice has looked at the test set
        last_acc = evaluate(eval_model, test_loader, rt, config["num_classes"])["acc"]
    eval_model.load_state_dict(best.model)  # every rank kept a copy: no shared disk needed
    result = evaluate(eval_model, test_loader, rt, config["num_classes"], tta)
    if rt.is_main:
        # without --val_size the best epoch is picked on the test set, as the original repository did, so the
        # last epoch's accuracy is printed beside it: it is the unbiased one
        if best.held_out:
            print(f"best held-out accuracy {best.acc:.2%} (epoch {best.epoch}); on the test set: those "
                  f"weights {result['acc']:.2%}, last epoch {last_acc:.2%}")
        else:
            print(f"best accuracy {best.acc:.2%} (epoch {best.epoch}), last epoch {last_acc:.2%}")
        print(per_class_table(result, data.classes))
        if not log.reported:  # a finished run resumed again: TensorBoard has this image at this step already
            log.image("cls/confusion", confusion_image(result["confusion"], data.classes), step)
            log.text("cls/confusion", confusion_table(result["confusion"], data.classes), step)
        log.line({"final": True, "epoch": step, "acc": result["acc"], "acc5": result["acc5"],
                  "best_epoch": best.epoch, "best_acc": best.acc, "selected_on": best.selected_on,
                  "last_epoch_acc": last_acc, "per_class": dict(zip(data.classes, result["per_class"])),
                  **({"acc_flip": result["acc_flip"]} if "acc_flip" in result else {})})
        write_classifier_exports(eval_model, config, *exports)
    return {"best_acc": best.acc, "best_epoch": best.epoch, "last_epoch_acc": last_acc, "final": result}


def start_note(rt, model, steps, micro_batch, lr, selected_on, *, pretrained_path, pretrained, linear_probe,
               ema_decay, total_epoch, data_note):
    """The start-up lines of a classifier's run (main process): what it trains, on what, and its notes: on the
    pretrained encoder, an EMA too slow for the run (ema_decay: None without --ema), and to stderr the data folder."""
    mode = "fine-tuning" if pretrained_path else "scratch"
    if linear_probe:  # a probe of random features is a baseline, or a forgotten --pretrained_model_path
        mode = "linear probe" + ("" if pretrained_path else
                                 " of a randomly initialised encoder: no --pretrained_model_path")
    if data_note:
        print(data_note, file=sys.stderr)
    print(f"training a classifier ({mode}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"on {rt.device} ({rt.world_size} process(es)), {steps} steps/epoch, micro-batch {micro_batch}, peak lr "
          f"{lr:.2e}, {rt.describe()}; the best epoch is picked on {selected_on}")
    notes = [pretrained is not None and pretraining_note(pretrained_path, pretrained),
             ema_decay is not None and ema_note(ema_decay, total_epoch * steps)]
    for note in filter(None, notes):
        print(note)


def report_saved_classifier(rt, ckpt, model, loader, data, tta, exports):
    """Top-1, top-5 and the per-class table of a saved classifier on the test set (loader); then the exports."""
    result = evaluate(model, loader, rt, ckpt["model_config"]["num_classes"], tta)
    if rt.is_main:
        print(per_class_table(result, data.classes))
        write_classifier_exports(model, ckpt["model_config"], *exports)
    return result
