"""Per-sample augmentation of batches on the device: random-resized-crop with flip (PIL's pixels), random
erasing (timm's draws), and the [-1, 1] normalisation the models take."""
import math

import torch
import torch.nn.functional as F


def sample_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), generator=None, device=None, tries=10):
    """Random-resized-crop boxes for n images -> float (n, 4) of whole pixels, (x0, y0, w, h).

    torchvision's RandomResizedCrop.get_params, batched: up to `tries` draws of an area fraction (uniform in
    `scale`) and a log aspect ratio (uniform in log `ratio`), w and h rounded to whole pixels; the first draw
    that fits is taken, at a uniform whole-pixel position; if none fits, the central crop of torchvision's
    fallback. Every sample makes all draws, so the work is fixed and the draws per sample are too.
    """
    u = torch.rand(n, tries + 1, 2, generator=generator, device=device, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :tries, 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, :tries, 1]
    w = torch.sqrt(area * torch.exp(log_ratio)).round()  # half to even, as Python's round
    h = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)                            # (n, tries)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    in_ratio = width / height  # the fallback: the whole image, or its centre at the nearest allowed ratio
    fallback_w = width if in_ratio <= max(ratio) else round(height * max(ratio))
    fallback_h = height if in_ratio >= min(ratio) else round(width / min(ratio))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    x0 = torch.where(found, (u[:, tries, 0] * (width - w + 1)).floor(), (width - w) // 2)
    y0 = torch.where(found, (u[:, tries, 1] * (height - h + 1)).floor(), (height - h) // 2)
    return torch.stack([x0, y0, w, h], dim=1).float()


def crop_resize_flip(images, boxes, flip, out_size, interpolation="bilinear"):
    """Crop each box, resize it to out_size and mirror it where flip, as torchvision's resized_crop does on
    PIL images (enlarging): a horizontal pass, then a vertical one, each rounded to whole numbers 0-255 as
    PIL's 8-bit passes are. Bilinear gives PIL's pixels; bicubic comes within one grey level of them (PIL's
    bicubic weights are fixed-point numbers).

    images: float (n, C, H, W) of whole numbers 0-255; boxes: (n, 4) (x0, y0, w, h) whole pixels; flip: bool
    (n,) -> float (n, C, out, out) of whole numbers. A box whose size equals out_size reproduces the slice.
    """
    if interpolation == "bicubic":
        out = _resize_bicubic(images, boxes, out_size)
        return torch.where(flip[:, None, None, None], out.flip(-1), out)
    n, _, height, width = images.shape
    steps = torch.arange(out_size, device=images.device, dtype=images.dtype) + 0.5
    centres = lambda size: (2 * torch.arange(size, device=images.device, dtype=images.dtype) + 1) / size - 1

    def along(start, length, size):  # each output pixel's place in grid_sample's coordinates (n, out)
        place = start[:, None] + steps * (length[:, None] / out_size) - 0.5  # in pixel indexes
        # PIL resizes the cropped image, so it never reads outside the box: at the box's edges its two taps
        # become one, which is the place clamped to the edge pixel's centre
        place = torch.minimum(torch.maximum(place, start[:, None]), (start + length - 1)[:, None])
        return (2 * place + 1) / size - 1

    x0, y0, w, h = boxes.to(images.dtype).unbind(1)
    grid_x = along(x0, w, width)
    grid_x = torch.where(flip[:, None], grid_x.flip(-1), grid_x)
    across = torch.stack([grid_x[:, None, :].expand(-1, height, -1),
                          centres(height)[None, :, None].expand(n, -1, out_size)], dim=-1)  # (n, H, out, 2)
    rows = _round_pixels(F.grid_sample(images, across, mode="bilinear", padding_mode="border",
                                       align_corners=False))                              # (n, C, H, out)
    down = torch.stack([centres(out_size)[None, None, :].expand(n, out_size, -1),
                        along(y0, h, height)[:, :, None].expand(-1, -1, out_size)], dim=-1)  # (n, out, out, 2)
    return _round_pixels(F.grid_sample(rows, down, mode="bilinear", padding_mode="border", align_corners=False))


def _round_pixels(x):
    """To whole numbers 0-255, halves up, as PIL's 8-bit resampling passes round."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def cubic_kernel(t, a):
    """The cubic convolution kernel at distances t: PIL's bicubic uses a = -0.5 to resize, a = -1 for affine
    transforms (Geometry.c)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def _pil_bicubic_matrix(start, length, in_size, out_size):
    """PIL's bicubic resize (a = -0.5) of the spans [start, start + length) of rows of in_size pixels onto
    out_size pixels, when enlarging, as float64 matrices (n, out_size, in_size) of 4 taps per row.

    As PIL resizing a cropped image: taps on pixels outside the span's pixels are dropped and the rest
    renormalised. (When shrinking, PIL widens the filter; this does not.)
    """
    steps = torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5
    centre = start.double()[:, None] + steps * (length.double() / out_size)[:, None]     # (n, out) pixels
    index = (centre - 0.5).floor()[..., None] + torch.arange(-1, 3, device=start.device)  # (n, out, 4)
    weight = cubic_kernel(index + 0.5 - centre[..., None], a=-0.5)
    low, high = start.double().floor(), (start.double() + length.double()).ceil().clamp(max=in_size)
    weight = weight * ((index >= low[:, None, None]) & (index < high[:, None, None]))
    weight = weight / weight.sum(-1, keepdim=True)
    matrix = weight.new_zeros(len(start), out_size, in_size)
    return matrix.scatter_add_(2, index.clamp(0, in_size - 1).long(), weight)


def _resize_bicubic(images, boxes, out_size):
    """Each box of each image resized to out_size with PIL's bicubic: a horizontal pass, then a vertical one,
    each rounded to whole numbers in 0-255 as PIL's 8-bit passes are -> (n, C, out, out).

    Two small matmuls per image in float64: in float32 a CUDA matmul may run in TF32, whose 10-bit mantissa
    would move values by a tenth of a grey level."""
    _, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    along_width = _pil_bicubic_matrix(x0, w, width, out_size)                            # (n, out, W)
    along_height = _pil_bicubic_matrix(y0, h, height, out_size)                          # (n, out, H)
    rows = _round_pixels(images.double() @ along_width.transpose(1, 2)[:, None])      # (n, C, H, out)
    return _round_pixels(along_height[:, None] @ rows).to(images.dtype)


def normalize(images):
    """uint8 or 0-255 float (N, C, H, W) -> float in [-1, 1] (mean 0.5, std 0.5 per channel, as the original)."""
    return images.float().div(127.5).sub(1.0)


def denormalize(images):
    """[-1, 1] -> [0, 1], for pictures."""
    return (images.float() * 0.5 + 0.5).clamp(0, 1)


def random_erase(images, prob, generator, area=(0.02, 1 / 3), min_aspect=0.3, attempts=10):
    """timm's RandomErasing(mode="pixel"), per sample and batched: normalised (n, C, H, W) -> the same.

    (timm's own loops over the batch in Python, one image at a time; torchvision's erases one box per batch.)

    With probability `prob` an image gets one rectangle of per-pixel N(0, 1) noise: area fraction uniform in
    `area`, log aspect uniform in [log min_aspect, -log min_aspect], the first of `attempts` draws that fits
    (none fits: no erasing), top-left corner uniform over the places where it fits, as timm draws them.
    """
    n, _, height, width = images.shape
    device = images.device
    erase = torch.rand(n, generator=generator, device=device) < prob
    u = torch.rand(n, attempts, 4, generator=generator, device=device, dtype=torch.float64)
    target = (area[0] + (area[1] - area[0]) * u[..., 0]) * height * width
    aspect = torch.exp(math.log(min_aspect) * (1 - 2 * u[..., 1]))
    box_h, box_w = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # round half to even
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits
    erase &= fits.any(dim=1)
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)                               # (n, 1)
    top = (u[..., 2].gather(1, first) * (height - box_h + 1)).floor()
    left = (u[..., 3].gather(1, first) * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    in_rows = (rows >= top) & (rows < top + box_h)                                            # (n, H)
    in_cols = (cols >= left) & (cols < left + box_w)                                          # (n, W)
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]                 # (n, H, W)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside[:, None], noise, images)
