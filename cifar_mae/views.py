"""Two augmented views of each image for contrastive pretraining (MoCo's "aug-plus"), made on the device: a
random-resized crop with flip, colour jitter applied with probability p, random grayscale. Each colour op is
torchvision's definition (transforms.functional on float images), per sample and batched."""
import torch

from cifar_mae.loaders import DeviceLoader

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def grayscale(x):
    """(n, 3, H, W) in [0, 1] -> its luma (n, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def blend(x, other, factor):
    """factor * x + (1 - factor) * other, kept in [0, 1]; factor per sample (n,)."""
    factor = factor[:, None, None, None]
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(x, factor):
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    """Towards the mean luma of each image."""
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    """Towards each pixel's luma."""
    return blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Turn each pixel's hue (HSV, in turns) by `shift` (n,), keeping its value and saturation.

    Value and saturation fix a pixel's largest channel and its chroma (largest - smallest); the hue places the
    channels between them: channel c = largest - chroma * clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 hue) mod 6
    with n = 5, 3, 1 for red, green, blue."""
    r, g, b = x.unbind(1)
    largest, smallest = x.max(dim=1).values, x.min(dim=1).values
    chroma = largest - smallest
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sixths = torch.where(largest == r, (g - b) / safe,
                         torch.where(largest == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.remainder(sixths / 6 + shift[:, None, None], 1.0)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    k = torch.remainder(offsets + 6 * hue[:, None], 6)
    return largest[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's indexes


def sample_jitter(n, strength, p, generator, device):
    """ColorJitter(*strength) inside RandomApply(p), as torchvision draws it, per sample ->
    (applied (n,) bool, order (n, 4) op indexes, factors (n, 4): brightness, contrast, saturation, hue)."""
    applied = torch.rand(n, generator=generator, device=device) < p
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)
    u = torch.rand(n, 4, generator=generator, device=device)
    brightness, contrast, saturation, hue = strength
    low = torch.tensor([max(0, 1 - brightness), max(0, 1 - contrast), max(0, 1 - saturation), -hue], device=device)
    high = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue], device=device)
    return applied, order, low + (high - low) * u


def color_jitter(x, applied, order, factors, strength):
    """Apply each sample's ops in its order. Brightness, contrast and saturation are each a blend (towards black,
    the mean luma, the luma), so at each position one blend serves all three, with factor 1 for the samples whose
    op there is another; the hue turn is kept where it is the op. An op of strength 0 is left out, as torchvision
    leaves it (a blend's factor is then 1)."""
    for position in range(4):
        op = torch.where(applied, order[:, position], -1)  # -1: not jittered
        is_op = lambda index: (op == index)[:, None, None, None]
        luma = grayscale(x)  # the blend targets of adjust_contrast and adjust_saturation; brightness: black
        target = torch.where(is_op(1), luma.mean(dim=(1, 2, 3), keepdim=True), torch.where(is_op(2), luma, 0.0))
        factor = factors.gather(1, op.clamp(min=0)[:, None])[:, 0]
        x = blend(x, target, torch.where((op >= 0) & (op < 3), factor, 1.0))
        if strength[3]:
            x = torch.where(is_op(3), adjust_hue(x, factors[:, 3]), x)
    return x


class TwoViewLoader(DeviceLoader):
    """DeviceLoader whose batches are (views (n, 2, C, H, W) normalised, labels): two independent draws of the
    crop, flip, colour jitter (`jitter`: brightness, contrast, saturation, hue, applied with `jitter_prob`) and
    grayscale (`gray_prob`) per image."""

    def __init__(self, images, labels, batch_size, *, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, gray_prob=0.2,
                 **kwargs):
        super().__init__(images, labels, batch_size, train=True, **kwargs)
        self.jitter, self.jitter_prob, self.gray_prob = jitter, jitter_prob, gray_prob

    def view(self, images):
        """uint8 (n, C, H, W) -> one augmented view in [-1, 1]."""
        x = self.augment(images).float() / 255
        n, device = x.shape[0], x.device
        x = color_jitter(x, *sample_jitter(n, self.jitter, self.jitter_prob, self.aug_generator, device),
                         self.jitter)
        gray = torch.rand(n, generator=self.aug_generator, device=device) < self.gray_prob
        x = torch.where(gray[:, None, None, None], grayscale(x).expand_as(x), x)
        return x * 2 - 1

    def batches(self, order, start=0):
        for idx in self.order.steps(order, start):
            images = self.images[idx]
            yield torch.stack([self.view(images), self.view(images)], dim=1), self.labels[idx]
