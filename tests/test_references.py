"""The math checked against something computed apart from the code under test: a re-statement of the official
MAE forward, training that must lower a loss, pixels compared with their source files, learning rates worked out
by hand, and timm's own model for the export. tools/mutation_check.py shows that these fail on plausible bugs."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import mae_pretrain
import train_classifier
from cifar_mae import lifecycle
from cifar_mae.timm_export import classifier_export, timm_vit_kwargs
from cifar_mae.classification import ClassificationLoss
from cifar_mae.datasets import load_data
from cifar_mae.engine import Trainer
from cifar_mae.loaders import make_loader
from cifar_mae.optim import make_optimizer
from cifar_mae.runtime import Runtime
from conftest import CLASSES, TINY_MAE, TINY_MODEL, synthetic_images, write_cifar_batches
from model import MAE_ViT, build_classifier, patchify

TINY = dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, decoder_layer=1,
            decoder_head=2)
CPU = Runtime(torch.device("cpu"))


# ---- the official MAE forward (facebookresearch/mae models_mae.py), re-stated on our model's parameters

def official_forward(model, imgs, noise):
    """random_masking, forward_encoder, forward_decoder and forward_loss as the official code writes them."""
    enc, dec = model.encoder, model.decoder
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:, :]
    n, length, dim = x.shape
    len_keep = int(length * (1 - model.config["mask_ratio"]))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(n, -1, -1)
    x = torch.cat((cls, x), dim=1)
    for block in enc.blocks:
        x = block(x)
    latent = enc.norm(x)
    x = dec.decoder_embed(latent)
    mask_tokens = dec.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + dec.pos_embed
    for block in dec.blocks:
        x = block(x)
    pred = dec.head(dec.norm(x))[:, 1:, :]
    target = patchify(imgs, model.patch_size)
    loss = ((pred - target) ** 2).mean(dim=-1)
    return latent, pred, mask, (loss * mask).sum() / mask.sum()


def test_masking_encoder_decoder_and_loss_equal_the_official_forward():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY).eval()
    imgs = torch.randn(3, 3, 8, 8)
    torch.manual_seed(1)
    noise = torch.rand(3, 16)  # the first draw of the forward below, from the same seed
    latent, pred, mask, loss = official_forward(model, imgs, noise)
    torch.manual_seed(1)
    features, _ = model.encoder(imgs)
    torch.manual_seed(1)
    predicted, our_mask = model(imgs)
    assert torch.equal(features, latent)  # in fp32, bit for bit
    assert torch.equal(patchify(predicted, 2), pred)
    assert torch.equal(patchify(our_mask, 2)[..., 0], mask)
    torch.testing.assert_close(model.loss(imgs, predicted, our_mask), loss)


def test_under_bf16_autocast_the_residual_stream_is_bf16_and_training_matches_fp32_promotion():
    """Tokens, position embeddings and mask tokens take the activations' dtype (fewer bytes per step); a few
    AdamW steps then give the losses of the official forward, whose stream fp32 parameters promote to fp32."""
    torch.manual_seed(0)
    ours = MAE_ViT(**TINY)
    reference = MAE_ViT(**TINY)
    reference.load_state_dict(ours.state_dict())
    seen = []
    for block in (ours.encoder.blocks[0], ours.decoder.blocks[0]):
        block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ours, reference)]
    imgs = torch.randn(8, 3, 8, 8)
    for step in range(4):
        losses = []
        for model, optimizer in zip((ours, reference), optimizers):
            torch.manual_seed(step)
            noise = torch.rand(8, 16)
            torch.manual_seed(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(imgs, *model(imgs)) if model is ours else official_forward(model, imgs, noise)[3]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=2e-2)
    assert set(seen) == {torch.bfloat16}


def test_the_encoder_never_sees_masked_pixels_and_each_prediction_follows_its_own_patch():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY).eval()
    imgs = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    features, _ = model.encoder(imgs)
    torch.manual_seed(5)
    _, mask = model(imgs)
    changed = imgs + 10 * mask  # new pixels in every masked patch only
    torch.manual_seed(5)
    torch.testing.assert_close(model.encoder(changed)[0], features)
    # the decoder puts the encoder's token of each visible patch back at that patch's place: a change to one token
    # moves the prediction of its own patch most
    torch.manual_seed(5)
    features, ids_restore = model.encoder(imgs)
    ids_shuffle = ids_restore.argsort(dim=1)
    base = model.decoder(features, ids_restore)
    for k in range(features.shape[1] - 1):
        nudged = features.clone()
        nudged[0, 1 + k] += torch.randn(features.shape[-1], generator=torch.Generator().manual_seed(k))
        moved = (model.decoder(nudged, ids_restore) - base)[0].abs().sum(dim=-1)
        assert moved.argmax() == ids_shuffle[0, k]


# ---- training lowers the loss, on data that can be learnt (a colour tint per class)

def tinted(n, size=8, seed=0):
    images, labels = synthetic_images(n, size, seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def train_steps(model, loss_fn, loader, lr, steps):
    optimizer = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad],
                                 "weight_decay": 0.0}], lr, CPU)
    trainer = Trainer(model, loss_fn, optimizer, lambda step: lr, CPU, micro_batch=16)
    losses, step = [], 0
    while step < steps:
        for images, labels in loader.batches(loader.order.new_epoch()):
            sums = trainer.step(images, labels, step)
            losses.append(float(sums[0] / sums[1]))
            step += 1
    return losses


@pytest.mark.parametrize("path", ["device", "torch"])
def test_training_lowers_the_mae_loss_and_lifts_the_classifier_above_chance(path):
    images, labels = tinted(64)
    loader = make_loader(CPU, images, labels, 32, train=True, flip=True, kind=path)
    torch.manual_seed(0)
    mae = MAE_ViT(**TINY)
    losses = train_steps(mae, mae_pretrain.mae_loss, loader, 3e-3, 40)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    torch.manual_seed(0)
    classifier = build_classifier(dict(TINY, in_chans=3, pos_embed="learned", num_classes=10, global_pool=False,
                                       linear_probe=False))
    loss_fn = ClassificationLoss(10)
    losses = train_steps(classifier, loss_fn, loader, 3e-3, 40)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images.float() / 127.5 - 1).argmax(1) == labels).float().mean()
    assert accuracy > 0.5  # chance is 0.1


# ---- decoded pixels equal their source files

def test_cifar_batches_decode_to_the_pickled_pixels(tmp_path):
    root = write_cifar_batches(str(tmp_path), per_batch=4, test=3)
    data = load_data(root, 32)
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_2"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    rows = np.asarray(entry["data"]).reshape(4, 3, 32, 32)  # CIFAR rows: 1024 red, 1024 green, 1024 blue bytes
    assert torch.equal(data.train_images[4:8], torch.from_numpy(rows))
    assert data.train_labels[4:8].tolist() == entry["labels"] and data.classes == CLASSES


def test_png_folders_decode_to_the_written_pixels(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            written[split, name] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # (H, W, RGB)
            Image.fromarray(written[split, name]).save(tmp_path / split / name / "0.png")  # lossless
    data = load_data(str(tmp_path), 6)
    assert data.classes == ["cat", "dog"] and data.train_labels.tolist() == [0, 1]
    for i, name in enumerate(("cat", "dog")):
        assert torch.equal(data.train_images[i], torch.from_numpy(written["train", name]).permute(2, 0, 1))
        assert torch.equal(data.test_images[i], torch.from_numpy(written["test", name]).permute(2, 0, 1))


# ---- the export gives timm's model the same numbers

@pytest.mark.parametrize("timm_model", [None, "vit_tiny_patch16_224", "vit_base_patch16_clip_224"])  # clip: norm_pre
@pytest.mark.parametrize("global_pool", [False, True])
def test_the_timm_export_gives_the_same_features_and_logits(global_pool, timm_model):
    import timm
    torch.manual_seed(0)
    config = dict(TINY, in_chans=3, pos_embed="learned", num_classes=10, global_pool=global_pool,
                  linear_probe=False, timm_model=timm_model)
    model = build_classifier(config).eval()
    assert (model.norm_pre is not None) == (timm_model == "vit_base_patch16_clip_224")
    with torch.no_grad():
        for param in model.parameters():  # real weights everywhere, the head and the position embedding too
            param.normal_(0, 0.5)
    state, kwargs = classifier_export(model, config)
    reference = timm.create_model(**kwargs).eval()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(reference(x), logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
        features = model.forward_features(x)
        theirs = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(theirs, features, rtol=1e-4, atol=1e-4 * features.abs().max().item())
    assert logits.std() > 0.5  # logits of real size, so a small error is not lost in an absolute tolerance
    assert kwargs == timm_vit_kwargs(config, 10, "avg" if global_pool else "token")


# ---- the learning rates the scripts apply

def expected_lr(step, peak, warmup_steps, total_steps):
    """Linear warmup over optimizer steps to peak, then half a cosine to 0, written out anew."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def saved_group_lrs(path):
    """(lr, shapes of its parameters) per optimizer group of a saved training state."""
    state = torch.load(path, weights_only=True)["optimizer"]
    return [(group["lr"], [tuple(state["state"][i]["exp_avg"].shape) for i in group["params"]])
            for group in state["param_groups"]]


