"""MoCo (moco_pretrain.py): its loss, momentum and queue against restatements of the official code, its views
against torchvision's colour ops, the CIFAR ResNet-18 and split BatchNorm, and the job end to end."""
import copy
import functools
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import moco_pretrain
import utils
from cifar_mae import lifecycle
from cifar_mae.augment import normalize
from cifar_mae.datasets import load_data, spread_test_indexes
from cifar_mae.engine import Trainer
from cifar_mae.knn import pooled_features
from cifar_mae.moco import MoCo
from cifar_mae.optim import param_groups
from cifar_mae.resnet import SplitBatchNorm2d, cifar_resnet, split_batch_norms
from cifar_mae.runtime import Runtime
from cifar_mae.views import COLOR_OPS, TwoViewLoader, color_jitter, grayscale, sample_jitter
from cifar_mae.timm_export import encoder_export
from conftest import brute_force_knn, interrupt_at_step, projector, write_cifar_batches
from model import build_encoder
from test_scripts import assert_same_tensors, classify, events, load, metrics, one_and_two_processes, run_here

CPU = Runtime(torch.device("cpu"))
VIT = dict(image_size=8, patch_size=4, emb_dim=16, encoder_layer=1, encoder_head=2)
TORCHVISION_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def random_images(n, size=8, seed=0):
    """Float images in [0, 1], with pure grey, saturated and equal-channel pixels among them (hue's edge cases)."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.5
    x[1, :, :2] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    x[1, :, 2:4] = torch.tensor([0.0, 1.0, 1.0])[:, None, None]
    x[2, 1] = x[2, 0]  # red = green
    return x


# ------------------------------------------------------------------------------------------------ views

@pytest.mark.parametrize("index", range(4))
def test_each_colour_op_is_torchvisions_on_the_same_images_and_factors(index):
    x = random_images(32)
    low, high = (-0.5, 0.5) if index == 3 else (0.0, 2.0)
    factors = low + (high - low) * torch.rand(32, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([TORCHVISION_OPS[index](image, factor.item()) for image, factor in zip(x, factors)])
    torch.testing.assert_close(COLOR_OPS[index](x, factors), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=0)


def test_colour_jitter_applies_each_samples_ops_in_its_order_as_torchvision_does():
    """ColorJitter: a random order of the four ops per image, each with its factor; RandomApply: only some."""
    x = random_images(64)
    generator = torch.Generator().manual_seed(3)
    strength = (0.4, 0.4, 0.4, 0.1)
    applied, order, factors = sample_jitter(64, strength, 0.8, generator, x.device)
    expected = []
    for i, image in enumerate(x):
        if applied[i]:
            for op in order[i].tolist():
                image = TORCHVISION_OPS[op](image, factors[i, op].item())
        expected.append(image)
    torch.testing.assert_close(color_jitter(x, applied, order, factors, strength), torch.stack(expected), rtol=0,
                               atol=2e-6)
    assert not applied.all() and applied.any() and len({tuple(o) for o in order.tolist()}) > 10


def test_jitter_draws_lie_in_torchvisions_ranges_and_apply_at_the_given_rate():
    applied, order, factors = sample_jitter(20000, (0.4, 0.3, 0.2, 0.1), 0.8, torch.Generator().manual_seed(0),
                                            torch.device("cpu"))
    low, high = torch.tensor([0.6, 0.7, 0.8, -0.1]), torch.tensor([1.4, 1.3, 1.2, 0.1])
    assert ((factors >= low) & (factors <= high)).all()
    assert torch.allclose(factors.min(0).values, low, atol=1e-3) and torch.allclose(factors.max(0).values, high,
                                                                                     atol=1e-3)
    assert abs(applied.float().mean().item() - 0.8) < 0.01  # 20,000 draws: the standard error is 0.003
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(20000, 4))  # permutations
    first = torch.bincount(order[:, 0], minlength=4).float() / 20000
    assert (first - 0.25).abs().max() < 0.015


def test_the_two_views_of_an_image_are_drawn_apart_and_each_is_a_crop_of_it():
    images = (torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    plain = TwoViewLoader(images, torch.zeros(8, dtype=torch.long), 8, device=torch.device("cpu"), seed=0,
                          crop_scale=None, flip=False, jitter_prob=0.0, gray_prob=0.0)
    views, _ = next(plain.batches(plain.order.new_epoch()))
    assert views.shape == (8, 2, 3, 8, 8)
    order = plain.order.new_epoch()
    plain.order_generator.manual_seed(0)
    order = plain.order.new_epoch()
    # no augmentation: both views are the image in [-1, 1]
    views, _ = next(plain.batches(order))
    torch.testing.assert_close(views[:, 0], images[order].float() / 255 * 2 - 1)
    torch.testing.assert_close(views[:, 1], views[:, 0])
    augmented = TwoViewLoader(images, torch.zeros(8, dtype=torch.long), 8, device=torch.device("cpu"), seed=0,
                              crop_scale=(0.2, 1.0), flip=True)
    views, _ = next(augmented.batches(augmented.order.new_epoch()))
    assert all(not torch.equal(views[i, 0], views[i, 1]) for i in range(8))
    assert views.min() >= -1 and views.max() <= 1


# ------------------------------------------------------------------------------------------- ResNet

def basic_block_parameters(cin, cout, downsample):
    """Two 3x3 convolutions and their BatchNorms, and a 1x1 convolution + BatchNorm on the shortcut."""
    return cin * cout * 9 + cout * cout * 9 + 4 * cout + ((cin * cout + 2 * cout) if downsample else 0)


def test_the_cifar_resnet18_keeps_32x32_to_4x4_and_has_the_expected_parameters():
    model = cifar_resnet("resnet18")
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 512, 4, 4) and pooled_features(model, x).shape == (2, 512)
    stem = 3 * 64 * 9 + 2 * 64  # 3x3 convolution, BatchNorm, no max-pool
    blocks = sum(basic_block_parameters(cin, cout, cin != cout) + basic_block_parameters(cout, cout, False)
                 for cin, cout in ((64, 64), (64, 128), (128, 256), (256, 512)))
    assert sum(p.numel() for p in model.parameters()) == stem + blocks == 11_168_832
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))


def test_split_batch_norm_normalises_each_group_alone_and_averages_their_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(12, 4, 3, 3) * 3 + 1
    split = SplitBatchNorm2d(4, num_splits=3)
    split.weight.data.uniform_(0.5, 1.5)
    split.bias.data.uniform_(-1, 1)
    out = split(x)
    means, variances = [], []
    for group in range(3):
        plain = torch.nn.BatchNorm2d(4)
        plain.load_state_dict({k: v for k, v in split.state_dict().items()})
        plain.running_mean.zero_()
        plain.running_var.fill_(1)
        torch.testing.assert_close(out[group::3], plain(x[group::3]))
        means.append(plain.running_mean)
        variances.append(plain.running_var)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                      split.bias, False, 0.0, split.eps))
    resnet = split_batch_norms(cifar_resnet("resnet18"), 8)
    assert all(m.num_splits == 8 for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------- MoCo itself

def tiny_moco(version, **kwargs):
    torch.manual_seed(0)
    return MoCo(build_encoder(VIT), 16, version=version, dim=8, mlp_dim=12, **kwargs)


def official_v2_loss(f_q, f_k, queue, x_q, x_k, t):
    """MoCo's Algorithm 1: q = f_q(x_q), k = f_k(x_k) without gradient, both normalised; positive logit first,
    then the queue's; cross-entropy with label 0 over logits / t."""
    q = F.normalize(f_q(x_q), dim=1)
    with torch.no_grad():
        k = F.normalize(f_k(x_k), dim=1)
    l_pos = torch.bmm(q.view(len(q), 1, -1), k.view(len(k), -1, 1)).view(-1, 1)
    l_neg = torch.mm(q, queue.T)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)), k


