"""Pretraining on a folder of images without class folders or splits."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mae_pretrain
import train_classifier
from cifar_mae.augment import normalize
from cifar_mae.datasets import dataset_name, load_data
from conftest import TINY_MAE, TINY_MODEL
from model import MAE_ViT
from test_references import official_forward


def write_unlabelled(root, n=30):
    """n PNG images of two sizes, some in a subfolder, plus hidden files that are not images of the set."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, "more") if i % 3 == 0 else root
        os.makedirs(folder, exist_ok=True)
        size = 12 if i % 2 else 8
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    os.makedirs(os.path.join(root, ".ipynb_checkpoints"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, ".ipynb_checkpoints", "x.png"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, "._hidden.png"))
    return root


def test_an_unlabelled_folder_loads_with_a_fixed_held_out_handful(tmp_path):
    root = write_unlabelled(str(tmp_path / "photos"))
    data = load_data(root, 8)
    assert data.classes == [] and data.train_images.shape == (23, 3, 8, 8) and data.test_images.shape == (7, 3, 8, 8)
    all_images = torch.cat([data.train_images, data.test_images])
    assert len({bytes(image.numpy()) for image in all_images}) == 30  # each image once, hidden files left out
    again = load_data(root, 8)  # from the cache, the same split
    assert torch.equal(again.test_images, data.test_images) and dataset_name(root) == "photos"


def test_pretraining_on_unlabelled_images_writes_its_checkpoint_and_reconstructions(tmp_path, capsys):
    root = write_unlabelled(str(tmp_path / "photos"))
    args = ["--data_dir", root, *TINY_MAE, "-bs", 8, "--total_epoch", 1, "--warmup_epoch", 0, "--device", "cpu",
            "--model_path", tmp_path / "m.pth", "--log_dir", tmp_path / "logs"]
    mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(list(map(str, args))))
    assert os.path.isfile(tmp_path / "m.pth")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("mae_image")] == [1]
    result = mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(
        ["--eval_only", str(tmp_path / "m.pth"), "--data_dir", root, "--device", "cpu"]))
    assert result["knn_acc"] is None  # no labels: no kNN; the held-out loss, as the official forward gives it
    ckpt = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    model = MAE_ViT(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(0)  # the evaluation's fixed masks: the first draw after seed 0
    noise = torch.rand(7, 16)
    *_, loss = official_forward(model.eval(), normalize(load_data(root, 8).test_images), noise)
    assert result["test_loss"] == pytest.approx(loss.item(), rel=1e-6)
    capsys.readouterr()


@pytest.mark.parametrize("script,argv,what", [
    (mae_pretrain, [*TINY_MAE, "--knn_every", 1, "--total_epoch", 1, "--warmup_epoch", 0],
     "the kNN monitor (--knn_every 1; pass 0) needs labels"),
    (train_classifier, [*TINY_MODEL], "a classifier needs labels"),
])
def test_what_needs_labels_is_refused_on_unlabelled_images(tmp_path, capsys, script, argv, what):
    root = write_unlabelled(str(tmp_path / "photos"))
    out = ["--model_path", tmp_path / "m.pth"] if script is mae_pretrain else \
        ["--output_model_path", tmp_path / "c.pth"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.get_args_parser().parse_args(list(map(str, [
            "--data_dir", root, "-bs", 8, "--device", "cpu", "--log_dir", tmp_path / "logs", *out, *argv]))))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == (f"error: --data_dir {root} holds images without class folders, "
                                                     f"and {what}: train/<class>/ and test/<class>/ folders (or "
                                                     "CIFAR's batches)")


def write_stl10(root, train=12, test=8, unlabelled=10, seed=0):
    """stl10_binary/ in torchvision's format: column-major 3 x 96 x 96 uint8 images, labels 1-10, class names."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    images = {}
    for name, n in (("train", train), ("test", test), ("unlabeled", unlabelled)):
        images[name] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
        images[name].transpose(0, 1, 3, 2).tofile(os.path.join(folder, f"{name}_X.bin"))  # stored W before H
        if name != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(os.path.join(folder, f"{name}_y.bin"))
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]))
    return root, images


def test_stl10_binary_files_load_with_their_splits_labels_and_pixels(tmp_path):
    root, written = write_stl10(str(tmp_path / "stl"))
    data = load_data(root, 96)
    assert torch.equal(data.train_images, torch.from_numpy(written["train"]))
    assert torch.equal(data.test_images, torch.from_numpy(written["test"]))
    assert torch.equal(data.unlabelled, torch.from_numpy(written["unlabeled"]))
    assert data.train_labels.tolist() == [i % 10 for i in range(12)] and data.classes[2] == "car"
    assert len(data.pretraining_images()) == 22 and torch.equal(data.pretraining_images("train"), data.train_images)
    assert dataset_name(root) == "stl10" and load_data(os.path.join(root, "stl10_binary"), 32).test_images.shape == \
        (8, 3, 32, 32)


def test_both_scripts_run_on_stl10(tmp_path):
    root, _ = write_stl10(str(tmp_path / "stl"), train=20)
    common = ["--data_dir", root, "--image_size", 16, "--patch_size", 8, "--emb_dim", 16, "--encoder_layer", 1,
              "--encoder_head", 2, "-bs", 8, "--total_epoch", 1, "--warmup_epoch", 0, "--device", "cpu"]
    mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(list(map(str, [
        *common, "--decoder_layer", 1, "--decoder_head", 2, "--model_path", tmp_path / "m.pth",
        "--log_dir", tmp_path / "ml"]))))
    assert torch.load(tmp_path / "m.pth", weights_only=True)["data"]["name"] == "stl10"
    result = train_classifier.main(train_classifier.get_args_parser().parse_args(list(map(str, [
        "--data_dir", root, "--pretrained_model_path", tmp_path / "m.pth", "-bs", 8, "--total_epoch", 1,
        "--warmup_epoch", 0, "--device", "cpu", "--output_model_path", tmp_path / "c.pth", "--log_dir",
        tmp_path / "cl"]))))
    assert len(result["final"]["per_class"]) == 10 and result["best_epoch"] == 1
