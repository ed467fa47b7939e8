"""RandAugment, per sample on the device.

timm's rand_augment_transform runs on one PIL image at a time and torchvision's RandAugment draws one op for a
whole batch, so neither fits a batch on the GPU. This keeps timm's policy (parsed by timm itself: op list,
magnitude, its noise and cap, layer count, probability) and timm's magnitude-to-argument rules, and applies the
ops to a batch with tensor ops: every sample draws its own ops, magnitudes, signs and (for the geometric ops)
bilinear or bicubic filter, as timm draws them.
Images are float tensors holding whole numbers 0-255 (what a uint8 holds, converted once per layer).
Each colour op: x (n, C, H, W), level = magnitude / 10 (n,), sign = -1 or +1 (n,) -> (n, C, H, W).
Each geometric op: the parameter of affine_coefficients it sets, and that parameter from level and sign.
"""
import functools
import math

import torch
import torch.nn.functional as F
from PIL import Image

from cifar_mae.augment import cubic_kernel
from cifar_mae.errors import UserError


def _column(values):
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _truncate(values):
    """PIL's float -> uint8: clip to 0-255, drop the fraction."""
    return values.clamp_(0, 255).floor_()


def _blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), truncated."""
    return _truncate(degenerate + _column(factor) * (x - degenerate))


def _luma(x):
    """PIL's convert("L"), exact: (n, 3, H, W) -> (n, 1, H, W)."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _color_degenerate(x):
    return _luma(x).expand_as(x)


def _contrast_degenerate(x):
    return _luma(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()  # PIL: int(mean + 0.5)


def _smooth(x):
    """PIL's SMOOTH filter (3x3: 1 around, 5 in the middle, / 13, rounded) inside, border pixels kept.

    Sums of whole numbers are exact in float32, and sum / 13 is never a tie, so the rounding matches PIL's.
    """
    box = F.avg_pool2d(x, 3, stride=1, divisor_override=1)  # 3x3 sums
    smoothed = x.clone()
    smoothed[..., 1:-1, 1:-1] = (box + 4 * x[..., 1:-1, 1:-1]).div_(13).round_()
    return smoothed


def _enhance_ops(name, degenerate):
    def decreasing(x, level, sign):  # factor in [0.1, 1.9], grows with the level
        return _blend(degenerate(x), x, level * 1.8 + 0.1)

    def increasing(x, level, sign):  # factor 1 -/+ up to 0.9, farther from 1 with the level
        return _blend(degenerate(x), x, (1.0 + sign * level * 0.9).clamp(min=0.1))
    return {name: decreasing, name + "Increasing": increasing}


def _posterize(x, bits):
    step = _column(2.0 ** (8 - bits.clamp(0, 8)))
    return (x / step).floor_().mul_(step)


def _solarize(x, threshold):
    return torch.where(x >= _column(threshold), 255 - x, x)


def _solarize_add(x, add):
    return torch.where(x < 128, (x + _column(add)).clamp_(max=255), x)


def _solarize_level(level):
    return (level * 256).floor().clamp(max=256)


def _autocontrast(x, level, sign):
    """PIL's ImageOps.autocontrast: each channel stretched from its min-max to 0-255, in PIL's arithmetic."""
    low, high = x.amin(dim=(2, 3), keepdim=True).double(), x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(high, 255.0) / (high - low).clamp(min=1)  # a true division, as PIL (not 255 * 1/d)
    stretched = _truncate(x.double() * scale - low * scale).float()
    return torch.where(high > low, stretched, x)


def _equalize(x, level, sign):
    from torchvision.transforms.v2 import functional as TF
    return TF.equalize(x.to(torch.uint8)).float()


RANDAUG_COLOR_OPS = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda x, level, sign: 255 - x,
    "Posterize": lambda x, level, sign: _posterize(x, (level * 4).floor()),
    "PosterizeIncreasing": lambda x, level, sign: _posterize(x, 4 - (level * 4).floor()),
    "Solarize": lambda x, level, sign: _solarize(x, _solarize_level(level)),
    "SolarizeIncreasing": lambda x, level, sign: _solarize(x, 256 - _solarize_level(level)),
    "SolarizeAdd": lambda x, level, sign: _solarize_add(x, (level * 110).floor().clamp(max=128)),
    **_enhance_ops("Color", _color_degenerate),
    **_enhance_ops("Contrast", _contrast_degenerate),
    **_enhance_ops("Brightness", torch.zeros_like),
    **_enhance_ops("Sharpness", _smooth),
}


RANDAUG_AFFINE_OPS = {
    "Rotate": ("degrees", lambda level, sign, height, width: sign * level * 30.0),
    "ShearX": ("shear_x", lambda level, sign, height, width: sign * level * 0.3),
    "ShearY": ("shear_y", lambda level, sign, height, width: sign * level * 0.3),
    "TranslateXRel": ("translate_x", lambda level, sign, height, width: sign * level * 0.45 * width),
    "TranslateYRel": ("translate_y", lambda level, sign, height, width: sign * level * 0.45 * height),
}