def official_v3_loss(f_q, f_k, x1, x2, t):
    """moco-v3: q = predictor(projector(encoder)), k from the momentum encoder; ctr(q1, k2) + ctr(q2, k1), each
    the cross-entropy of q . k / t against the matching index, times 2t."""
    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return F.cross_entropy(torch.einsum("nc,mc->nm", q, k) / t, torch.arange(len(q))) * 2 * t
    q1, q2 = f_q(x1), f_q(x2)
    with torch.no_grad():
        k1, k2 = f_k(x1), f_k(x2)
    return ctr(q1, k2) + ctr(q2, k1)


def train_steps(model, views, steps, total_steps, micro_batch, lr=0.5, wrap=lambda model: model):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    trainer = Trainer(wrap(model), moco_pretrain.moco_loss, optimizer, lambda step: lr, CPU, micro_batch=micro_batch,
                      num_extra=2, after_step=functools.partial(model.after_step, total_steps=total_steps))
    for step in range(steps):
        trainer.step(views[step], torch.zeros(len(views[step]), dtype=torch.long), step)
    return optimizer


def test_moco_v2_loss_momentum_and_queue_follow_the_official_algorithm():
    """Two optimizer steps of 4 images in micro-batches of 2, queue of 6: the loss, the SGD step of the query
    encoder, the key encoder's momentum update and the queue (its pointer wraps) as Algorithm 1 gives them for
    one batch of 4."""
    model = tiny_moco(2, queue_size=6, temperature=0.2, momentum=0.9)
    f_q = torch.nn.Sequential(copy.deepcopy(model.encoder), copy.deepcopy(model.projector))
    f_q_pooled = lambda x: f_q[1](pooled_features(f_q[0], x))
    f_k = torch.nn.Sequential(copy.deepcopy(model.momentum_encoder), copy.deepcopy(model.momentum_projector))
    f_k_pooled = lambda x: f_k[1](pooled_features(f_k[0], x))
    queue = model.queue.clone()
    views = torch.randn(2, 4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected_loss, k = official_v2_loss(f_q_pooled, f_k_pooled, queue, views[0, :, 0], views[0, :, 1], 0.2)
    loss, stats, _ = model(views[0])
    torch.testing.assert_close(loss, expected_loss)
    train_steps(model, views, 2, 10, micro_batch=2)
    for step in range(2):
        loss, k = official_v2_loss(f_q_pooled, f_k_pooled, queue, views[step, :, 0], views[step, :, 1], 0.2)
        f_q.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in f_q.parameters():
                p -= 0.5 * p.grad
            for p_k, p_q in zip(f_k.parameters(), f_q.parameters()):
                p_k.mul_(0.9).add_(p_q, alpha=0.1)
        queue[[(4 * step + i) % 6 for i in range(4)]] = k  # rows 0-3, then 4, 5, 0, 1
    for a, b in zip(f_q.parameters(), list(model.encoder.parameters()) + list(model.projector.parameters())):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(f_k.parameters(), model.momentum_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue, queue, rtol=1e-5, atol=1e-6)
    assert model.queue_ptr.item() == 2 and model.pending == []


def test_a_compiled_moco_v2_traces_its_forward_once_and_trains_as_the_eager_one():
    """On a GPU the model is compiled by default. The step's keys wait for the queue outside the compiled forward,
    so the four micro-batches of a step share one graph (a list that grew inside it recompiled it at each)."""
    views = torch.randn(2, 8, 2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    eager, compiled = tiny_moco(2, queue_size=12), tiny_moco(2, queue_size=12)
    train_steps(eager, views, 2, 10, micro_batch=2)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    train_steps(compiled, views, 2, 10, micro_batch=2, wrap=lambda model: torch.compile(model, backend="eager"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled.queue, eager.queue, rtol=1e-5, atol=1e-6)
    assert compiled.queue_ptr.item() == eager.queue_ptr.item() == 16 % 12 and compiled.pending == []
    for a, b in zip(compiled.momentum_parameters(), eager.momentum_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_key_encoder_gets_no_gradient_and_no_optimizer_state():
    model = tiny_moco(2, queue_size=8)
    optimizer = train_steps(model, torch.randn(1, 4, 2, 3, 8, 8), 1, 10, micro_batch=4)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(not p.requires_grad and p.grad is None and id(p) not in held for p in model.momentum_parameters())
    assert all(id(p) in held for p in model.encoder.parameters())
    groups = param_groups(model, 0.05, moco_pretrain.Pretraining.no_weight_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.encoder.parameters())) + \
        len(list(model.projector.parameters()))


def test_moco_v3_loss_and_cosine_momentum_follow_moco_v3():
    model = tiny_moco(3, temperature=0.2, momentum=0.9)
    f_q = torch.nn.Sequential(copy.deepcopy(model.encoder), copy.deepcopy(model.projector),
                              copy.deepcopy(model.predictor))
    f_k = torch.nn.Sequential(copy.deepcopy(model.momentum_encoder), copy.deepcopy(model.momentum_projector))
    query = lambda x: f_q[2](f_q[1](pooled_features(f_q[0], x)))
    key = lambda x: f_k[1](pooled_features(f_k[0], x))
    views = torch.randn(3, 4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    total = 3
    train_steps(model, views, 3, total, micro_batch=4, lr=0.01)
    for step in range(3):
        # the official code moves the key encoder at the start of each step, with the momentum of that point of
        # the run (epoch + i / iterations over epochs): 1 - (1 - m) (1 + cos(pi step / total)) / 2
        m = 1 - 0.5 * (1 + math.cos(math.pi * step / total)) * (1 - 0.9)
        with torch.no_grad():
            for p_k, p_q in zip(f_k.parameters(), list(f_q[0].parameters()) + list(f_q[1].parameters())):
                p_k.mul_(m).add_(p_q, alpha=1 - m)
        loss = official_v3_loss(query, key, views[step, :, 0], views[step, :, 1], 0.2)
        f_q.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in f_q.parameters():
                p -= 0.01 * p.grad
    # after the last step, the momentum of step 3 (= total: m = 1) leaves the key encoder as it was
    m = 1 - 0.5 * (1 + math.cos(math.pi * 3 / total)) * (1 - 0.9)
    assert m == 1.0
    query_params = list(model.encoder.parameters()) + list(model.projector.parameters()) + \
        list(model.predictor.parameters())
    for a, b in zip(f_q.parameters(), query_params):  # the losses are taken in float32: rounding, amplified
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # by BatchNorm over 4 images, step after step
    for a, b in zip(f_k.parameters(), model.momentum_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_shuffled_keys_come_back_to_their_images():
    """Keys of a BatchNorm backbone are made from the batch in a random order and put back in the batch's."""
    torch.manual_seed(0)
    encoder = split_batch_norms(cifar_resnet("resnet18"), 2)
    model = MoCo(encoder, 512, version=2, dim=8, queue_size=16, shuffle=True).eval()  # eval: no batch statistics
    x = torch.randn(6, 3, 8, 8)
    plain = model.momentum_projector(pooled_features(model.momentum_encoder, x))
    torch.testing.assert_close(model.key(x), plain)


# ---------------------------------------------------------------------------------------- the job

RESNET = ["--model", "resnet18_cifar", "--image_size", 8, "--bn_splits", 2, "--moco_k", 40]
VIT_FLAGS = ["--model", "vit_mini_patch4", "--image_size", 8, "--emb_dim", 16, "--encoder_layer", 1,
             "--encoder_head", 2, "--moco_dim", 8, "--moco_mlp_dim", 16, "--optimizer", "adamw"]


def moco(tmp_path, data, *extra, name="moco", capsys=None):
    """A tiny MoCo run in this process: 100 images, 2 epochs of 6 steps of 16 in micro-batches of 8."""
    ckpt, logs = tmp_path / f"{name}.pth", tmp_path / "logs" / name
    result = run_here(capsys, "moco_pretrain.py", "--data_dir", data, "-bs", 16, "--max_device_batch_size", 8,
                      "--total_epoch", 2, "--warmup_epoch", 1, "--knn_k", 5, "--model_path", ckpt, "--log_dir",
                      logs, "--device", "cpu", *extra)
    return result, ckpt, logs


def test_a_resnet_moco_stopped_mid_epoch_resumes_bit_identical(tmp_path, cifar_dir, capsys, monkeypatch):
    """Ctrl-C after step 3 of epoch 1: weights, both encoders, the queue and its pointer, the optimizer, the
    split BatchNorms' statistics and every RNG stream (the views' generator, the key shuffle's) carry over."""
    result, full, full_logs = moco(tmp_path, cifar_dir, *RESNET, name="full", capsys=capsys)
    assert result.returncode == 0, result.stderr
    interrupt_at_step(monkeypatch, 3)
    result, part, part_logs = moco(tmp_path, cifar_dir, *RESNET, name="part", capsys=capsys)
    monkeypatch.undo()
    assert result.returncode == 130 and "Resume with: python moco_pretrain.py --resume" in result.stderr
    assert (load(part)["epoch"], load(part)["epoch_state"]["step"]) == (0, 3)
    result = run_here(capsys, "moco_pretrain.py", "--resume", part, "--data_dir", cifar_dir)
    assert result.returncode == 0 and f"resumed {part} after epoch 0 (+3 steps)" in result.stdout, result.stderr
    a, b = load(full), load(part)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])
    assert a["model"]["queue_ptr"].item() == (2 * 6 * 16) % 40 and {"momentum_encoder.layer4.1.bn2.running_var",
                                                                      "queue", "momentum_projector.2.weight"} <= \
        a["model"].keys()
    untimed = lambda logs: [{k: v for k, v in line.items() if k not in ("images_per_s", "seconds")}
                            for line in metrics(logs)]
    assert untimed(part_logs) == untimed(full_logs)  # the same losses, similarities and kNN accuracies
    assert {"moco/loss", "moco/similarity/positive", "moco/similarity/negative", "knn_acc", "lr"} <= \
        set(events(full_logs).Tags()["scalars"])
    # the linear probe of its encoder: every weight of the ResNet loaded, and left as it was
    result, probe, _ = classify(tmp_path, cifar_dir, "--pretrained_model_path", full, "--linear_probe",
                                "--total_epoch", 1, "--warmup_epoch", 0, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "encoder from " in result.stdout and "MoCo pretraining after epoch 2 of 2" in result.stdout
    encoder = {k: v for k, v in a["model"].items() if k.startswith("encoder.")}
    trained = load(tmp_path / "cls-last.pth")["model"]
    assert_same_tensors(encoder, {k: trained[k] for k in encoder})
    assert load(probe)["model_config"]["resnet"] == "resnet18"


def test_a_vit_moco_v3_evaluates_exports_and_fine_tunes(tmp_path, capsys):
    data = write_cifar_batches(str(tmp_path / "data"), random_labels=True)
    result, ckpt, logs = moco(tmp_path, data, *VIT_FLAGS, "--moco_version", 3, "--freeze_patch_embed",
                              "--embedding_images", 15, capsys=capsys)
    assert result.returncode == 0, result.stderr
    saved = load(ckpt)["model"]
    assert "queue" not in saved and "predictor.0.weight" in saved
    # the frozen patch projection: the key encoder's copy moves towards it, and it never moved
    assert torch.equal(saved["encoder.patch_embed.proj.weight"], saved["momentum_encoder.patch_embed.proj.weight"])
    assert not torch.equal(saved["encoder.blocks.0.mlp.fc1.weight"], saved["momentum_encoder.blocks.0.mlp.fc1.weight"])
    written_by_run = projector(logs / "00002" / "test_features")
    result = run_here(capsys, "moco_pretrain.py", "--eval_only", ckpt, "--knn_k", 7, "--knn_t", 0.5,
                      "--export_timm", tmp_path / "timm.pth", "--embedding_images", 12)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr  # TensorBoard's, on a step's projector written again
    encoder, split = utils.load_model(str(ckpt)), load_data(data, 8)
    with torch.no_grad():
        train, test = (pooled_features(encoder, normalize(x)) for x in (split.train_images, split.test_images))
    expected = brute_force_knn(train, split.train_labels, test, split.test_labels, 10, 7, 0.5)
    assert f"kNN accuracy {expected:.2%} (k 7, T 0.5" in result.stdout and 0 < expected < 1
    # the projector's picture of the test set: images spread over the classes, their features and class names;
    # the end of the run and --eval_only (into the run's logs) both write it at the checkpoint's epoch
    for (table, names), count in ((written_by_run, 15), (projector(logs / "00002" / "test_features"), 12)):
        index = spread_test_indexes(split, count)
        torch.testing.assert_close(table, test[index], rtol=1e-4, atol=1e-5)
        assert names == [split.classes[i] for i in split.test_labels[index]]
    assert "test_features" in (logs / "projector_config.pbtxt").read_text()
    reference = timm.create_model(**encoder_export(encoder, load(ckpt)["model_config"])[1])
    reference.load_state_dict(load(tmp_path / "timm.pth"))
    torch.testing.assert_close(reference.eval()(normalize(split.test_images)), test, rtol=1e-5, atol=1e-5)
    result, _, _ = classify(tmp_path, data, "--pretrained_model_path", ckpt, "--linear_probe", "--total_epoch", 1,
                            "--warmup_epoch", 0, capsys=capsys)
    assert result.returncode == 0, result.stderr
    trained = load(tmp_path / "cls-last.pth")["model"]
    assert_same_tensors({k[len("encoder."):]: v for k, v in saved.items() if k.startswith("encoder.")},
                        {k: trained[k] for k in trained if not k.startswith("head.")})


BAD_INPUTS = {  # script, flags, what the one line on stderr says
    "views on the host": ("moco_pretrain.py", ["--loader", "torch"], "--loader torch is not supported"),
    "hue past half a turn": ("moco_pretrain.py", ["--jitter", 0.4, 0.4, 0.4, 0.6], "a hue of at most 0.5"),
    "ViT size of a ResNet": ("moco_pretrain.py", ["--patch_size", 4], "--patch_size acts on a ViT"),
    "frozen patches of a ResNet": ("moco_pretrain.py", ["--freeze_patch_embed"], "--freeze_patch_embed acts on a ViT"),
    "export without a checkpoint": ("moco_pretrain.py", ["--export_timm", "x.pth"], "give the checkpoint with"),
    "momentum of 1": ("moco_pretrain.py", ["--moco_m", 1], "--moco_m must lie in [0, 1)"),
    "MAE of a ResNet": ("mae_pretrain.py", [], "resnet18 is a ResNet: pretrain it with moco_pretrain.py"),
    "cls pooling of a ResNet": ("train_classifier.py", ["--global_pool"], "--global_pool acts on a ViT"),
}


def test_batch_norm_groups_that_do_not_divide_the_micro_batch_end_with_one_line(tmp_path, cifar_dir, capsys):
    result, _, _ = moco(tmp_path, cifar_dir, *RESNET[:-4], "--bn_splits", 3, capsys=capsys)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --bn_splits 3 must divide the micro-batch (8 images): pick a --batch_size (or "
        "--max_device_batch_size) it divides, or another --bn_splits")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_with_one_clear_line_before_the_data(case, tmp_path, capsys, monkeypatch):
    script, flags, fragment = BAD_INPUTS[case]
    model = [] if "--model" in flags else ["--model", "resnet18_cifar"]
    monkeypatch.setattr(lifecycle, "load_data", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.chdir(tmp_path)
    result = run_here(capsys, script, *model, *flags, "--device", "cpu")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], \
        lines
    assert os.listdir(tmp_path) == []


def test_under_torchrun_the_queue_takes_the_keys_of_both_processes_in_rank_order(tmp_path, cifar_dir):
    """Views without augmentation and an lr too small to move a weight: every key is its image's, whichever
    process makes it, so the queue after 6 steps of 16 must hold the same 96 keys in the same order as in one
    process (rank 0 takes the first 8 images of each global batch, rank 1 the next 8)."""
    flags = ["--data_dir", cifar_dir, *VIT_FLAGS, "-bs", 16, "--max_device_batch_size", 8, "--total_epoch", 1,
             "--warmup_epoch", 0, "--base_learning_rate", 1e-30, "--moco_k", 128, "--crop_scale", 1, 1, "--no-flip",
             "--jitter_prob", 0, "--gray_prob", 0, "--knn_every", 0, "--device", "cpu"]
    one_and_two_processes(tmp_path, "moco_pretrain.py", flags, "--model_path")
    one, two = load(tmp_path / "one.pth")["model"], load(tmp_path / "two.pth")["model"]
    assert one["queue_ptr"].item() == two["queue_ptr"].item() == 96
    torch.testing.assert_close(two["queue"][:96], one["queue"][:96], rtol=1e-4, atol=1e-5)
    assert torch.equal(two["queue"][96:], one["queue"][96:])  # the random start of the queue, from the seed
