"""Training machinery: accumulation, schedule, optimizer groups, EMA, mixup, augmentation, loaders, checkpoints."""
import argparse
import os
import random
import re
import shutil
import signal

import numpy as np
import pytest
import torch

import mae_pretrain
import train_classifier
import torch.distributed as dist
import time
from cifar_mae import datasets, image_folders, metrics
from conftest import ROOT, CLASSES, write_cifar100, write_cifar_batches, write_image_folder
from cifar_mae.atomic import save_atomic
from cifar_mae.augment import crop_resize_flip, normalize, sample_crop_boxes
from cifar_mae.classification import ClassificationLoss, ema_note, per_class_table
from cifar_mae.checkpoint import FORMAT, restore_training_state, rng_state, set_rng_state, training_state
from cifar_mae.console import format_duration, resume_command, script_command
from cifar_mae.datasets import ImageData, _download_cifar, data_info, dataset_name, default_log_dir, load_data
from cifar_mae.engine import EpochClock, EpochState, Trainer, stop_reason
from cifar_mae.stopping import STOP_SIGNALS, StopRequest
from cifar_mae.cli import cli_main
from cifar_mae.errors import NonFiniteLoss, UserError
from cifar_mae.flags import ArgumentParser, path_arg
from cifar_mae.settings import plain_args
from cifar_mae.image_folders import decode_cache_paths, decode_folder
from cifar_mae.knn import knn_accuracy, knn_monitor
from cifar_mae.loaders import ArrayDataset, BatchOrder, DeviceLoader, TorchLoader
from cifar_mae.metrics import MetricsLog, read_json_lines
from cifar_mae.optim import lr_at, make_optimizer, param_groups, set_lr
from cifar_mae.outputs import check_export_path
from cifar_mae.pretrained import pretraining_note
from cifar_mae.timm_export import classifier_export, encoder_export
from cifar_mae.lifecycle import start_runtime
from cifar_mae.runtime import Runtime, cuda_defaults, note_devices, setup_runtime, split_batch, wrap_model
from model import MAE_Encoder, MAE_ViT, ViT_Classifier

CPU = Runtime(torch.device("cpu"))
TINY = dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, decoder_layer=1, decoder_head=2)


def tiny_classifier(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ViT_Classifier(MAE_Encoder(8, 2, 16, 2, 2), 10, **kwargs)


def ce_loss(model, images, labels):
    logits = model(images)
    return torch.nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum().reshape(1)


def make_trainer(model, micro, loss_fn=ce_loss, sgd=False, **kwargs):
    # SGD makes the update linear in the gradient, so gradient equality shows through the weights; Adam's
    # first step g / (|g| + eps) would magnify rounding in near-zero gradients
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Trainer(model, loss_fn, optimizer, lambda step: 1e-3, CPU, micro_batch=micro, num_extra=1, **kwargs)


@pytest.mark.parametrize("k,n", [(4, 2), (2, 3)])
def test_accumulated_micro_batches_equal_one_big_batch(k, n):
    images, labels = torch.randn(k * n, 3, 8, 8), torch.arange(k * n) % 10
    big, small = tiny_classifier(), tiny_classifier()
    sums_big = make_trainer(big, k * n, sgd=True).step(images, labels, 0)
    sums_small = make_trainer(small, n, sgd=True).step(images, labels, 0)
    torch.testing.assert_close(sums_small, sums_big)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any((a != p).any() for a, p in zip(big.parameters(), tiny_classifier().parameters()))


def test_the_default_micro_batch_fits_the_device_and_divides_the_batch():
    """The GPU default of 1024 took about 24 GB of host memory on the CPU, where the kernel killed the run without
    a word; not given, the micro-batch is at most 64 there, and a divisor of the batch on either device."""
    def micro(batch, device, given=None, gpu_default=1024, even=False, world_size=1):
        return split_batch(batch, given, Runtime(torch.device(device), world_size=world_size), gpu_default,
                           even=even)[1]
    assert [micro(b, "cpu") for b in (4096, 128, 100, 90, 16, 97)] == [64, 64, 50, 45, 16, 1]
    assert micro(90, "cpu", even=True) == 30 and micro(90, "cpu", gpu_default=256, even=True) == 30
    assert micro(4096, "cpu", world_size=4) == 64 and micro(96, "cpu", world_size=2) == 48
    assert [micro(b, "cuda") for b in (4096, 3000, 512)] == [1024, 1000, 512]  # no longer a divisibility error
    assert micro(4096, "cpu", given=1024) == 1024  # given: as it is
    with pytest.raises(UserError, match="not a multiple of the micro-batch 1024"):
        micro(3000, "cuda", given=1024)


def test_accumulation_for_mae_loss():
    """The MAE loss is a mean over an equal number of masked patches per image, so micro-batch means average
    to the big-batch mean; the masks match because CPU torch.rand draws the same stream in pieces."""
    images = torch.randn(8, 3, 8, 8)
    models = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = MAE_ViT(**TINY)
        trainer = Trainer(model, mae_pretrain.mae_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                          lambda step: 0.1, CPU, micro_batch=micro)
        torch.manual_seed(1)
        trainer.step(images, torch.zeros(8, dtype=torch.long), 0)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_graph_modes_keep_gradients_in_own_tensors_and_train_the_same():
    """reduce-overhead replays CUDA graphs into the same output memory, so with accumulation .grad must never be
    a graph's output: the trainer keeps preallocated gradients, adds into them in place and zeroes them in place.
    Checked here through the trainer's own logic (CPU has no CUDA graphs): same tensors, same training."""
    images, labels = torch.randn(12, 3, 8, 8), torch.arange(12) % 10
    graphed_rt = Runtime(torch.device("cpu"), compile=True, compile_mode="reduce-overhead")
    plain, graphed = tiny_classifier(), tiny_classifier()
    plain_trainer = make_trainer(plain, 4, sgd=True)
    optimizer = torch.optim.SGD(graphed.parameters(), lr=0.1)
    graphed_trainer = Trainer(graphed, ce_loss, optimizer, lambda step: 1e-3, graphed_rt, micro_batch=4,
                              num_extra=1)
    assert graphed_trainer.cudagraphs and not plain_trainer.cudagraphs
    grads = [p.grad for p in graphed.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    for step in range(3):
        torch.testing.assert_close(graphed_trainer.step(images, labels, step), plain_trainer.step(images, labels, step))
    assert all(p.grad is g and not g.any() for p, g in zip(graphed.parameters(), grads))
    assert all(p.grad is None for p in plain.parameters())
    for a, b in zip(plain.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b)


def test_lr_schedule_points():
    peak, warmup, total = 1e-3, 10, 100
    assert lr_at(0, peak, warmup, total) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(warmup, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(55, peak, warmup, total) == pytest.approx(peak * 0.5)
    assert lr_at(total, peak, warmup, total) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(0, peak, 0, total) == pytest.approx(peak)
    values = [lr_at(s, peak, warmup, total) for s in range(total + 1)]
    assert values[:warmup] == sorted(values[:warmup]) and values[warmup:] == sorted(values[warmup:], reverse=True)


def test_layer_decay_gives_expected_effective_learning_rates():
    model = tiny_classifier()  # 2 blocks: layer 0 = embeddings, 1-2 = blocks (timm puts the final norm with the
    # last block), 3 = head
    no_decay = train_classifier.Classification.no_weight_decay
    optimizer = make_optimizer(param_groups(model, 0.05, no_decay, layer_decay=0.5), 1.0, CPU)
    set_lr(optimizer, 0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {"cls_token": 0.1 * 0.5 ** 3, "patch_embed.proj.weight": 0.1 * 0.5 ** 3,
                "blocks.0.attn.qkv.weight": 0.1 * 0.5 ** 2, "blocks.1.mlp.fc1.weight": 0.1 * 0.5,
                "norm.weight": 0.1 * 0.5, "head.weight": 0.1}
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr), name
    assert wd_of[id(named["cls_token"])] == 0 and wd_of[id(named["pos_embed"])] == 0
    assert wd_of[id(named["blocks.0.attn.qkv.bias"])] == 0 and wd_of[id(named["head.weight"])] == 0.05
    # and the trainer applies them: one step changes lr in every group by its scale
    trainer = Trainer(model, ce_loss, optimizer, lambda step: 0.2, CPU, micro_batch=4, num_extra=1)
    trainer.step(torch.randn(4, 3, 8, 8), torch.arange(4), 0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.2 * group["lr_scale"])


def test_pretraining_param_groups_skip_tokens_and_norms():
    model = MAE_ViT(**TINY)
    groups = param_groups(model, 0.05, mae_pretrain.Pretraining.no_weight_decay)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2 and "token" not in name and "pos_embed" not in name), name


def test_ema_follows_decay_formula_and_differs_from_live_weights():
    from timm.utils import ModelEmaV3
    model = tiny_classifier()
    ema = ModelEmaV3(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    trainer = make_trainer(model, 4, ema=ema)
    trainer.step(torch.randn(4, 3, 8, 8), torch.arange(4), 0)
    live = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * live[key])
    assert not torch.equal(ema.module.head.weight, model.head.weight)


def test_an_ema_decay_too_slow_for_the_run_is_pointed_out():
    note = ema_note(0.9999, 3900)  # 40 epochs of 97 steps: 0.9999 ** 3900 = 0.677
    assert "--ema_decay 0.9999 over 3900 optimizer steps leaves 68% of the initial weights" in note
    assert "--ema_decay 0.9988 or less" in note and 0.9988 ** 3900 <= 0.01 < 0.9989 ** 3900
    assert ema_note(0.9999, 39000) is None  # 100 epochs of 390: 2 % left


def test_clip_grad_scales_the_whole_gradient_down_to_the_limit():
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8)

    def update(clip):  # one SGD step at lr 1 over two micro-batches: the weights move by minus the gradient
        model = tiny_classifier()
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        trainer = Trainer(model, ce_loss, torch.optim.SGD(model.parameters(), lr=1.0), lambda step: 1.0, CPU,
                          micro_batch=4, num_extra=1, clip_grad=clip)
        trainer.step(images, labels, 0)
        return before - torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    raw = update(None)
    limit = raw.norm().item() / 4
    torch.testing.assert_close(update(limit), raw / 4, rtol=1e-3, atol=1e-6)  # one factor for every tensor
    assert update(limit).norm().item() == pytest.approx(limit, rel=1e-4)
    torch.testing.assert_close(update(raw.norm().item() * 2), raw)  # under the limit: left alone


def test_drop_path_rises_linearly_over_blocks_and_acts_in_training_only():
    config = dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=3, encoder_head=2, in_chans=3,
                  pos_embed="learned", num_classes=10, global_pool=False, linear_probe=False)
    torch.manual_seed(0)
    model = train_classifier.build_classifier(config, drop_path=0.2)
    torch.manual_seed(0)
    plain = train_classifier.build_classifier(config)  # the same weights, no stochastic depth
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # the first block is never dropped
    assert [block.drop_path1.drop_prob for block in model.blocks[1:]] == pytest.approx([0.1, 0.2])
    x = torch.randn(64, 3, 8, 8)
    model.train(), plain.train()
    assert not torch.equal(model(x), model(x))  # some samples skip a block's branch, differently per call
    assert torch.equal(plain(x), plain(x))
    model.eval()
    assert torch.equal(model(x), model(x)) and torch.equal(model(x), plain(x))