def test_the_applied_learning_rates_scale_with_the_batch_and_warm_up_in_optimizer_steps(tmp_path):
    data = write_cifar_batches(str(tmp_path / "data"))  # 100 training images: 6 steps of 16 per epoch
    mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(list(map(str, [
        "--data_dir", data, *TINY_MAE, "-bs", 16, "--total_epoch", 3, "--warmup_epoch", 2, "--stop_after_epoch", 1,
        "--base_learning_rate", 1e-3, "--model_path", tmp_path / "m.pth", "--log_dir", tmp_path / "l",
        "--device", "cpu"]))))
    peak = 1e-3 * 16 / 256
    lrs = {lr for lr, _ in saved_group_lrs(tmp_path / "m.pth")}  # after step 5 of 12 warmup steps
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(expected_lr(5, peak, 12, 18), rel=1e-12)
    args = ["--data_dir", data, *TINY_MODEL, "-bs", 32, "--total_epoch", 2, "--warmup_epoch", 1, "--device", "cpu",
            "--base_learning_rate", 2e-3, "--layer_decay", 0.5, "--output_model_path", tmp_path / "c.pth",
            "--log_dir", tmp_path / "cl", "--stop_after_epoch", 1]
    train_classifier.main(train_classifier.get_args_parser().parse_args(list(map(str, args))))
    base = expected_lr(2, 2e-3 * 32 / 256, 3, 6)  # 3 steps of 32 per epoch: the last warmup step
    groups = [(lr / base, shapes) for lr, shapes in saved_group_lrs(tmp_path / "c-last.pth")]
    scale = {shape: ratio for ratio, shapes in groups for shape in shapes}
    # two blocks: the stem (position embedding) is layer 0, the head layer 3 = num_layers: decay ** (3 - layer)
    assert scale[(1, 17, 16)] == pytest.approx(0.5 ** 3) and scale[(10, 16)] == pytest.approx(1.0)
    assert sorted({round(ratio, 12) for ratio, _ in groups}) == [0.125, 0.25, 0.5, 1.0]


