"""RandAugment on the device: each op against timm's own op on PIL images, the per-sample draws, the loader."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from cifar_mae.augment import random_erase
from cifar_mae.errors import UserError
from cifar_mae.loaders import DeviceLoader
from cifar_mae.randaug import DeviceRandAugment, RANDAUG_AFFINE_OPS, RANDAUG_COLOR_OPS, _pil_posterize, \
    affine_coefficients, randaug_policy, warp_affine

OPS = sorted(RANDAUG_COLOR_OPS) + sorted(RANDAUG_AFFINE_OPS)


def smooth_images(n=6, size=16, seed=0):
    """uint8 (n, 3, size, size) with flat regions and edges, like photos, so every op has something to do."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)


def timm_op(name, images, magnitude, sign, monkeypatch, interpolation=Image.BILINEAR):
    """timm's AugmentOp `name` at `magnitude`, always applied, with the sign and filter forced, on each image."""
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                hparams={"img_mean": (128,) * 3, "interpolation": interpolation})
    if name.startswith("Posterize"):
        op.aug_fn = _pil_posterize  # what randaug_policy installs (Pillow refuses 0 bits)
    monkeypatch.setattr(random, "random", lambda: 0.9 if sign < 0 else 0.1)  # timm negates when > 0.5
    out = [op(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images]
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in out])


def affine(height, width, **params):
    """affine_coefficients with the parameters not given at 0."""
    n = len(next(iter(params.values())))
    zero = torch.zeros(n, dtype=torch.float64)
    full = {slot: params.get(slot, zero) for slot, _ in RANDAUG_AFFINE_OPS.values()}
    return affine_coefficients(height, width, **full)


def ours(name, images, magnitude, sign, bicubic=False):
    """Our op on uint8 images -> uint8, every sample at the same magnitude, sign and filter."""
    level = torch.full((len(images),), magnitude / 10, dtype=torch.float64)
    signs = torch.full((len(images),), sign, dtype=torch.float64)
    x = images.float()
    if name in RANDAUG_COLOR_OPS:
        out = RANDAUG_COLOR_OPS[name](x, level, signs)
    else:
        _, _, height, width = images.shape
        slot, value = RANDAUG_AFFINE_OPS[name]
        out = warp_affine(x, affine(height, width, **{slot: value(level, signs, height, width)}),
                          bicubic=torch.full((len(images),), bicubic))
    assert out.dtype == torch.float32 and torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    return out.to(torch.uint8)


@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_timm_on_pil(name, monkeypatch):
    images = smooth_images()
    for magnitude in (0, 3, 7.5, 10):
        for sign in (1.0, -1.0):
            expected = timm_op(name, images, magnitude, sign, monkeypatch)
            got = ours(name, images, magnitude, sign)
            assert got.dtype == torch.uint8 and got.shape == images.shape
            difference = (got.int() - expected.int()).abs()
            if name in RANDAUG_COLOR_OPS:  # same integer arithmetic as PIL: exact
                assert difference.max() == 0, (magnitude, sign)
            else:  # interpolation in float32 vs PIL's float64: within one grey level
                assert difference.max() <= 1, (magnitude, sign)
    if name != "Equalize" and name != "AutoContrast" and name != "Invert":  # these have no magnitude
        assert not torch.equal(ours(name, images, 10, 1.0), ours(name, images, 3, 1.0))


@pytest.mark.parametrize("name", sorted(RANDAUG_AFFINE_OPS))
def test_geometric_ops_match_pil_bicubic_too(name, monkeypatch):
    """timm picks bilinear or bicubic at random for these; PIL's bicubic here is its a = -1 cubic convolution."""
    images = smooth_images(size=20)
    images[:, :, 5:9, 5:9] = 255  # a bright square: the cubic's overshoot past 255 must be clipped as PIL does
    for magnitude in (3, 7.5, 10):
        for sign in (1.0, -1.0):
            expected = timm_op(name, images, magnitude, sign, monkeypatch, interpolation=Image.BICUBIC)
            got = ours(name, images, magnitude, sign, bicubic=True)
            difference = (got.int() - expected.int()).abs()
            # float32 vs PIL's float64: within one grey level, and the same almost everywhere
            assert difference.max() <= 1 and (difference == 0).double().mean() > 0.995, (magnitude, sign)
    # the filters differ except where the source points fall on pixel centres (a whole-pixel translation)
    assert not torch.equal(ours(name, images, 7.5, 1.0, bicubic=True), ours(name, images, 7.5, 1.0))