def test_mixup_mixes_images_and_targets_with_the_weight_timm_draws():
    loss = ClassificationLoss(10, mixup=0.8, label_smoothing=0.1)
    seen = {}

    def model(images):
        seen["images"] = images
        return torch.zeros(images.shape[0], 10, requires_grad=True)

    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    np.random.seed(0)  # timm's Mixup draws from numpy: whether to mix (prob 1), then the weight from Beta(a, a)
    np.random.rand()
    lam = np.random.beta(0.8, 0.8)
    np.random.seed(0)
    value, correct = loss(model, images.clone(), labels)
    torch.testing.assert_close(seen["images"], lam * images + (1 - lam) * images.flip(0))
    smoothed = torch.nn.functional.one_hot(labels, 10) * 0.9 + 0.01
    np.random.seed(0)
    _, targets = loss.mixup(images.clone(), labels)
    torch.testing.assert_close(targets, lam * smoothed + (1 - lam) * smoothed.flip(0))
    torch.testing.assert_close(value, -(targets * torch.full((4, 10), 0.1).log()).sum(1).mean())


def test_cutmix_pastes_one_box_of_the_flipped_batch_and_mixes_the_targets_by_its_area():
    loss = ClassificationLoss(10, cutmix=1.0)
    np.random.seed(0)  # timm's Mixup draws from numpy
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = loss.mixup(images.clone(), labels)
    pasted = (mixed != images).any(dim=1)  # (B, H, W): where a pixel came from the partner image
    rows, cols = pasted[0].any(dim=1), pasted[0].any(dim=0)
    assert 0 < pasted[0].sum() < 64 and torch.equal(pasted[0], rows[:, None] & cols[None, :])  # one box
    assert torch.equal(pasted, pasted[:1].expand(4, -1, -1))  # the same box for the whole batch
    box = pasted[:, None].expand_as(images)
    assert torch.equal(mixed[box], images.flip(0)[box]) and torch.equal(mixed[~box], images[~box])
    lam = 1 - pasted[0].sum().item() / 64  # the target weight follows the box's real area
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))


def test_label_smoothing_without_mixup_spreads_epsilon_over_all_classes():
    loss = ClassificationLoss(10, label_smoothing=0.1)
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 3, 5, 9])
    value, correct = loss(lambda images: logits, torch.zeros(4, 3, 8, 8), labels)
    log_p = logits.log_softmax(dim=1)
    expected = (0.9 * -log_p[torch.arange(4), labels] + 0.1 * -log_p.mean(dim=1)).mean()
    torch.testing.assert_close(value, expected)
    assert correct.item() == (logits.argmax(1) == labels).sum().item()


def test_ctrl_c_asks_for_a_clean_stop_and_a_second_one_aborts(capsys):
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        @cli_main
        def run(args):
            with StopRequest() as stop:
                signal.raise_signal(signal.SIGINT)  # the run finishes its step, saves and exits 130
                assert stop.signum == signal.SIGINT
                assert "SIGINT received: finishing this step, then saving" in capsys.readouterr().err
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: abort now
            raise AssertionError("not reached")

        run(None)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; nothing was saved since the last checkpoint"
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back


def test_skip_nonfinite_keeps_weights_and_stops_after_n():
    model = tiny_classifier()
    calls = {"n": 0}

    def bad_loss(model, images, labels):
        calls["n"] += 1
        loss, correct = ce_loss(model, images, labels)
        return loss * float("nan"), correct

    trainer = make_trainer(model, 4, loss_fn=bad_loss, skip_nonfinite=1)
    before = [p.clone() for p in model.parameters()]
    trainer.step(torch.randn(4, 3, 8, 8), torch.arange(4), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(NonFiniteLoss, match="non-finite loss at optimizer step 2;"):
        trainer.step(torch.randn(4, 3, 8, 8), torch.arange(4), 1)


def test_nonfinite_loss_stops_run_epoch_with_epoch_and_step():
    model = tiny_classifier()
    trainer = make_trainer(model, 4, loss_fn=lambda m, x, y: (ce_loss(m, x, y)[0] * float("inf"),
                                                            torch.zeros(1)))
    loader = DeviceLoader(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), 4,
                          device=torch.device("cpu"), train=True)
    state = EpochState(loader.order.new_epoch())
    with pytest.raises(NonFiniteLoss, match="epoch 3 at optimizer step 11"):
        with StopRequest() as stop:
            trainer.run_epoch(loader, state, epoch=3, first_step=10, log_interval=1, stop=stop, desc="", show=False)


# ------------------------------------------------------------------------------------------- augmentation