# ---- each recipe flag changes what it should in the run it is given to

class _Built(Exception):
    """Raised where the run would restore its state and train: what it built is all a spy needs."""


def spy_run(script, monkeypatch, argv):
    """Run a script's main up to its training loop -> the model, trainer and loader it built."""
    seen = {}

    def restore_training_state(ckpt, path, model, trainer, loader, rt, data):
        seen.update(trainer=trainer, model=model, loader=loader)
        raise _Built

    monkeypatch.setattr(lifecycle, "restore_training_state", restore_training_state)
    with pytest.raises(_Built):
        script.main(script.get_args_parser().parse_args(list(map(str, argv))))
    return seen


def test_each_classifier_recipe_flag_reaches_the_run(tmp_path, monkeypatch):
    data = write_cifar_batches(str(tmp_path / "data"))
    common = ["--data_dir", data, *TINY_MODEL, "-bs", 16, "--device", "cpu", "--overwrite",
              "--output_model_path", tmp_path / "c.pth", "--log_dir", tmp_path / "l"]
    plain = spy_run(train_classifier, monkeypatch, common)
    run = spy_run(train_classifier, monkeypatch, [
        *common, "--mixup", 0.8, "--cutmix", 1.0, "--label_smoothing", 0.1, "--drop_path", 0.1, "--clip_grad", 0.5,
        "--ema", "--ema_decay", 0.9, "--global_pool", "--reprob", 0.25, "--randaug", "rand-m9-mstd0.5",
        "--crop_scale", 0.5, 0.9, "--no-flip", "--interpolation", "bicubic"])
    trainer, model, loader = run["trainer"], run["model"], run["loader"]
    mixup = trainer.loss_fn.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert plain["trainer"].loss_fn.mixup is None
    assert [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks] == pytest.approx([0.0, 0.1])
    assert trainer.clip_grad == 0.5 and plain["trainer"].clip_grad is None
    assert trainer.ema.decay == 0.9 and plain["trainer"].ema is None
    assert model.global_pool and hasattr(model, "fc_norm") and not plain["model"].global_pool
    assert (loader.reprob, loader.randaug is not None, loader.crop_scale, loader.flip, loader.interpolation) == \
        (0.25, True, (0.5, 0.9), False, "bicubic")
    smoothing = spy_run(train_classifier, monkeypatch, [*common, "--label_smoothing", 0.2])["trainer"].loss_fn
    assert smoothing.mixup is None and smoothing.criterion.label_smoothing == 0.2


def test_each_pretraining_recipe_flag_reaches_the_run(tmp_path, monkeypatch):
    data = write_cifar_batches(str(tmp_path / "data"))
    run = spy_run(mae_pretrain, monkeypatch, [
        "--data_dir", data, *TINY_MAE, "-bs", 16, "--device", "cpu", "--model_path", tmp_path / "m.pth",
        "--log_dir", tmp_path / "l", "--norm_pix_loss", "--decoder_emb_dim", 8, "--pos_embed", "sincos",
        "--mask_ratio", 0.5, "--weight_decay", 0.3])
    model, trainer = run["model"], run["trainer"]
    assert model.norm_pix_loss and model.decoder.mask_token.shape[-1] == 8
    assert model.encoder.shuffle.ratio == 0.5 and not model.encoder.pos_embed.requires_grad
    decays = {group["weight_decay"] for group in trainer.optimizer.param_groups}
    assert decays == {0.0, 0.3}
    assert (trainer.optimizer.param_groups[0]["betas"]) == (0.9, 0.95)