def test_posterize_with_zero_bits_is_black_on_both_paths():
    images = smooth_images(2)
    one = torch.ones(2, dtype=torch.float64)
    assert (RANDAUG_COLOR_OPS["PosterizeIncreasing"](images.float(), one, one) == 0).all()
    policy = randaug_policy("rand-m10-inc1")  # Pillow alone raises ValueError for this op at m10
    op = next(op for op in policy.ops if op.name == "PosterizeIncreasing")
    op.prob = 1.0
    black = op(Image.fromarray(images[0].permute(1, 2, 0).numpy()))
    assert np.array(black).max() == 0


def test_translate_by_whole_pixels_shifts_and_fills():
    images = smooth_images(1, size=20)
    right = warp_affine(images.float(), affine(20, 20, translate_x=torch.tensor([-9.0], dtype=torch.float64)))
    assert torch.equal(right[..., 9:], images[..., :11].float())  # content moves right by 9
    assert (right[..., :9] == 128).all()


def test_policy_comes_from_timm_and_bad_ones_are_user_errors():
    ra = DeviceRandAugment("rand-m7-n3-mstd0.5-inc1")
    assert ra.names == auto_augment._RAND_INCREASING_TRANSFORMS
    assert (ra.num_layers, ra.magnitude, ra.magnitude_std, ra.prob) == (3, 7.0, 0.5, 0.5)
    assert DeviceRandAugment("rand-m9").names == auto_augment._RAND_TRANSFORMS
    with pytest.raises(UserError, match="not a timm RandAugment policy"):
        DeviceRandAugment("augmix-m3")
    with pytest.raises(UserError, match="GaussianBlur"):
        DeviceRandAugment("rand-m9-t3a")


