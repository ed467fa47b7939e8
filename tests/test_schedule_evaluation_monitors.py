"""The second round of checks against independent references: the learning rate over a whole run, the weights
that are evaluated and saved, the kNN monitor, RandAugment's skip rate, per-rank data, random erasing's fit,
the heads' initialisation, resizing and the decoder's position table. Each one was let through by the suite
before (tools/mutation_check.py holds the bug it catches)."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mae_pretrain
import train_classifier
from cifar_mae.augment import random_erase
from cifar_mae.datasets import load_data, spread_test_indexes
from cifar_mae.knn import knn_accuracy
from cifar_mae.loaders import DeviceLoader, TorchLoader
from cifar_mae.randaug import DeviceRandAugment
from conftest import TINY_MAE, TINY_MODEL, brute_force_knn, cls_features, projector, write_cifar_batches
from model import MAE_ViT, build_classifier


def run_main(script, *argv):
    return script.main(script.get_args_parser().parse_args(list(map(str, argv))))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def jsonl(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- the learning rate of every optimizer step of a 3-epoch run

def test_the_learning_rate_warms_up_then_follows_the_cosine_to_the_last_step(tmp_path, monkeypatch):
    """100 images, batch 16: 6 steps an epoch, 18 in all, 6 of warmup. Worked out by hand from
    lr(s) = peak (s + 1) / 6 for s < 6, then peak (1 + cos(pi (s - 6) / 12)) / 2."""
    applied = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        applied.append({group["lr"] for group in self.param_groups})
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    data = write_cifar_batches(str(tmp_path / "data"))
    run_main(mae_pretrain, "--data_dir", data, *TINY_MAE, "-bs", 16, "--total_epoch", 3, "--warmup_epoch", 1,
             "--base_learning_rate", 1e-3, "--model_path", tmp_path / "m.pth", "--log_dir", tmp_path / "l",
             "--device", "cpu")
    peak = 1e-3 * 16 / 256
    assert len(applied) == 18 and all(len(lrs) == 1 for lrs in applied)
    lr = [lrs.pop() for lrs in applied]
    by_hand = {0: peak / 6, 2: peak / 2, 5: peak,
               6: peak,                                        # epoch 2 starts the cosine at its top
               9: peak * (1 + math.sqrt(2) / 2) / 2,           # cos(pi / 4)
               12: peak / 2,                                   # epoch 3 starts half-way down: cos(pi / 2)
               15: peak * (1 - math.sqrt(2) / 2) / 2,          # cos(3 pi / 4)
               17: peak * (1 - (math.sqrt(6) + math.sqrt(2)) / 4) / 2}  # the last step: cos(11 pi / 12)
    for step, expected in by_hand.items():
        assert lr[step] == pytest.approx(expected, rel=1e-12), step
    assert lr[17] < lr[16] < lr[15]  # falling to the end, not restarting at an epoch


# ---- the weights a classifier evaluates and saves

def hand_evaluation(config, weights, images, labels):
    """Test-set loss of these weights, computed here: one eval-mode forward in fp32."""
    model = build_classifier(config)
    model.load_state_dict(weights)
    with torch.no_grad():
        return F.cross_entropy(model.eval()(images.float() / 127.5 - 1), labels).item()


@pytest.mark.parametrize("ema", [True, False])
def test_the_weights_evaluated_and_saved_are_the_emas_with_ema_and_the_live_ones_without(tmp_path, ema):
    data = write_cifar_batches(str(tmp_path / "data"))
    run_main(train_classifier, "--data_dir", data, *TINY_MODEL, "-bs", 16, "--total_epoch", 1, "--warmup_epoch", 0,
             "--drop_path", 0.2, "--device", "cpu", "--output_model_path", tmp_path / "c.pth",
             "--log_dir", tmp_path / "l", *(["--ema", "--ema_decay", 0.5] if ema else []))
    best, last = load(tmp_path / "c.pth"), load(tmp_path / "c-last.pth")
    evaluated = last["ema"] if ema else last["model"]
    assert best["epoch"] == 1 and best["model"].keys() == evaluated.keys()
    assert all(torch.equal(best["model"][k], evaluated[k]) for k in evaluated)
    if ema:
        assert not torch.equal(last["ema"]["head.weight"], last["model"]["head.weight"])
    test = load_data(data, 8)
    loss = hand_evaluation(best["model_config"], evaluated, test.test_images, test.test_labels)
    epoch, final = jsonl(tmp_path / "l" / "metrics.jsonl")
    # drop path (0.2) would change every logit of an evaluation in training mode; the accuracy is not compared:
    # a fresh head's logits nearly tie, so float rounding may pick another class
    assert epoch["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert final["final"] and final["acc"] == epoch["val_acc"]  # the best (only) epoch's weights, evaluated again


# ---- the kNN monitor

def test_knn_accuracy_equals_a_brute_force_vote_on_features_of_any_length():
    gen = torch.Generator().manual_seed(0)
    train_labels, test_labels = torch.arange(60) % 4, torch.arange(40) % 4
    centres = torch.randn(4, 8, generator=gen)
    train = centres[train_labels] + 1.5 * torch.randn(60, 8, generator=gen)
    test = centres[test_labels] + 1.5 * torch.randn(40, 8, generator=gen)
    train = train * torch.logspace(-1, 1, 60)[torch.randperm(60, generator=gen)][:, None]  # lengths 0.1 .. 10
    results = {}
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.07), (20, 10.0)):
        results[k, t] = knn_accuracy(train, train_labels, test, test_labels, 4, k=k, temperature=t)
        assert results[k, t] == brute_force_knn(train, train_labels, test, test_labels, 4, k, t), (k, t)
    assert results[1, 0.07] != results[5, 0.07] and results[20, 0.07] != results[20, 10.0]  # k and T tell
    # only the directions count: each feature at unit length gives the same votes
    assert knn_accuracy(F.normalize(train, dim=1), train_labels, test, test_labels, 4, k=5) == results[5, 0.07]


def test_the_knn_monitor_and_eval_only_vote_with_knn_k_and_knn_t(tmp_path, capsys):
    data = write_cifar_batches(str(tmp_path / "data"), test=60, random_labels=True)
    run_main(mae_pretrain, "--data_dir", data, *TINY_MAE, "-bs", 16, "--total_epoch", 1, "--warmup_epoch", 0,
             "--knn_every", 1, "--knn_k", 3, "--knn_t", 0.5, "--model_path", tmp_path / "m.pth",
             "--log_dir", tmp_path / "l", "--device", "cpu")
    split = load_data(data, 8)
    train, test = cls_features(tmp_path / "m.pth", split.train_images), cls_features(tmp_path / "m.pth",
                                                                                   split.test_images)
    expected = brute_force_knn(train, split.train_labels, test, split.test_labels, 10, 3, 0.5)
    assert jsonl(tmp_path / "l" / "metrics.jsonl")[0]["knn_acc"] == expected
    assert brute_force_knn(train, split.train_labels, test, split.test_labels, 10, 200, 0.07) != expected
    table, names = projector(tmp_path / "l" / "00001" / "test_features")  # the end of the run: all 60 test images
    index = spread_test_indexes(split, 60)
    torch.testing.assert_close(table, test[index], rtol=1e-4, atol=1e-5)
    assert names == [split.classes[i] for i in split.test_labels[index]]
    result = run_main(mae_pretrain, "--eval_only", tmp_path / "m.pth", "--knn_k", 7, "--knn_t", 0.1,
                      "--device", "cpu")
    assert result["knn_acc"] == brute_force_knn(train, split.train_labels, test, split.test_labels, 10, 7, 0.1)
    capsys.readouterr()


# ---- RandAugment's probability, per-rank data, random erasing, initialisation, resizing, position tables

def test_randaug_applies_each_op_with_probability_p_as_timm_does():
    from timm.data.auto_augment import rand_augment_transform
    policy = "rand-m9-mstd0.5-p0.8"
    ops, _, _, _ = DeviceRandAugment(policy).draw(40000, torch.Generator().manual_seed(0), torch.device("cpu"))
    ours = (ops == -1).double().mean().item()
    timm_op = rand_augment_transform(policy, {}).ops[0]
    image = Image.new("RGB", (8, 8), (90, 120, 150))
    random.seed(0)
    theirs = sum(timm_op(image) is image for _ in range(4000)) / 4000  # timm hands back the image it skips
    assert timm_op.prob == 0.8
    assert abs(ours - 0.2) < 0.01 and abs(theirs - 0.2) < 0.025


@pytest.mark.parametrize("loader_class", [DeviceLoader, TorchLoader])
def test_two_ranks_split_the_one_process_batches_and_draw_their_own_augmentations(loader_class):
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24)  # a label per image: which images a step takes
    make = lambda rank, world, **kw: loader_class(images, labels, 8, device=torch.device("cpu"), train=True,
                                                  seed=3, rank=rank, world_size=world, **kw)
    one, ranks = make(0, 1), [make(0, 2), make(1, 2)]
    orders = [loader.order.new_epoch() for loader in (one, *ranks)]
    assert torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])
    per_rank = [list(loader.batches(order)) for loader, order in zip(ranks, orders[1:])]
    for step, (_, y) in enumerate(one.batches(orders[0])):
        assert torch.equal(torch.cat([per_rank[0][step][1], per_rank[1][step][1]]), y)
    same = images[:1].expand(8, -1, -1, -1)  # one image: only the draws can tell the ranks' batches apart
    augmenting = [loader_class(same, labels[:8], 4, device=torch.device("cpu"), train=True, seed=3, rank=r,
                               world_size=2, crop_scale=(0.2, 1.0), flip=True) for r in (0, 1)]
    batches = [next(loader.batches(loader.order.new_epoch()))[0] for loader in augmenting]
    assert not torch.equal(batches[0], batches[1])


def test_random_erasing_takes_only_boxes_strictly_inside_the_image_as_timm():
    from timm.data.random_erasing import RandomErasing
    images = torch.zeros(50, 3, 4, 4)
    for area, pixels in ((1.0, 0), (9 / 16, 9)):  # a 4 x 4 box never fits a 4 x 4 image in timm; 3 x 3 always
        ours = random_erase(images, 1.0, torch.Generator().manual_seed(0), area=(area, area), min_aspect=1.0)
        random.seed(0)
        theirs = torch.stack([RandomErasing(1.0, min_area=area, max_area=area, min_aspect=1.0, mode="pixel",
                                            device="cpu")(image.clone()) for image in images])
        for out in (ours, theirs):
            assert ((out != 0).any(1).flatten(1).sum(1) == pixels).all(), area


def test_heads_start_as_the_official_mae_starts_them():
    """main_finetune.py: trunc_normal_(head.weight, std=2e-5); main_linprobe.py: std=0.01; biases zero."""
    config = dict(image_size=8, patch_size=2, emb_dim=64, encoder_layer=1, encoder_head=2, in_chans=3,
                  pos_embed="learned", num_classes=100, global_pool=False, timm_model=None)
    torch.manual_seed(0)
    fine_tune = build_classifier(dict(config, linear_probe=False)).head
    probe = build_classifier(dict(config, linear_probe=True)).head[1]
    assert fine_tune.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert probe.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not fine_tune.bias.any() and not probe.bias.any()


def test_images_of_another_size_are_resized_as_pil_resizes_them(tmp_path):
    """Bilinear with antialiasing (PIL's BILINEAR, torchvision's antialias=True): from 32 to 8 pixels every output
    pixel averages a 4 x 4 neighbourhood and more, not 2 x 2."""
    import pickle
    data = write_cifar_batches(str(tmp_path / "data"))
    with open(tmp_path / "data" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        rows = np.asarray(pickle.load(f, encoding="bytes")["data"])
    pil = np.stack([np.asarray(Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).resize((8, 8),
                                                                                                Image.BILINEAR))
                    for row in rows]).transpose(0, 3, 1, 2)
    ours = load_data(data, 8).test_images.numpy()
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1


def sincos_table(side, dim):
    """MAE's 2-D sin-cos table as timm builds it, written out: token (i, j) gets sin(i w), sin(j w), cos(i w),
    cos(j w) for the dim / 4 frequencies w_k = 10000 ** (-k / (dim / 4)); the cls token's row is zeros."""
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter) / quarter)
    rows = [np.zeros(dim)]
    for i in range(side):
        for j in range(side):
            rows.append(np.concatenate([np.sin(i * omega), np.sin(j * omega), np.cos(i * omega), np.cos(j * omega)]))
    return torch.tensor(np.stack(rows)[None], dtype=torch.float32)


def test_sincos_positions_reach_the_encoder_and_the_decoder_and_stay_fixed():
    model = MAE_ViT(image_size=8, patch_size=2, emb_dim=16, encoder_layer=1, encoder_head=2, decoder_layer=1,
                    decoder_head=2, decoder_emb_dim=8, pos_embed="sincos")
    for pos, dim in ((model.encoder.pos_embed, 16), (model.decoder.pos_embed, 8)):
        torch.testing.assert_close(pos.data, sincos_table(4, dim), rtol=0, atol=1e-6)
        assert not pos.requires_grad