def affine_coefficients(height, width, degrees, shear_x, shear_y, translate_x, translate_y):
    """PIL's affine coefficients (n, 6) of timm's geometric ops, from per-sample parameters (n,) each.

    A sample sets at most one parameter (the rest 0), as one op of a layer: PIL's Image.rotate(degrees) about
    the centre (counter-clockwise), its shear (x + shear_x y, shear_y x + y) or translation. With the others
    0 the terms cancel exactly, so each op gets exactly its own coefficients. The rotation is computed as
    Image.rotate computes it (angle mod 360, cos and sin rounded to 15 decimals), so the source points agree
    with PIL's up to float rounding.
    """
    angle = -torch.deg2rad(torch.remainder(degrees.to(torch.float64), 360.0))
    cos, sin = torch.round(angle.cos(), decimals=15), torch.round(angle.sin(), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    return torch.stack([cos, sin + shear_x, (cos * -cx + sin * -cy + 0.0) + cx + translate_x,
                        -sin + shear_y, cos, (-sin * -cx + cos * -cy + 0.0) + cy + translate_y], dim=1)


@functools.lru_cache(maxsize=8)
def _pixel_centres(height, width, device):
    """u, v (H, W) each: the centre of each pixel, in pixels from the top-left corner."""
    v, u = torch.meshgrid(torch.arange(height, device=device) + 0.5, torch.arange(width, device=device) + 0.5,
                          indexing="ij")
    return u, v


def _cubic_weights(d):
    """PIL's bicubic for affine transforms: weights of the taps at offsets -1, 0, 1, 2 from the floor, at
    fraction d (...) -> (..., 4)."""
    return cubic_kernel(torch.stack([d + 1, d, d - 1, d - 2], dim=-1), a=-1.0)


def _bicubic(x, source_x, source_y):
    """x (n, C, H, W) float sampled at the source points (n, H, W) with PIL's bicubic; edge pixels repeated."""
    n, channels, height, width = x.shape
    start_x, start_y = (source_x - 0.5).floor(), (source_y - 0.5).floor()
    wx = _cubic_weights((source_x - 0.5 - start_x).float())                             # (n, H, W, 4)
    wy = _cubic_weights((source_y - 0.5 - start_y).float())
    offsets = torch.arange(-1, 3, device=x.device)
    ix = (start_x.long()[..., None] + offsets).clamp_(0, width - 1)                     # (n, H, W, 4)
    iy = (start_y.long()[..., None] + offsets).clamp_(0, height - 1)
    flat, out = x.flatten(2), x.new_zeros(n, channels, height * width)
    for j in range(4):  # tap by tap, summed in place: no (n, C, H, W, 16) intermediate, no matmul (TF32 on CUDA)
        for i in range(4):
            index = (iy[..., j] * width + ix[..., i]).flatten(1)[:, None].expand(-1, channels, -1)
            out.addcmul_(flat.gather(2, index), (wy[..., j] * wx[..., i]).flatten(1)[:, None])
    return out.view(n, channels, height, width)


def warp_affine(x, coefficients, fill=128, bicubic=None):
    """Resample each image with PIL's affine convention and filters (bilinear, or bicubic where `bicubic`),
    `fill` outside.

    x: (n, C, H, W) whole numbers 0-255; coefficients: (n, 6) = (a, b, c, d, e, f): the output pixel centred
    at (u, v), in pixels from the top-left corner, takes the input at (a u + b v + c, d u + e v + f).
    bicubic: (n,) bool or None (all bilinear). Within one grey level of PIL's, which works in float64.
    """
    n, channels, height, width = x.shape
    u, v = _pixel_centres(height, width, x.device)
    # elementwise, not a matmul: on CUDA a matmul may run in TF32, whose 10-bit mantissa would move the
    # source points by hundredths of a pixel
    a, b, c, d, e, f = coefficients.to(torch.float64)[:, :, None, None].unbind(1)   # (n, 1, 1) each
    source_x, source_y = a * u + b * v + c, d * u + e * v + f                          # (n, H, W) pixels
    grid = torch.stack([source_x / width, source_y / height], dim=-1).float() * 2 - 1  # align_corners=False
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if bicubic is not None:
        warped = torch.where(bicubic[:, None, None, None], _bicubic(x, source_x, source_y), warped)
    # as PIL: a source point inside the image interpolates its nearest pixels (edge pixels repeated), one
    # outside takes the fill
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    warped = torch.where(inside[:, None], warped, float(fill))
    # truncated as PIL's; the 1e-3 keeps float noise from turning 7.0 into 6
    return _truncate(warped.add_(1e-3))


def _pil_posterize(image, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: a black image, as Pillow gave before it began to refuse 0 bits."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def randaug_policy(config, fill=128):
    """timm's RandAugment transform for a policy string, or a UserError naming the string.

    Pillow 13 refuses ImageOps.posterize(image, 0) (12.3 allowed it), which timm's PosterizeIncreasing asks for at
    magnitude 10 (rand-m9-mstd0.5 gets there in 2 % of its draws), so its posterize ops get one that doesn't.
    """
    from timm.data import rand_augment_transform
    try:
        policy = rand_augment_transform(config, {"img_mean": (fill,) * 3})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        detail = f" ({e})" if str(e) else ""
        raise UserError(f"--randaug {config!r} is not a timm RandAugment policy such as "
                        f"rand-m9-mstd0.5-inc1{detail}") from None
    for op in policy.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _pil_posterize
    return policy


class DeviceRandAugment:
    """timm's RandAugment policy (e.g. "rand-m9-mstd0.5-inc1"), per sample on a batch on `device`."""

    def __init__(self, config, fill=128, device=None):
        policy = randaug_policy(config, fill)
        self.names = [op.name for op in policy.ops]
        unknown = [name for name in self.names if name not in RANDAUG_COLOR_OPS and name not in RANDAUG_AFFINE_OPS]
        if unknown:
            raise UserError(f"--randaug {config!r}: the device loader has no {', '.join(unknown)}; "
                            "use --loader torch for it")
        op = policy.ops[0]
        resample = op.kwargs["resample"]
        resample = list(resample) if isinstance(resample, (list, tuple)) else [resample]
        if any(mode not in (Image.BILINEAR, Image.BICUBIC) for mode in resample):
            raise UserError(f"--randaug {config!r}: the device loader has bilinear and bicubic filters only; "
                            "use --loader torch")
        self.bicubic_share = resample.count(Image.BICUBIC) / len(resample)  # timm draws one per op call
        self.fill, self.num_layers, self.prob = fill, policy.num_layers, op.prob
        self.magnitude, self.magnitude_std = float(op.magnitude), float(op.magnitude_std)
        self.magnitude_max = float(op.magnitude_max or 10)
        self.weights = None if policy.choice_weights is None else torch.as_tensor(policy.choice_weights,
                                                                                   device=device)
        if self.weights is not None and self.num_layers > len(self.names):
            raise UserError(f"--randaug {config!r}: {self.num_layers} layers from {len(self.names)} weighted ops")

    def draw(self, n, generator, device):
        """Per-sample choices for every layer: op index (n, L) (-1: skipped), level and sign (n, L) float64."""
        layers = self.num_layers
        if self.weights is None:  # timm: np.random.choice with replacement, or without it when weighted
            ops = torch.randint(len(self.names), (n, layers), generator=generator, device=device)
        else:
            ops = torch.multinomial(self.weights.expand(n, -1), layers, replacement=False, generator=generator)
        u = torch.rand(n, layers, 4, generator=generator, device=device, dtype=torch.float64)
        gauss = torch.randn(n, layers, generator=generator, device=device, dtype=torch.float64)
        ops = torch.where(u[..., 0] < self.prob, ops, -1)           # timm: skip when random() > prob
        sign = torch.where(u[..., 1] > 0.5, -1.0, 1.0).to(torch.float64)  # timm: negate when random() > 0.5
        if math.isinf(self.magnitude_std):
            magnitude = u[..., 2] * self.magnitude
        else:
            magnitude = self.magnitude + self.magnitude_std * gauss
        level = magnitude.clamp(0, self.magnitude_max) / 10
        bicubic = u[..., 3] < self.bicubic_share  # timm: random.choice(resample) per op call; a share of 0 or 1: fixed
        return ops, level, sign, bicubic

    def apply(self, x, ops, level, sign, bicubic=None):
        """x (n, C, H, W) whole numbers 0-255, uint8 or float, with the drawn choices -> float, the same kind.

        bicubic (n, L) bool: the filter of each image's geometric op in each layer (None: bilinear).
        """
        x = x.float()
        n, _, height, width = x.shape
        for layer in range(ops.shape[1]):
            op, lv, sg = ops[:, layer], level[:, layer], sign[:, layer]
            out, warped = x, None
            zero = torch.zeros_like(lv)
            params = {slot: zero for slot, _ in RANDAUG_AFFINE_OPS.values()}
            for index, name in enumerate(self.names):
                chosen = op == index
                if name in RANDAUG_AFFINE_OPS:
                    slot, value = RANDAUG_AFFINE_OPS[name]
                    params[slot] = torch.where(chosen, value(lv, sg, height, width), params[slot])
                    warped = chosen if warped is None else warped | chosen
                else:
                    out = torch.where(chosen[:, None, None, None], RANDAUG_COLOR_OPS[name](x, lv, sg), out)
            if warped is not None:  # one resampling for every geometric op of the layer
                coefficients = affine_coefficients(height, width, **params)
                filters = None if bicubic is None else bicubic[:, layer]
                out = torch.where(warped[:, None, None, None], warp_affine(x, coefficients, self.fill, filters), out)
            x = out
        return x

    def __call__(self, x, generator):
        return self.apply(x, *self.draw(len(x), generator, x.device))


def check_policy(config, loader):
    """A UserError for a --randaug policy that the loader's RandAugment (device: ours, torch: timm's) refuses."""
    if loader == "device":
        DeviceRandAugment(config)
    else:
        randaug_policy(config)
