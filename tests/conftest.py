"""Tiny datasets written by the tests themselves: real CIFAR-10 pickled batches and an ImageFolder tree."""
import math
import os
import pickle
import signal
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# a tiny model that still has every part (2 encoder blocks, 1 decoder block, 4x4 patches of 8x8 images)
TINY_MODEL = ["--image_size", "8", "--patch_size", "2", "--emb_dim", "16", "--encoder_layer", "2",
              "--encoder_head", "2"]
TINY_MAE = TINY_MODEL + ["--decoder_layer", "1", "--decoder_head", "2"]


def synthetic_images(n, size, seed):
    """Images whose class is visible (a per-class colour tint) plus noise, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    tint = np.stack([np.linspace(0, 255, 10), np.linspace(255, 0, 10), (np.arange(10) * 77) % 256], 1)
    images = tint[labels][:, None, None, :] * 0.6 + rng.uniform(0, 100, size=(n, size, size, 3))
    return images.clip(0, 255).astype(np.uint8), labels


def write_cifar_batches(root, per_batch=20, test=20, seed=0, random_labels=False):
    """Real cifar-10-batches-py files (pickled dicts, 3072-byte rows) that torchvision's reader reads; with
    random_labels, labels the tints do not give away (a kNN accuracy off 0 and 1, so any mix-up shows)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = test if name == "test_batch" else per_batch
        images, labels = synthetic_images(n, 32, seed + i)
        if random_labels:
            labels = np.random.default_rng(seed + 100 + i).integers(0, 10, n)
        entry = {"batch_label": name, "labels": labels.tolist(),
                 "data": images.transpose(0, 3, 1, 2).reshape(n, 3072), "filenames": [f"{j}.png" for j in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


def write_cifar100(root, train=200, test=100, seed=0):
    """Real cifar-100-python files (train, test, meta; 100 fine and 20 coarse labels) that torchvision reads."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train), ("test", test)):
        fine = np.arange(n) % 100
        entry = {"batch_label": name, "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "filenames": [f"{j}.png" for j in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}, f)
    return root


def write_image_folder(root, train=40, test=20, size=12, test_name="test", seed=0):
    """root/train/<class>/N.jpg and root/<test_name>/<class>/N.jpg (size differs from 8 to test resizing)."""
    from PIL import Image
    for split, n in (("train", train), (test_name, test)):
        images, labels = synthetic_images(n, size, seed + len(split))
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
    return root


def brute_force_knn(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature):
    """Weighted kNN written out one query at a time: cosine similarity, the k most similar training features
    vote exp(similarity / T) for their class, the class with the most votes wins."""
    correct = 0
    for query, label in zip(test_feats.double().tolist(), test_labels.tolist()):
        sims = []
        for feat, feat_label in zip(train_feats.double().tolist(), train_labels.tolist()):
            dot = sum(a * b for a, b in zip(query, feat))
            sims.append((dot / math.sqrt(sum(a * a for a in query) * sum(b * b for b in feat)), feat_label))
        votes = [0.0] * num_classes
        for sim, feat_label in sorted(sims, reverse=True)[:k]:
            votes[feat_label] += math.exp(sim / temperature)
        correct += votes.index(max(votes)) == label
    return correct / len(test_labels)


def cls_features(path, images):
    """The saved encoder's cls features of uint8 images, computed here in one eval-mode forward."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    from model import MAE_ViT
    model = MAE_ViT(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        return model.encoder.eval().forward_features(images.float().div(127.5).sub(1.0))[:, 0]


def interrupt_at_step(monkeypatch, count):
    """Ctrl-C right after the count-th optimizer step: the run's handler finishes that step, saves and exits."""
    from cifar_mae.engine import Trainer
    step, steps = Trainer.step, []

    def step_then_interrupt(self, *args):
        sums = step(self, *args)
        steps.append(1)
        if len(steps) == count:
            signal.raise_signal(signal.SIGINT)
        return sums

    monkeypatch.setattr(Trainer, "step", step_then_interrupt)


def projector(folder):
    """What TensorBoard's projector shows from a folder add_embedding wrote: (features, labels); a sprite too."""
    assert (folder / "sprite.png").is_file()
    table = torch.tensor([[float(v) for v in line.split("\t")] for line in
                          (folder / "tensors.tsv").read_text().splitlines()])
    return table, (folder / "metadata.tsv").read_text().split()


@pytest.fixture
def cifar_dir(tmp_path):
    return write_cifar_batches(str(tmp_path / "data"))


@pytest.fixture
def folder_dir(tmp_path):
    return write_image_folder(str(tmp_path / "folder"))


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(2)
    yield