def test_crop_of_known_image_equals_slice_and_flip_mirrors():
    image = (torch.arange(2 * 3 * 8 * 8) % 256).float().view(2, 3, 8, 8)  # whole numbers 0-255, as pixels
    boxes = torch.tensor([[2.0, 1.0, 4.0, 4.0], [0.0, 4.0, 4.0, 4.0]])
    out = crop_resize_flip(image, boxes, torch.tensor([False, True]), 4)
    torch.testing.assert_close(out[0], image[0, :, 1:5, 2:6])
    torch.testing.assert_close(out[1], image[1, :, 4:8, 0:4].flip(-1))
    whole = crop_resize_flip(image, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), torch.tensor([True, False]), 8)
    torch.testing.assert_close(whole[0], image[0].flip(-1))
    torch.testing.assert_close(whole[1], image[1])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_is_within_a_grey_level_of_torchvision_on_pil_images(mode):
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    g = torch.Generator().manual_seed(0)
    n = 32
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)  # noise: overshoots get clipped
    images[::2] = torch.nn.functional.avg_pool2d(images[::2].float(), 5, 1, 2).round().to(torch.uint8)
    w, h = torch.randint(2, 17, (n,), generator=g), torch.randint(2, 17, (n,), generator=g)
    x0, y0 = (torch.rand(n, generator=g) * (17 - w)).floor(), (torch.rand(n, generator=g) * (17 - h)).floor()
    flip = torch.arange(n) % 3 == 0
    ours = crop_resize_flip(images.float(), torch.stack([x0, y0, w, h], 1).float(), flip, 16, mode)
    theirs = []
    for i in range(n):
        out = TF.resized_crop(Image.fromarray(images[i].permute(1, 2, 0).numpy()), int(y0[i]), int(x0[i]),
                              int(h[i]), int(w[i]), [16, 16], InterpolationMode(mode))
        theirs.append(torch.from_numpy(np.asarray(TF.hflip(out) if flip[i] else out).copy()).permute(2, 0, 1))
    diff = (ours - torch.stack(theirs).float()).abs()
    if mode == "bilinear":  # PIL's 2 taps per pass, in float32: the same pixels
        assert diff.max() == 0
    else:  # PIL's bicubic weights are fixed-point numbers; ours are float64
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    # a box of the output's size at integer offsets is the slice itself
    image = torch.arange(3 * 64, dtype=torch.float32).view(1, 3, 8, 8)
    out = crop_resize_flip(image, torch.tensor([[2.0, 1.0, 4.0, 4.0]]), torch.tensor([False]), 4, mode)
    assert torch.equal(out[0], image[0, :, 1:5, 2:6])


def test_crop_interpolation_reaches_both_loaders():
    from torchvision.transforms import InterpolationMode
    bilinear, _ = make_loader(crop_scale=(0.2, 1.0), flip=True)
    bicubic, _ = make_loader(crop_scale=(0.2, 1.0), flip=True, interpolation="bicubic")
    a = bilinear.augment(bilinear.images[:8])
    b = bicubic.augment(bicubic.images[:8])  # the same boxes and flips, another filter
    generator = torch.Generator().manual_seed(1)  # the augmentation stream of seed 0, rank 0: boxes, then flips
    boxes = sample_crop_boxes(8, 8, 8, (0.2, 1.0), generator=generator)
    flip = torch.rand(8, generator=generator) < 0.5
    images = bilinear.images[:8].float()
    assert torch.equal(a, crop_resize_flip(images, boxes, flip, 8, "bilinear"))
    assert torch.equal(b, crop_resize_flip(images, boxes, flip, 8, "bicubic")) and not torch.equal(a, b)
    images = torch.zeros(8, 3, 8, 8, dtype=torch.uint8)
    for mode in ("bilinear", "bicubic"):
        loader = TorchLoader(images, torch.zeros(8, dtype=torch.long), 4, device=torch.device("cpu"),
                             train=True, crop_scale=(0.2, 1.0), interpolation=mode)
        assert loader.dataset.transform.transforms[0].interpolation == InterpolationMode(mode)


@pytest.mark.parametrize("size, scale", [((32, 32), (0.2, 1.0)), ((32, 32), (0.08, 1.0)), ((20, 12), (0.35, 1.0))])
def test_crop_boxes_are_drawn_as_torchvision_draws_them(size, scale):
    """The distribution of RandomResizedCrop.get_params: the total variation distance of each of x0, y0, w, h
    from torchvision's (20,000 draws) stays at the sampling noise (about 0.015 here), while one draw without
    the redraws (tries=1), or a scale range off by 0.05, is several times that."""
    from collections import Counter
    from torchvision.transforms import RandomResizedCrop
    height, width = size
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
              for _ in range(20000)]
    theirs = torch.tensor([[j, i, w, h] for i, j, h, w in theirs], dtype=torch.float32)
    draw = lambda **kw: sample_crop_boxes(100000, height, width, kw.pop("scale", scale),
                                          generator=torch.Generator().manual_seed(0), **kw)
    ours = draw()
    x0, y0, w, h = ours.unbind(1)
    assert torch.equal(ours, ours.round()) and (w >= 1).all() and (h >= 1).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()

    def distance(a, b):  # the largest over the four coordinates
        count = lambda t: Counter(t.tolist())
        return max(sum(abs(count(a[:, k])[v] / len(a) - count(b[:, k])[v] / len(b))
                       for v in set(a[:, k].tolist()) | set(b[:, k].tolist())) / 2 for k in range(4))

    assert distance(ours, theirs) < 0.035
    assert distance(draw(tries=1), theirs) > 0.07
    assert distance(draw(scale=(scale[0] + 0.05, scale[1])), theirs) > 0.05