def test_draws_follow_the_policy_per_sample():
    ra = DeviceRandAugment("rand-m9-mstd0.5-inc1")
    ops, level, sign, bicubic = ra.draw(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ops.shape == level.shape == sign.shape == bicubic.shape == (20000, 2)
    assert abs(bicubic.double().mean().item() - 0.5) < 0.02  # timm: random.choice((BILINEAR, BICUBIC)) per op
    assert abs((ops == -1).double().mean().item() - 0.5) < 0.02                     # prob 0.5 per layer
    counts = torch.bincount(ops[ops >= 0], minlength=15).double()
    assert len(counts) == 15 and (counts / counts.mean() - 1).abs().max() < 0.1     # uniform over the 15 ops
    assert level.min() >= 0 and level.max() == 1.0                                   # N(9, 0.5) clipped to 10
    assert abs(level.mean().item() - 0.9) < 0.01 and 0.04 < level.std().item() < 0.06
    assert abs(sign.mean().item()) < 0.03 and set(sign.unique().tolist()) == {-1.0, 1.0}
    again = ra.draw(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip((ops, level, sign, bicubic), again, strict=True))
    weighted = DeviceRandAugment("rand-m9-n3-tweights")
    ops = weighted.draw(5000, torch.Generator().manual_seed(0), torch.device("cpu"))[0]
    unskipped = ops[(ops >= 0).all(1)]  # timm draws weighted ops without replacement: never twice for one image
    assert len(unskipped) > 400 and (unskipped.sort(1).values.diff(dim=1) != 0).all()
    counts = torch.bincount(ops[ops >= 0], minlength=15).double()
    assert counts[weighted.names.index("Rotate")] > 10 * counts[weighted.names.index("Invert")]


def test_layers_apply_the_drawn_ops_in_order_and_skip_the_rest():
    ra = DeviceRandAugment("rand-m9-inc1")
    images = smooth_images(4)
    index = {name: i for i, name in enumerate(ra.names)}
    ops = torch.tensor([[index["Rotate"], index["Invert"]], [-1, -1], [index["SolarizeAdd"], -1],
                        [-1, index["TranslateYRel"]]])
    level = torch.tensor([[0.5, 0.0], [0.9, 0.9], [0.3, 0.0], [0.0, 0.7]], dtype=torch.float64)
    sign = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    bicubic = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    out = ra.apply(images, ops, level, sign, bicubic).to(torch.uint8)
    expected_0 = 255 - ours("Rotate", images[:1], 5, 1.0, bicubic=True)
    assert torch.equal(out[0], expected_0[0])
    assert torch.equal(out[1], images[1])
    assert torch.equal(out[2], ours("SolarizeAdd", images[2:3], 3, 1.0)[0])
    assert torch.equal(out[3], ours("TranslateYRel", images[3:4], 7, -1.0)[0])  # layer 2 of image 3: bilinear
    assert not torch.equal(out[0], (255 - ours("Rotate", images[:1], 5, 1.0))[0])


def test_same_image_gets_different_augmentations_and_seed_repeats_them():
    ra = DeviceRandAugment("rand-m9-mstd0.5-inc1")
    images = smooth_images(1).expand(64, -1, -1, -1)
    out = ra(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == images.shape and torch.equal(out, out.round())
    assert out.min() >= 0 and out.max() <= 255
    ops, _, _, _ = ra.draw(64, torch.Generator().manual_seed(0), torch.device("cpu"))
    skipped = (ops == -1).all(1)  # the images that drew no op in either layer are the input, bit for bit
    assert skipped.any() and torch.equal(out[skipped], images[skipped].float())
    assert len({tuple(image.flatten().tolist()) for image in out}) > 30
    assert torch.equal(out, ra(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, ra(images, torch.Generator().manual_seed(1)))


def test_device_loader_applies_randaug_after_crop_and_flip():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(16) % 10
    make = lambda **kw: DeviceLoader(images, labels, 16, device=torch.device("cpu"), train=True, seed=0, **kw)
    plain, augmented = make(flip=True), make(flip=True, randaug="rand-m9-mstd0.5-inc1")
    order = plain.order.new_epoch()
    assert torch.equal(order, augmented.order.new_epoch())
    x_plain, y_plain = next(plain.batches(order))
    x_aug, y_aug = next(augmented.batches(order))
    assert torch.equal(y_plain, y_aug) and x_aug.shape == x_plain.shape
    assert x_aug.min() >= -1 and x_aug.max() <= 1
    # the flips come first from the same generator, so images that drew no op equal the flip-only batch
    same = [torch.equal(a, b) for a, b in zip(x_plain, x_aug)]
    assert any(same) and not all(same)


def test_device_augmentation_builds_no_tensor_from_host_data():
    """torch.tensor(data, device=cuda) on the hot path is a host-to-device copy and a sync; none per batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CreatedFromData(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.lift_fresh.default  # what torch.tensor(data) dispatches
            return func(*args, **(kwargs or {}))

    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for policy in ("rand-m9-mstd0.5-inc1", "rand-m9-n3-tweights"):
        loader = DeviceLoader(images, torch.arange(64) % 10, 16, device=torch.device("cpu"), train=True,
                              crop_scale=(0.2, 1.0), flip=True, randaug=policy, reprob=0.5)
        batches = loader.batches(loader.order.new_epoch())
        with CreatedFromData() as mode:  # the first batch as well: the policy's weights were placed up front
            next(batches)
            next(batches)
        assert mode.count == 0
        with CreatedFromData() as mode:
            torch.tensor([1.0])
        assert mode.count == 1  # the detector itself works


# ------------------------------------------------------------------------------------------- random erasing

def erased_boxes(before, after):
    """Per image: (erased?, is the erased set one rectangle?, its area fraction)."""
    changed = (before != after).any(dim=1)                                                   # (n, H, W)
    rows, cols = changed.any(dim=2), changed.any(dim=1)
    rectangle = torch.equal(changed, rows[:, :, None] & cols[:, None, :])
    return changed.flatten(1).any(1), rectangle, changed.flatten(1).float().mean(1)


def test_random_erasing_one_noise_rectangle_per_erased_image():
    images = torch.zeros(4000, 3, 16, 16)
    out = random_erase(images, 0.25, torch.Generator().manual_seed(0))
    erased, rectangle, area = erased_boxes(images, out)
    assert rectangle and abs(erased.float().mean().item() - 0.25) < 0.02
    assert out[~erased].abs().max() == 0                               # the others are untouched
    noise = out.permute(1, 0, 2, 3)[:, (out != 0).any(1)]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05  # per-pixel N(0, 1)
    assert area[erased].min() >= 0.01 and area[erased].max() <= 0.4
    assert torch.equal(out, random_erase(images, 0.25, torch.Generator().manual_seed(0)))
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(0)), images)


def test_random_erasing_draws_like_timm():
    """Same probability and the same distribution of box areas and shapes as timm's per-image loop."""
    from timm.data.random_erasing import RandomErasing
    images = torch.zeros(3000, 3, 16, 16)
    random.seed(0)
    torch.manual_seed(0)
    theirs = RandomErasing(0.5, mode="pixel", device="cpu")(images.clone())
    ours = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    stats = []
    for out in (theirs, ours):
        erased, rectangle, area = erased_boxes(images, out)
        changed = (out != 0).any(1)[erased]
        log_aspect = (changed.any(2).sum(1).float() / changed.any(1).sum(1)).log()  # height / width
        stats.append((erased.float().mean().item(), area[erased].mean().item(), log_aspect.std().item()))
        assert rectangle
    (p_theirs, area_theirs, spread_theirs), (p_ours, area_ours, spread_ours) = stats
    assert abs(p_theirs - p_ours) < 0.04 and abs(area_theirs - area_ours) < 0.01
    assert abs(spread_theirs - spread_ours) < 0.05  # min_aspect 0.5 instead of 0.3 would give 0.41 vs 0.70
