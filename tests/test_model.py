"""The model's properties: masking, restore order, loss, shapes, gradients, configuration errors."""
import pytest
import torch

from model import MAE_Encoder, MAE_ViT, PatchShuffle, ViT_Classifier, patchify, unpatchify

TINY = dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, decoder_layer=1,
            decoder_head=2)


@pytest.mark.parametrize("ratio,visible", [(0.75, 16), (0.5, 32), (0.0, 64), (0.9, 6)])
def test_patch_shuffle_keeps_exact_count_and_varies_per_sample(ratio, visible):
    patches = torch.arange(4 * 64, dtype=torch.float32).view(4, 64, 1).expand(4, 64, 3).contiguous()
    torch.manual_seed(0)
    kept, ids_shuffle, ids_restore = PatchShuffle(ratio)(patches)
    assert kept.shape == (4, visible, 3)
    assert ids_shuffle.shape == ids_restore.shape == (4, 64)
    # the kept patches are the first `visible` of the shuffled order, each an original patch
    expected = patches.gather(1, ids_shuffle[:, :visible, None].expand(-1, -1, 3))
    assert torch.equal(kept, expected)
    if 0 < visible < 64:
        assert not torch.equal(ids_shuffle[0, :visible].sort().values, ids_shuffle[1, :visible].sort().values)


def test_restore_is_exact_inverse_of_shuffle():
    x = torch.randn(5, 16, 7)
    _, ids_shuffle, ids_restore = PatchShuffle(0.75)(x)
    shuffled = x.gather(1, ids_shuffle[..., None].expand(-1, -1, 7))
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 7)), x)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(16).expand(5, 16))


def test_shuffle_indexes_on_input_device_and_seeded():
    x = torch.randn(3, 16, 4)
    torch.manual_seed(7)
    a = PatchShuffle(0.5)(x)
    torch.manual_seed(7)
    b = PatchShuffle(0.5)(x)
    c = PatchShuffle(0.5)(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert a[1].device == x.device and a[2].device == x.device
    if torch.cuda.is_available():
        gpu = PatchShuffle(0.5)(x.cuda())
        assert gpu[1].is_cuda and gpu[2].is_cuda


def test_mae_forward_shapes_mask_and_gradients():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY)
    imgs = torch.randn(3, 3, 8, 8)
    predicted, mask = model(imgs)
    assert predicted.shape == mask.shape == imgs.shape
    assert torch.isfinite(predicted).all()
    # 75 % of the 16 patches masked: 12 patches of 2x2x3 pixels per image, all channels alike
    assert torch.equal(mask.sum(dim=(1, 2, 3)), torch.full((3,), 12 * 4 * 3.0))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    model.loss(imgs, predicted, mask).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_loss_ignores_visible_patches_and_is_exact_mean():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY)
    imgs = torch.randn(2, 3, 8, 8)
    predicted, mask = model(imgs)
    changed = predicted + (1 - mask) * 100.0  # change only the visible patches' predictions
    assert torch.equal(model.loss(imgs, predicted, mask), model.loss(imgs, changed, mask))
    manual = ((predicted - imgs) ** 2 * mask).sum() / mask.sum()
    torch.testing.assert_close(model.loss(imgs, predicted, mask), manual)
    # any mask ratio: a prediction equal to the target on masked pixels costs exactly 0
    for ratio in (0.1, 0.5, 0.9):
        predicted, mask = model(imgs, mask_ratio=ratio)
        assert model.loss(imgs, imgs * mask + predicted * (1 - mask), mask).item() == 0.0


def test_norm_pix_loss_targets_and_reconstruction():
    torch.manual_seed(0)
    model = MAE_ViT(**TINY, norm_pix_loss=True)
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    target = model.target_patches(imgs)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    # a perfect normalised prediction reconstructs the image itself
    _, mask = model(imgs)
    perfect = unpatchify(target, 2, 3)
    torch.testing.assert_close(model.reconstruct(imgs, perfect, mask), imgs, atol=1e-3, rtol=0)
    assert model.loss(imgs, perfect, mask).item() < 1e-10


def test_patchify_roundtrip():
    imgs = torch.randn(2, 3, 8, 8)
    assert patchify(imgs, 2).shape == (2, 16, 12)
    assert torch.equal(unpatchify(patchify(imgs, 2), 2, 3), imgs)


def test_sincos_pos_embed_is_fixed():
    model = MAE_ViT(**TINY, pos_embed="sincos")
    assert not model.encoder.pos_embed.requires_grad
    assert torch.equal(model.encoder.pos_embed[0, 0], torch.zeros(16))
    assert model.encoder.pos_embed[0, 1:].abs().sum() > 0


def test_decoder_width_projection():
    model = MAE_ViT(**TINY, decoder_emb_dim=8)
    assert model.decoder.decoder_embed.weight.shape == (8, 16)
    predicted, _ = model(torch.randn(2, 3, 8, 8))
    assert predicted.shape == (2, 3, 8, 8)


def test_default_sizes_match_the_original():
    model = MAE_ViT()
    assert model.config["emb_dim"] == 192 and len(model.encoder.blocks) == 12 and len(model.decoder.blocks) == 4
    assert model.encoder.num_patches == 256 and model.encoder.shuffle.ratio == 0.75


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=10, patch_size=4), "multiple of patch_size"),
    (dict(emb_dim=15), "divisible by its head count"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(mask_ratio=0.99), "no visible patch"),
    (dict(mask_ratio=0.0), "masks no patch"),  # the loss over masked patches would be 0 / 0
    (dict(decoder_emb_dim=9), "decoder width"),
])
def test_bad_configurations_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAE_ViT(**{**TINY, **kwargs})


@pytest.mark.parametrize("global_pool", [False, True])
def test_classifier_reuses_encoder_and_sees_all_patches(global_pool):
    torch.manual_seed(0)
    mae = MAE_ViT(**TINY)
    classifier = ViT_Classifier(mae.encoder, num_classes=10, global_pool=global_pool)
    assert classifier.blocks is mae.encoder.blocks and classifier.cls_token is mae.encoder.cls_token
    imgs = torch.randn(4, 3, 8, 8)
    logits = classifier(imgs)
    assert logits.shape == (4, 10)
    torch.manual_seed(1)
    assert torch.equal(classifier(imgs), logits)  # no masking: no randomness
    logits.sum().backward()
    unused = {"norm.weight", "norm.bias"} if global_pool else set()
    for name, param in classifier.named_parameters():
        if name not in unused:
            assert param.grad is not None, name
    if not global_pool:  # the cls feature is the encoder's own unmasked cls output
        torch.testing.assert_close(classifier.forward_features(imgs), mae.encoder.forward_features(imgs)[:, 0])


def test_linear_probe_freezes_encoder_in_eval_mode():
    classifier = ViT_Classifier(MAE_Encoder(8, 2, 16, 2, 2, drop_path=0.0), 10, linear_probe=True)
    classifier.train()
    assert classifier.head.training and not classifier.blocks.training
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