def test_crop_boxes_fall_back_to_torchvisions_centre_crop():
    # 12x20 at 90-100 % of the area: every draw is taller than the image, so all fall back to the centre crop
    # at the widest allowed ratio, 4/3: 16 x 12 pixels at x0 = 2, as RandomResizedCrop.get_params gives
    from torchvision.transforms import RandomResizedCrop
    boxes = sample_crop_boxes(50, 12, 20, (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    i, j, h, w = RandomResizedCrop.get_params(torch.empty(3, 12, 20), [0.9, 1.0], [3 / 4, 4 / 3])
    assert (i, j, h, w) == (0, 2, 12, 16)
    assert torch.equal(boxes, torch.tensor([[2.0, 0.0, 16.0, 12.0]] * 50))


def make_loader(seed=0, **kwargs):
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    return DeviceLoader(images, torch.arange(16) % 10, 8, device=torch.device("cpu"), train=True, seed=seed,
                        **kwargs), images


def test_device_augmentation_shapes_range_variation_and_determinism():
    loader, images = make_loader(crop_scale=(0.2, 1.0), flip=True)
    order = loader.order.new_epoch()
    x, y = next(loader.batches(order))
    assert x.shape == (8, 3, 8, 8) and y.shape == (8,) and x.dtype == torch.float32
    twin, _ = make_loader(crop_scale=(0.2, 1.0), flip=True)  # the same draws: the batch is their pixels in [-1, 1]
    assert torch.equal(x, twin.augment(images[order[:8]]).div(127.5).sub(1.0)) and torch.equal(y, order[:8] % 10)
    assert x.min() >= -1 and x.max() <= 1
    # per-sample: the same image 8 times gets 8 different augmentations (32x32: boxes are whole pixels, and an
    # 8x8 image has few enough of them that two of 8 draws could meet)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    same = DeviceLoader(image.expand(8, -1, -1, -1), torch.zeros(8, dtype=torch.long), 8,
                        device=torch.device("cpu"), train=True, crop_scale=(0.2, 1.0), flip=True)
    batch, _ = next(same.batches(same.order.new_epoch()))
    assert len({tuple(b.flatten().tolist()) for b in batch}) == 8
    again, _ = make_loader(crop_scale=(0.2, 1.0), flip=True)
    x2, _ = next(again.batches(again.order.new_epoch()))
    assert torch.equal(x, x2)
    other, _ = make_loader(seed=1, crop_scale=(0.2, 1.0), flip=True)
    assert not torch.equal(x, next(other.batches(other.order.new_epoch()))[0])


def test_flip_only_mirrors_some_images_and_keeps_the_rest():
    loader, images = make_loader(flip=True)
    order = loader.order.new_epoch()
    x, _ = next(loader.batches(order))
    originals = normalize(images[order[:8]])
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(x, originals)]
    kept = [torch.equal(a, b) for a, b in zip(x, originals)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_device_loader_without_augmentation_is_normalised_slice():
    loader, images = make_loader()
    order = loader.order.new_epoch()
    assert sorted(order.tolist()) == list(range(16))
    batches = list(loader.batches(order))
    assert len(batches) == 2
    torch.testing.assert_close(batches[1][0], images[order[8:16]].float() / 127.5 - 1)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_dataloader_workers_started_without_fork_give_the_same_batches(method):
    """Python 3.14 starts worker processes with forkserver by default on Linux (macOS and Windows: spawn), which
    pickles the dataset, its transforms and the worker hook instead of inheriting them."""
    import multiprocessing
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    flags = dict(device=torch.device("cpu"), train=True, seed=3, crop_scale=(0.2, 1.0), flip=True,
                 randaug="rand-m9-mstd0.5-inc1", reprob=0.5)
    loaders = [TorchLoader(images, torch.arange(16) % 10, 8, num_workers=n, **flags) for n in (0, 2)]
    order = [loader.order.new_epoch() for loader in loaders][0]
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(method, force=True)
    try:
        batches = [[x for x, _ in loader.batches(order)] for loader in loaders]
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert len(batches[1]) == 2 and all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_dataloader_path_augments_each_sample_from_its_own_seed():
    """--loader torch: the same batches for 0 and 2 workers, a resumed epoch repeats them, training RNGs untouched."""
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    flags = dict(device=torch.device("cpu"), train=True, seed=3, crop_scale=(0.2, 1.0), flip=True,
                 randaug="rand-m9-mstd0.5-inc1", reprob=0.5)

    def loader(workers):
        return TorchLoader(images, torch.arange(24) % 10, 8, num_workers=workers, **flags)

    np_state, py_state = np.random.get_state(), random.getstate()
    main = loader(0)
    order = main.order.new_epoch()
    batches = []
    for x, _ in main.batches(order):
        batches.append(x)
        if len(batches) == 1:
            mid_epoch = main.state_dict()
    assert len(batches) == 3
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    workers = loader(2)
    workers.order.new_epoch()
    for a, b in zip(batches, (x for x, _ in workers.batches(order))):
        assert torch.equal(a, b)
    resumed = loader(0)
    resumed.load_state_dict(mid_epoch)
    for a, b in zip(batches[1:], [x for x, _ in resumed.batches(order, start=1)], strict=True):
        assert torch.equal(a, b)
    # per sample and per epoch: the same image gets other draws in the next epoch
    second = [x for x, _ in main.batches(order)]
    assert not any(torch.equal(a, b) for a, b in zip(batches, second))


def test_loader_streams_saved_on_another_kind_of_device_start_afresh(capsys):
    """A device loader's generators live on the device: a CUDA generator's state (16 bytes) does not fit a CPU
    one. A GPU run resumed on the CPU (or the other way round) says so and goes on instead of failing."""
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(8) % 10
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what torch.Generator("cuda").get_state() returns
    flags = dict(device=torch.device("cpu"), train=True, seed=0, flip=True)
    device, torch_loader = DeviceLoader(images, labels, 4, **flags), TorchLoader(images, labels, 4, **flags)
    fresh = device.state_dict()
    assert device.load_state_dict({"order": cuda_state, "aug": cuda_state}) == ["order", "augmentation"]
    assert all(torch.equal(fresh[k], v) for k, v in device.state_dict().items())  # as seeded
    assert torch_loader.load_state_dict({"order": cuda_state, "aug": cuda_state}) == ["order"]
    assert device.load_state_dict(DeviceLoader(images, labels, 4, **{**flags, "seed": 5}).state_dict()) == []
    assert not torch.equal(device.state_dict()["order"], fresh["order"])  # a state that fits is taken
    state = rng_state(CPU, device)
    state[0]["loader"] = {"order": cuda_state, "aug": cuda_state}
    set_rng_state(state, CPU, device)
    assert "random streams in the checkpoint (order, augmentation) come from a run on another kind of device" \
        in capsys.readouterr().err


def test_per_class_table_keeps_its_column_for_long_class_names():
    result = {"acc": 0.5, "acc5": 1.0, "loss": 0.7, "per_class": [0.25, 0.75]}
    for classes, column in ((["cat", "dog"], 14), (["cat", "a_class_name_of_29_characters"], 31)):
        lines = per_class_table(result, classes).splitlines()
        assert [line[column:] for line in lines[1:]] == ["accuracy", "25.00%", "75.00%"]
        assert [line[:column].rstrip() for line in lines[1:]] == ["class", *classes]


def test_resume_command_names_the_launcher(monkeypatch):
    """The command printed after a stop: python for one process, torchrun with the processes per node else."""
    assert resume_command("mae_pretrain.py", "m.pth", CPU) == "python mae_pretrain.py --resume m.pth"
    rank1 = Runtime(torch.device("cpu"), rank=1, world_size=4, local_rank=1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("mae_pretrain.py", "m.pth", rank1) == \
        "torchrun --nproc_per_node=4 mae_pretrain.py --resume m.pth"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two
    assert resume_command("train_classifier.py", "c-last.pth", rank1) == \
        "torchrun train_classifier.py --resume c-last.pth on every node, with this run's launch options"
    # a path with a space or a quote is quoted for the shell it is copied into
    assert resume_command("mae_pretrain.py", "my runs/it's.pth", CPU) == \
        """python mae_pretrain.py --resume 'my runs/it'"'"'s.pth'"""
    # the --device a run was given (one run per GPU), which its checkpoint does not hold, goes along
    assert resume_command("mae_pretrain.py", "m.pth", CPU, "cuda:1") == \
        "python mae_pretrain.py --resume m.pth --device cuda:1"


def test_script_command_is_the_path_to_type_from_the_working_folder(tmp_path, monkeypatch):
    script = os.path.join(ROOT, "mae_pretrain.py")
    monkeypatch.chdir(os.path.dirname(script))  # in the repository, as the README runs it
    assert script_command(script) == "mae_pretrain.py"
    monkeypatch.chdir(os.path.join(os.path.dirname(script), "tests"))  # ../mae_pretrain.py: absolute is plainer
    assert script_command(script) == script
    monkeypatch.chdir(tmp_path)  # a run folder elsewhere: `python ~/mae/mae_pretrain.py` from there
    assert script_command(script) == script
    os.makedirs(tmp_path / "my code")
    monkeypatch.chdir(tmp_path / "my code" / "..")
    assert script_command(str(tmp_path / "my code" / "mae_pretrain.py")) == "'my code/mae_pretrain.py'"
    os.symlink(tmp_path / "my code", tmp_path / "link")  # the script named through a link to the working folder
    monkeypatch.chdir(tmp_path / "my code")
    assert script_command(str(tmp_path / "link" / "mae_pretrain.py")) == "mae_pretrain.py"


def test_stop_request_leaves_sighup_ignored_under_nohup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does before it starts the run
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # from a terminal: a hang-up saves and stops the run
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_stop_request_is_announced_by_the_main_rank_only(capfd):
    """Under torchrun every rank gets the signal: one line says so, not one per process; each still stops."""
    for announce in (True, False):
        with StopRequest(announce=announce) as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        said = capfd.readouterr().err
        assert said.count("SIGTERM received: finishing this step") == int(announce), said


class _SignalsItself(ArrayDataset):
    """Each worker sends itself SIGINT, SIGTERM and SIGHUP, as a Ctrl-C in a terminal or a scheduler's kill of the
    process group would, before it returns its first sample."""

    def __getitem__(self, item):
        assert torch.utils.data.get_worker_info() is not None  # never in the main process
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        return super().__getitem__(item)


def test_dataloader_workers_leave_stop_signals_to_the_main_process(capfd):
    """--loader torch: a worker neither runs StopRequest's handler (inherited by fork) nor dies; every batch comes."""
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = TorchLoader(images, torch.arange(16) % 10, 4, device=torch.device("cpu"), train=True, seed=0,
                         flip=True, num_workers=2)
    loader.dataset = _SignalsItself(loader.dataset.images, loader.dataset.labels, loader.dataset.transform)
    with StopRequest() as stop:
        batches = [x for x, _ in loader.batches(loader.order.new_epoch())]
    assert len(batches) == 4 and stop.signum is None
    assert "received" not in capfd.readouterr().err


def test_batch_order_splits_global_batches_over_ranks():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(20, generator=g)
    single = BatchOrder(20, 8, train=True, generator=g)
    ranks = [BatchOrder(20, 8, train=True, generator=g, rank=r, world_size=2) for r in range(2)]
    assert len(single) == 2 and all(len(r) == 2 for r in ranks)  # 4 images dropped each epoch
    for step, whole in enumerate(single.steps(order)):
        parts = [list(r.steps(order))[step] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)
    evals = [BatchOrder(11, 4, train=False, generator=g, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([i for e in evals for i in e.steps(torch.arange(11))])
    assert sorted(seen.tolist()) == list(range(11))


def test_fast_and_plain_paths_train_the_same_model():
    """Device loader vs torchvision DataLoader, augmentation off, same seed: same batches, same losses."""
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 10
    losses = []
    for loader_cls in (DeviceLoader, TorchLoader):
        loader = loader_cls(images, labels, 8, device=torch.device("cpu"), train=True, seed=3)
        model = tiny_classifier()
        trainer = make_trainer(model, 4)
        run = []
        for step, (x, y) in enumerate(loader.batches(loader.order.new_epoch())):
            sums = trainer.step(x, y, step)
            run.append(float(sums[0] / sums[1]))
        losses.append(run)
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ------------------------------------------------------------------------------------------- checkpoints, kNN, export

def test_each_machine_decodes_once_before_its_other_processes_read(monkeypatch):
    events = []
    monkeypatch.setattr(dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(datasets, "_find_and_load", lambda *a, **k: events.append("load"))
    # two machines with two processes each: the first of each machine loads, then waits for the others
    for rank, local_rank, expected in ((0, 0, ["load", "barrier"]), (1, 1, ["barrier", "load"]),
                                       (2, 0, ["load", "barrier"]), (3, 1, ["barrier", "load"])):
        events.clear()
        load_data("data", 32, Runtime(torch.device("cpu"), rank, 4, local_rank=local_rank))
        assert events == expected, (rank, local_rank)


def test_download_moves_into_place_once_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import torchvision

    def fake_cifar(finish_first=False, fail=False):
        def download(root, train, download):
            if fail:
                raise RuntimeError("no network")
            if finish_first:  # another process on a shared disk completes its download meanwhile
                os.makedirs(os.path.join(data, "cifar-10-batches-py"))
                open(os.path.join(data, "cifar-10-batches-py", "theirs"), "w").close()
            os.makedirs(os.path.join(root, "cifar-10-batches-py"))
            open(os.path.join(root, "cifar-10-batches-py", "ours"), "w").close()
        download.base_folder, download.filename = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        monkeypatch.setattr(torchvision.datasets, "CIFAR10", download)

    data = str(tmp_path / "a" / "data")
    fake_cifar()
    _download_cifar(data)
    assert os.listdir(data) == ["cifar-10-batches-py"] and os.listdir(os.path.join(data, "cifar-10-batches-py")) == [
        "ours"]  # no temporary folder left
    data = str(tmp_path / "b")
    fake_cifar(finish_first=True)
    _download_cifar(data)
    assert os.listdir(data) == ["cifar-10-batches-py"] and os.listdir(os.path.join(data, "cifar-10-batches-py")) == [
        "theirs"]  # the first complete copy stays; nothing nested inside it
    fake_cifar(fail=True)
    with pytest.raises(UserError, match="downloading it failed .no network."):
        _download_cifar(str(tmp_path / "c" / "data"))
    assert not (tmp_path / "c").exists()
    with pytest.raises(UserError):
        _download_cifar(data)  # a folder that was there before stays, without a temporary folder in it
    assert os.listdir(data) == ["cifar-10-batches-py"]


def test_cifar10_and_cifar100_in_one_folder_are_told_apart_by_naming_the_dataset_folder(tmp_path, capsys):
    """torchvision's CIFAR10 and CIFAR100 downloads share one root; the root gave CIFAR-10 with no word of the
    other, and its cifar-100-python/ was refused as a folder inside the dataset, naming the root: no way to
    CIFAR-100 but moving folders."""
    root = write_cifar100(write_cifar_batches(str(tmp_path / "data")))
    cifar10, cifar100 = os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-100-python")
    both = load_data(root, 8)
    assert len(both.classes) == 10 and dataset_name(root) == "cifar10"
    assert capsys.readouterr().err.strip() == (f"note: {root} holds CIFAR-10 and CIFAR-100; this is CIFAR-10 (for "
                                               f"CIFAR-100 pass --data_dir {cifar100})")
    ten, hundred = load_data(cifar10, 8), load_data(cifar100 + os.sep, 8)
    assert capsys.readouterr().err == ""
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(ten, name), getattr(both, name)), name
    assert ten.classes == both.classes
    assert len(hundred.classes) == 100 and hundred.train_images.shape == (200, 3, 8, 8)
    assert dataset_name(cifar100) == "cifar100"
    assert default_log_dir(cifar100, "vit-t-mae.pth") == os.path.join("logs", "cifar100", "vit-t-mae")
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-100-python"]  # nothing downloaded


def test_another_machines_download_in_progress_is_not_taken_for_a_dataset_one_folder_down(tmp_path, monkeypatch):
    busy = tmp_path / "data"  # a shared disk: another machine's download, not yet renamed into place
    write_cifar_batches(str(busy / ".cifar-download-x"))
    calls = []
    monkeypatch.setattr(datasets, "_download_cifar", lambda data_dir, kind: calls.append(data_dir) or
                        write_cifar_batches(data_dir))  # this machine's own download, into place
    data = load_data(str(busy), 32)
    assert calls == [str(busy)] and len(data.train_images) == 100


@pytest.mark.parametrize("dataset", ["CIFAR10", "CIFAR100"])
def test_an_archive_from_the_cifar_site_is_checked_and_extracted_without_a_download(tmp_path, monkeypatch, dataset):
    import hashlib
    import tarfile

    import torchvision
    cls = getattr(torchvision.datasets, dataset)
    made = tmp_path / "made"
    (write_cifar_batches if dataset == "CIFAR10" else write_cifar100)(str(made))
    md5 = lambda path: hashlib.md5(open(path, "rb").read()).hexdigest()
    folder = made / cls.base_folder
    # the archive's layout, with the md5s of these tiny files where torchvision has those of the real ones
    monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
    monkeypatch.setattr(cls, "url", "http://localhost:9/nowhere.tar.gz")  # a download would fail at once
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / cls.filename, "w:gz") as tar:
        tar.add(folder, arcname=cls.base_folder)
    monkeypatch.setattr(cls, "tgz_md5", md5(data / cls.filename))
    name = "cifar10" if dataset == "CIFAR10" else "cifar100"
    assert dataset_name(str(data)) == name  # the default log dir knows it before extracting
    loaded = load_data(str(data), 32)
    assert sorted(os.listdir(data)) == sorted([cls.base_folder, cls.filename])  # no temporary folder left
    expected = load_data(str(made), 32)
    assert torch.equal(loaded.train_images, expected.train_images) and loaded.classes == expected.classes
    shutil.rmtree(data / cls.base_folder)  # an archive cut short is named, not downloaded over
    with open(data / cls.filename, "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=re.escape(cls.filename) + " is not the archive the CIFAR site serves"):
        load_data(str(data), 32)


def test_atomic_checkpoint_roundtrip_weights_only(tmp_path):
    model = MAE_ViT(**TINY)
    path = tmp_path / "ckpt.pth"
    args = mae_pretrain.get_args_parser().parse_args([])
    loader, _ = make_loader()
    umask = os.umask(0o022)
    try:
        save_atomic({"format": FORMAT, "kind": "mae_pretrain", "model": model.state_dict(),
                     "model_config": model.config, "args": plain_args(args),
                     "rng": rng_state(CPU, loader)}, str(path))
    finally:
        os.umask(umask)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # as a plain open() would make it, not the temporary file's 0600
    ckpt = torch.load(path, weights_only=True)
    restored = MAE_ViT(**ckpt["model_config"])
    restored.load_state_dict(ckpt["model"])
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    assert ckpt["args"]["crop_scale"] == [0.2, 1.0]


def test_a_failed_write_is_one_error_and_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_atomic({"step": 1}, str(path))

    def full_disk(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not write .*ckpt.pth \(No space left on device\); the file "
                                              "that was there is unchanged") as info:
        save_atomic({"step": 2}, str(path))
    assert info.value.code == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"] and torch.load(path) == {"step": 1}
    with pytest.raises(UserError, match="nothing was written"):
        save_atomic({"step": 2}, str(tmp_path / "new.pth"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_a_checkpoint_that_is_a_symbolic_link_is_written_through(tmp_path):
    """vit-t-mae.pth -> /big/disk/vit-t-mae.pth: the rename must replace the file on the big disk, as a plain
    torch.save would, not the link with a file in the small one."""
    big = tmp_path / "big"
    big.mkdir()
    link = tmp_path / "ckpt.pth"
    link.symlink_to(big / "ckpt.pth")  # dangling until the first save
    save_atomic({"step": 1}, str(link))
    save_atomic({"step": 2}, str(link))
    assert link.is_symlink() and os.readlink(link) == str(big / "ckpt.pth")
    assert torch.load(big / "ckpt.pth") == {"step": 2} and sorted(p.name for p in big.iterdir()) == ["ckpt.pth"]


def test_an_export_linked_to_the_runs_own_checkpoint_is_refused(tmp_path):
    """The export is written through a link (write_atomic), so a link to the run's checkpoint would replace it."""
    own = tmp_path / "cls.pth"
    (tmp_path / "export.pth").symlink_to(own)
    args = argparse.Namespace(export_timm=str(tmp_path / "export.pth"), overwrite=True)
    with pytest.raises(UserError, match="names this run's own checkpoint"):
        check_export_path(args, run_outputs=[str(own)])
    check_export_path(argparse.Namespace(export_timm=str(tmp_path / "other.pth"), overwrite=False),
                      run_outputs=[str(own)])


def test_a_log_torn_by_a_crash_resumes_and_a_full_disk_is_one_error(tmp_path, monkeypatch):
    rt, settings = Runtime(torch.device("cpu")), {"seed": 0}
    log = MetricsLog(str(tmp_path), rt, settings)
    for epoch in (1, 2, 3):
        log.line({"epoch": epoch, "loss": 1.0 / epoch})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "lo')  # a kill -9 or a full disk in the middle of a line's write
    log = MetricsLog(str(tmp_path), rt, settings, completed_epochs=3, resumed=True)  # the checkpoint's epoch
    assert read_json_lines(tmp_path / "metrics.jsonl") == [{"epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    assert len(read_json_lines(tmp_path / "runs.jsonl")) == 2

    def full_disk(path, mode="r", *rest):
        if "a" in mode:
            raise OSError(28, "No space left on device")
        return open(path, mode, *rest)
    monkeypatch.setattr(metrics, "open", full_disk, raising=False)
    with pytest.raises(UserError, match=r"could not write .*metrics.jsonl \(No space left on device\); the "
                                              "last checkpoint on disk is as it was") as info:
        log.line({"epoch": 4})
    assert info.value.code == 1
    log.close()


def test_hidden_files_and_folders_of_an_image_tree_are_left_out(tmp_path):
    """Jupyter's .ipynb_checkpoints/ is no class, and macOS's ._NAME.jpg is no image."""
    root = write_image_folder(str(tmp_path / "folder"), train=20, test=10)
    clean = load_data(root, 8)
    shutil.rmtree(os.path.join(root, ".cache"))
    for junk in ("train/.ipynb_checkpoints/0000.jpg", "train/cat/._0003.jpg", "test/dog/.thumbs/0001.jpg"):
        os.makedirs(os.path.dirname(os.path.join(root, junk)), exist_ok=True)
        with open(os.path.join(root, junk), "wb") as f:
            f.write(b"not a jpeg")
    os.makedirs(os.path.join(root, "test", ".empty"))
    data = load_data(root, 8)
    assert data.classes == clean.classes == sorted(set(CLASSES))
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(data, name), getattr(clean, name)), name


def test_a_test_split_without_the_train_class_folders_is_named_before_any_decoding(tmp_path):
    """Tiny-ImageNet's val/ is val/images/*.JPEG plus a list of labels: one class folder, 'images'. The
    mismatch was found only after both splits had been decoded (minutes for 100,000 images), and not named."""
    root = write_image_folder(str(tmp_path / "tiny"), train=30, test=10, test_name="val")
    os.makedirs(os.path.join(root, "val", "images"))
    for folder in os.listdir(os.path.join(root, "val")):
        if folder != "images":
            for name in os.listdir(os.path.join(root, "val", folder)):
                os.replace(os.path.join(root, "val", folder, name), os.path.join(root, "val", "images", folder + name))
            os.rmdir(os.path.join(root, "val", folder))
    train_classes = sorted(os.listdir(os.path.join(root, "train")))
    with pytest.raises(UserError) as e:
        load_data(root, 8)
    assert f"({len(train_classes)}) and {os.path.join(root, 'val')} (1) differ: only in val/: images; only in " \
           f"train/: {', '.join(train_classes[:3])}, ..." in str(e.value)
    assert sorted(os.listdir(root)) == ["train", "val"]  # nothing decoded: no .cache/
    # no class folders at all in val/ (its images loose in it): also named before train/ is decoded
    for name in os.listdir(os.path.join(root, "val", "images")):
        os.replace(os.path.join(root, "val", "images", name), os.path.join(root, "val", name))
    os.rmdir(os.path.join(root, "val", "images"))
    with pytest.raises(UserError) as e:
        load_data(root, 8)
    assert str(e.value).startswith(f"{os.path.join(root, 'val')} holds no class folders")
    assert sorted(os.listdir(root)) == ["train", "val"]


def test_a_cache_that_cannot_go_beside_the_images_goes_to_the_users_cache_folder(tmp_path, capsys, monkeypatch):
    """A read-only dataset (shared on a cluster) was decoded again by every run."""
    from conftest import write_image_folder
    root = write_image_folder(str(tmp_path / "folder"))
    (tmp_path / "folder" / ".cache").write_text("a file where the cache folder would go")  # unwritable, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    images, labels, classes = decode_folder(os.path.join(root, "train"), 8)
    assert images.shape == (40, 3, 8, 8) and len(labels) == 40 and len(classes) == 10
    home = decode_cache_paths(os.path.join(root, "train"), 8)[1]
    assert os.path.dirname(home) == str(tmp_path / "home-cache" / "cifar-mae") and os.path.isfile(home)
    assert f"cached in {home} instead" in capsys.readouterr().err
    monkeypatch.setattr(image_folders, "read_image", lambda *a: pytest.fail("decoded again"))
    cached = decode_folder(os.path.join(root, "train"), 8)
    assert torch.equal(cached[0], images) and torch.equal(cached[1], labels) and cached[2] == classes
    assert capsys.readouterr().err == ""


def test_an_unwritable_cache_is_a_note_and_the_images_still_load(tmp_path, capsys, monkeypatch):
    from conftest import write_image_folder
    root = write_image_folder(str(tmp_path / "folder"))
    (tmp_path / "folder" / ".cache").write_text("a file where the cache folder would go")
    (tmp_path / "home-cache").write_text("nor can the user's cache folder be made")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    images, labels, classes = decode_folder(os.path.join(root, "train"), 8)
    assert images.shape == (40, 3, 8, 8) and len(labels) == 40 and len(classes) == 10
    err = capsys.readouterr().err
    assert "note: could not write" in err and "the next run decodes the images again" in err


def test_a_mid_epoch_checkpoint_gives_the_epochs_sums_to_rank_0_only(capsys):
    """The sums saved are those of all ranks added up; restored, rank 0 holds them and the others start from
    zero, so the epoch's all-reduced loss and accuracy count each image once with any number of processes."""
    model = tiny_classifier()
    trainer = make_trainer(model, 4)
    loader, _ = make_loader()
    sums = torch.tensor([6.0, 8.0, 3.0], dtype=torch.float64)  # loss * images, images, correct: after 1 step
    state = training_state(trainer, loader, CPU, {},
                           EpochState(loader.order.new_epoch(), 1, sums))
    ckpt = {"model": model.state_dict(), "epoch": 0, **state}
    for rank, expected in ((0, sums), (1, torch.zeros(3, dtype=torch.float64))):
        rt = Runtime(torch.device("cpu"), rank=rank, world_size=2)  # a resume in two processes
        epoch, restored = restore_training_state(ckpt, "c.pth", model, trainer, loader, rt, None)
        assert (epoch, restored.step) == (0, 1) and torch.equal(restored.sums, expected)
    assert "RNG states of 1 processes, this run has 2; the order of the images goes on" in capsys.readouterr().err
    other, _ = make_loader(seed=9)  # the next epochs' order follows the checkpoint's, in any number of processes
    restore_training_state(ckpt, "c.pth", model, trainer, other, Runtime(torch.device("cpu"), world_size=2), None)
    assert torch.equal(other.order.new_epoch(), loader.order.new_epoch())


@pytest.mark.parametrize("script,argv", [(mae_pretrain, ["--base_learning_rate", "nan"]),
                                         (mae_pretrain, ["--crop_scale", "0.2", "inf"]),  # nargs, in a group
                                         (train_classifier, ["--clip_grad", "inf"]),
                                         (train_classifier, ["--weight_decay", "nan"])])
def test_float_flags_refuse_nan_and_inf(script, argv, capsys):
    """nan passes float() and most range checks (nan < 0 is False) and would poison the weights."""
    with pytest.raises(SystemExit) as refused:
        script.get_args_parser().parse_args(argv)
    assert refused.value.code == 2 and "is not a finite number" in capsys.readouterr().err
    assert script.get_args_parser().parse_args(argv[:-1] + ["0.5"]) is not None  # a finite value passes


def test_rng_state_restores_every_stream():
    loader, _ = make_loader(crop_scale=(0.2, 1.0), flip=True)
    state = rng_state(CPU, loader)
    draws = lambda: (torch.rand(3), np.random.rand(3).tolist(), random.random(), loader.order.new_epoch(),
                     next(loader.batches(loader.order.new_epoch()))[0])
    first = draws()
    set_rng_state(state, CPU, loader)
    second = draws()
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and first[2] == second[2]
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])


@pytest.mark.parametrize("loader_class", [DeviceLoader, TorchLoader])
def test_knn_accuracy_and_monitor_leaves_rng_and_mode_alone(loader_class):
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(feats, labels, torch.tensor([[1.0, 0.05], [0.0, 1.0]]), torch.tensor([0, 1]), 2,
                        k=2) == 1.0
    # one near neighbour of class 1 against two farther ones of class 0: the temperature decides
    feats, labels, query = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]), torch.tensor([1, 0, 0]), [[1.0, 0.1]]
    vote = lambda t: knn_accuracy(feats, labels, torch.tensor(query), torch.tensor([1]), 2, k=3, temperature=t)
    assert (vote(0.07), vote(10.0)) == (1.0, 0.0)  # sharp votes: the nearest wins; flat ones: the majority
    assert vote(1e-6) == 1.0  # exp(sim / T) would be inf for all three, a tie; the limit is 1-NN
    encoder = MAE_ViT(**TINY).encoder.train()
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    loaders = [loader_class(images, torch.arange(12) % 3, 5, device=torch.device("cpu"), train=False)
               for _ in range(2)]  # the DataLoader's start draws no seed from torch's global RNG either
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    with torch.enable_grad():
        acc = knn_monitor(encoder, *loaders, 3, CPU, k=3)
    assert encoder.training  # mode restored
    with torch.no_grad():  # the monitor's figure: kNN of the cls features, in eval mode, every image its own query
        feats = encoder.eval().forward_features(normalize(images))[:, 0]
    encoder.train()
    assert acc == knn_accuracy(feats, torch.arange(12) % 3, feats, torch.arange(12) % 3, 3, k=3)
    assert torch.equal(torch.rand(1), expected)
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("global_pool,linear_probe", [(False, False), (True, False), (False, True)])
def test_timm_export_gives_same_logits(global_pool, linear_probe):
    import timm
    model = tiny_classifier(global_pool=global_pool, linear_probe=linear_probe)
    if linear_probe:  # give the BatchNorm real statistics
        model.train()
        model(torch.randn(16, 3, 8, 8) * 3 + 1)
    model.eval()
    config = dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, in_chans=3,
                  pos_embed="learned", num_classes=10, global_pool=global_pool, linear_probe=linear_probe)
    state, kwargs = classifier_export(model, config)
    reference = timm.create_model(**kwargs)
    reference.load_state_dict(state, strict=True)
    reference.eval()
    x = torch.randn(4, 3, 8, 8)
    logits = model(x)  # of about 1e-4 with a fresh head: a tolerance relative to them, not an absolute 1e-5
    torch.testing.assert_close(reference(x), logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())


def test_default_output_and_log_paths_follow_the_checkpoint_and_the_dataset(tmp_path):
    parse = lambda *argv: train_classifier.get_args_parser().parse_args(list(argv))
    named = lambda *argv: train_classifier.Classification.output_path(parse(*argv))
    assert named("--pretrained_model_path", "vit-t-mae.pth") == "vit-t-classifier-from_pretrained.pth"
    assert named() == "vit-t-classifier-from_scratch.pth"
    assert named("--pretrained_model_path", "m.pth", "--output_model_path", "x.pth") == "x.pth"
    # the data's name as load_data would find it: CIFAR-10 (also when it is still to be downloaded), CIFAR-100,
    # or the ImageFolder tree's own folder name
    write_cifar_batches(str(tmp_path / "c10"), per_batch=1, test=1)
    write_cifar100(str(tmp_path / "c100"), train=1, test=1)
    write_image_folder(str(tmp_path / "pets"), train=2, test=2)
    names = {d: default_log_dir(str(tmp_path / d), "runs/vit-t-ft.pth") for d in ("c10", "c100", "pets", "none")}
    assert names == {"c10": os.path.join("logs", "cifar10", "vit-t-ft"),
                     "c100": os.path.join("logs", "cifar100", "vit-t-ft"),
                     "pets": os.path.join("logs", "pets", "vit-t-ft"),
                     "none": os.path.join("logs", "cifar10", "vit-t-ft")}


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_mae_encoder_export_gives_timm_the_same_features(pos_embed):
    import timm
    torch.manual_seed(0)
    mae = MAE_ViT(**TINY, pos_embed=pos_embed).eval()
    state, kwargs = encoder_export(mae.encoder, mae.config)
    assert kwargs["num_classes"] == 0 and kwargs["global_pool"] == "token"
    backbone = timm.create_model(**kwargs)
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    x = torch.randn(4, 3, 8, 8)
    ours = mae.encoder.forward_features(x)  # all tokens, no masking
    torch.testing.assert_close(backbone.forward_features(x), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone(x), ours[:, 0], rtol=1e-4, atol=1e-5)  # the pooled cls feature


def test_a_one_process_run_on_a_machine_with_several_gpus_names_the_torchrun_command(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    note = lambda device, rt: note_devices(rt, device, "mae_pretrain.py") or \
        capsys.readouterr().out
    one = Runtime(torch.device("cuda", 0))
    assert note(None, one) == note("cuda", one) == (
        "note: torch sees 4 CUDA devices and this run uses one (cuda:0); torchrun --nproc_per_node=4 "
        "mae_pretrain.py with the same flags trains on all 4, with the same --batch_size split between them "
        "(CUDA_VISIBLE_DEVICES picks which)\n")
    assert note("cuda:1", Runtime(torch.device("cuda", 1))) == ""  # picked on purpose
    assert note(None, Runtime(torch.device("cuda", 0), world_size=4)) == ""  # under torchrun
    assert note("cpu", Runtime(torch.device("cpu"))) == ""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert note(None, one) == ""


def test_a_run_that_falls_back_to_the_cpu_says_why(monkeypatch, capsys):
    """No --device and no GPU: a note on stderr names the reason (a torch without CUDA, or no usable GPU), since
    the defaults would take days on a CPU. --device cpu (a CPU run meant as one) prints nothing."""
    cpu = Runtime(torch.device("cpu"))
    note = lambda device: note_devices(cpu, device, "mae_pretrain.py") or \
        capsys.readouterr()
    monkeypatch.setattr(torch.version, "cuda", None)
    out = note(None)
    assert out.out == "" and out.err.startswith(
        f"note: no CUDA device (this torch, {torch.__version__}, is built without CUDA), so this runs on the CPU")
    assert out.err.count("\n") == 1 and "--device cpu says this is meant" in out.err
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert f"(this torch, {torch.__version__} for CUDA 13.0, finds no GPU or no driver it can use)" in note(None).err
    assert note("cpu") == ("", "")


def test_a_cuda_device_index_past_the_visible_ones_is_a_clear_error(monkeypatch):
    """Checked before torch.cuda.set_device, whose 'invalid device ordinal' would be a traceback. Likewise
    --compile on a GPU that Triton does not support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device was reached"))
    with pytest.raises(UserError, match=r"--device cuda:2: torch sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        setup_runtime(0, device="cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun --nproc_per_node=4 on a machine with 2 GPUs
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UserError, match=r"process 3 of this machine takes cuda:3, but torch sees 2 CUDA "
                                              r"device\(s\): start at most 2 processes per machine"):
        setup_runtime(0)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    # and --compile asked for on a GPU too old for Triton (a GTX 1080): refused at the start, not at the first step
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(UserError, match=r"--compile: NVIDIA GeForce GTX 1080 \(compute capability 6.1\) is "
                                              "older than the 7.0"):
        setup_runtime(0, device="cuda:1", compile=True)
    # --amp bf16 on a GPU without it (the original's RTX 2080 Ti): refused, fp16 named
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 2080 Ti")
    with pytest.raises(UserError, match=r"--amp bf16: NVIDIA GeForce RTX 2080 Ti \(compute capability 7.5\) "
                                              "does not compute bf16 natively"):
        setup_runtime(0, device="cuda:0", amp="bf16")


@pytest.mark.parametrize("flag, expected", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                            ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_mode_reaches_torch_compile(monkeypatch, flag, expected):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    for script in (mae_pretrain, train_classifier):
        args = script.get_args_parser().parse_args(["--device", "cpu", "--compile", "--compile_mode", flag])
        rt = start_runtime(args)
        model = tiny_classifier()
        assert wrap_model(model, rt) is model and seen == {"mode": expected}
        assert rt.describe() == "amp off, compile True" + (f" ({expected})" if expected else "")


def test_time_left_leaves_out_the_compiling_first_epoch_and_reads_in_two_units():
    assert [format_duration(s) for s in (0, 45, 725, 4440, 4479.6, 277200, 86400)] == \
        ["0s", "45s", "12m 5s", "1h 14m", "1h 14m", "3d 5h", "1d 0h"]
    clock = EpochClock()
    assert clock.left(5) == ""
    clock.seconds = [100.0]  # only the first epoch: it is all there is to go by
    assert clock.left(2) == ", about 3m 20s left"
    clock.seconds = [100.0, 10.0, 20.0]  # the first (compile) epoch no longer counts
    assert clock.left(3) == ", about 45s left" and clock.left(0) == ""


def test_a_time_limit_stops_after_the_last_epoch_that_fits(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    rt = Runtime(torch.device("cpu"))
    clock = EpochClock(started=990.0)  # 10 s of setup before the first epoch
    for end, epoch in ((1050.0, 1), (1070.0, 2), (1090.0, 3)):
        # epoch 1 (50 s, compiling) ends at 60 s: one more as long would end at 110 s. Epochs 2 and 3 take
        # 20 s: the first no longer counts, and the next would end at 100 s, then at exactly 120 s
        now[0] = end
        assert stop_reason(epoch, 10, clock, rt, None, 2.0) is None
        clock.lap()
    now[0] = 1110.0  # 120 s gone: a fifth epoch would end at 140 s
    assert stop_reason(4, 10, clock, rt, None, 2.0) == \
        "since another epoch (about 20s) would end past --stop_after_minutes 2 (2m 0s gone)"
    assert stop_reason(10, 10, clock, rt, None, 2.0) is None  # the schedule's end is no stop
    assert stop_reason(3, 10, clock, rt, after_epoch=4) is None and stop_reason(4, 10, clock, rt, after_epoch=4) == \
        "as asked"


def test_fine_tuning_points_out_an_unfinished_pretraining():
    note = pretraining_note("m.pth", {"kind": "mae_pretrain", "epoch": 500, "args": {"total_epoch": 2000}})
    assert note.startswith("encoder from m.pth: MAE pretraining after epoch 500 of 2000 (an unfinished run")
    assert "resume it with python mae_pretrain.py --resume m.pth)" in note
    assert pretraining_note("m.pth", {"kind": "mae_pretrain", "epoch": 2000, "args": {"total_epoch": 2000}}) == \
        "encoder from m.pth: MAE pretraining after epoch 2000 of 2000"
    assert pretraining_note("m.pth", {"epoch": 0, "converted_from": "old.pt"}) == \
        "encoder from m.pth: converted from old.pt, whose epochs are not recorded"


@pytest.mark.parametrize("capability, bf16, expected", [((9, 0), True, ("bf16", True)), ((8, 6), True, ("bf16", True)),
                                                        ((7, 5), False, ("fp16", True)),  # the original's 2080 Ti
                                                        ((6, 1), False, ("fp16", False))])  # too old for Triton
def test_cuda_defaults_follow_what_the_gpu_can_do(monkeypatch, capability, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    assert cuda_defaults() == expected


def test_out_of_memory_ends_with_one_line_that_names_the_cure(capsys):
    @cli_main
    def main(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 10.75 GiB\nOf the allocated memory ...")
    with pytest.raises(SystemExit) as exit_info:
        main(None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "--max_device_batch_size" in lines[0] and "Of the allocated" not in lines[0]


def test_data_fingerprint_follows_the_pixels_labels_and_class_names():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=g)
    make = lambda imgs, labels, classes: ImageData(imgs, labels, imgs[:2], labels[:2], classes)
    base = data_info("d", make(images, torch.arange(6) % 2, ["a", "b"]))
    assert base == data_info("d", make(images.clone(), torch.arange(6) % 2, ["a", "b"]))
    changed = images.clone()
    changed[5, 0, 0, 0] ^= 1  # one bit of one pixel of a training image
    others = [make(changed, torch.arange(6) % 2, ["a", "b"]), make(images, (torch.arange(6) + 1) % 2, ["a", "b"]),
              make(images, torch.arange(6) % 2, ["b", "a"])]
    assert len({base["fingerprint"]} | {data_info("d", data)["fingerprint"] for data in others}) == 4
    assert (base["train_images"], base["test_images"], base["classes"]) == (6, 2, 2)


def test_a_path_that_starts_with_a_tilde_means_the_home_folder(monkeypatch, tmp_path):
    """bash leaves `--data_dir=~/data` and a quoted "~/data" alone; taken literally they would make (or download
    CIFAR-10 into) a folder named ~ in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = train_classifier.get_args_parser().parse_args(["--data_dir=~/data", "--output_model_path", "~/c.pth",
                                                          "--randaug", "rand-m9-mstd0.5", "--resume", "auto"])
    assert (args.data_dir, args.output_model_path) == (str(tmp_path / "data"), str(tmp_path / "c.pth"))
    assert (args.randaug, args.resume, args.log_dir) == ("rand-m9-mstd0.5", "auto", None)  # the rest as given

    parser = ArgumentParser("paths")
    parser.add_argument("--images", type=path_arg, nargs="+")
    assert parser.parse_args(["--images", "~/a.png", "b~.png"]).images == [str(tmp_path / "a.png"), "b~.png"]


@pytest.mark.parametrize("script,argv", [(train_classifier, ["--eval_only", ""]),  # would train a new model
                                         (train_classifier, ["--pretrained_model_path", ""]),  # from scratch
                                         (mae_pretrain, ["--resume", ""]),
                                         (mae_pretrain, ["--data_dir="]),  # would mean the working folder
                                         (mae_pretrain, ["--model_path", ""])])
def test_an_empty_path_is_refused_rather_than_read_as_no_flag(script, argv, capsys):
    """`--eval_only "$CKPT"` with CKPT unset in a job script: without this, a training run from scratch."""
    with pytest.raises(SystemExit) as refused:
        script.get_args_parser().parse_args(argv)
    assert refused.value.code == 2
    assert f"argument {argv[0].rstrip('=')}: empty (an unset variable in a script?)" in capsys.readouterr().err


@pytest.mark.parametrize("interval, inside, outside", [("[0, 1)", [0, 0.5], [1, -0.1]), ("(0, 1]", [1, 1e-9], [0, 1.1]),
                                                       ("(0, 1)", [0.5], [0, 1]), ("[0, inf)", [0, 1e9], [-1e-9])])
def test_flag_intervals_take_their_bounds_as_written(interval, inside, outside):
    from cifar_mae.flags import check_interval
    for value in inside:
        check_interval(argparse.Namespace(x=value, unset=None), interval, "x", "unset")
    for value in outside:
        with pytest.raises(UserError, match=r"^--x (must lie in|must not be negative)"):
            check_interval(argparse.Namespace(x=value), interval, "x")
