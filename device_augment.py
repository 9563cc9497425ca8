"""DINO's photometric augmentation on batches of views on the training device (``--gpu_augment``).

The data workers then only decode, crop and flip (the geometry is decided there) and send ``uint8``
views; colour jitter, grayscale, blur and solarization run here on whole batches with **per-sample**
random parameters, drawn from the device's default generator (seeded by ``torch.manual_seed``):

* colour jitter with p=0.8: brightness, contrast and saturation factors ``U(0.6, 1.4)``,
  ``U(0.6, 1.4)``, ``U(0.8, 1.2)``, hue shift ``U(-0.1, 0.1)``, applied in a random order per sample
  (as torchvision's ``ColorJitter``);
* grayscale with p=0.2;
* Gaussian blur with sigma ``U(0.1, 2.0)`` and the view's probability (1.0 on global view 1,
  0.1 on global view 2, 0.5 on local views);
* solarization (pixels >= 128/255 inverted) with p=0.2 on global view 2 only;
* ImageNet normalisation (``normalize`` alone is what the CPU-augmented path runs on the device).

Images are float ``[B, 3, H, W]`` in ``[0, 1]`` between steps, clamped after every colour op as
torchvision does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transforms_patch import IMAGENET_MEAN, IMAGENET_STD

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}


class DevicePhotometric:
    """Per-view photometric recipe for ``2 + local_crops_number`` views; call it on a list of uint8 batches.

    Args:
        local_crops_number: local views after the two global ones.
        jitter_p, grayscale_p: probabilities of colour jitter and grayscale (every view).
        blur_p: blur probability of (global 1, global 2, local views).
        solarize_p: solarization probability of global view 2 (0 elsewhere).
    """

    def __init__(self, local_crops_number: int, jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5), solarize_p: float = 0.2):
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_p = [blur_p[0], blur_p[1]] + [blur_p[2]] * local_crops_number
        self.solarize_p = [0.0, solarize_p] + [0.0] * local_crops_number

    def __call__(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """``V`` uint8 batches ``[B, 3, S_v, S_v]`` -> augmented, normalised float32 batches.

        Consecutive views of one size are augmented as one batch (each sample with its view's probabilities).
        """
        if len(views) != len(self.blur_p):
            raise ValueError(f"expected {len(self.blur_p)} views, got {len(views)}")
        outputs: list[torch.Tensor] = []
        for group in _same_size_runs(views):
            images = torch.cat([views[v] for v in group])
            blur_p, solarize_p = (_per_sample_values([values[v] for v in group], len(views[group[0]]), images.device)
                                  for values in (self.blur_p, self.solarize_p))
            outputs.extend(normalize(self.augment(images, blur_p, solarize_p)).chunk(len(group)))
        return outputs

    def augment(self, views: torch.Tensor, blur_p: torch.Tensor, solarize_p: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, S, S]`` -> float ``[N, 3, S, S]`` in ``[0, 1]``; blur and solarize probabilities ``[N]``."""
        images = views.float().div_(255)
        images = color_jitter(images, self.jitter_p)
        images = random_grayscale(images, self.grayscale_p)
        images = random_gaussian_blur(images, blur_p)
        return random_solarize(images, solarize_p)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
                f"blur_p={self.blur_p}, solarize_p={self.solarize_p})")


def _same_size_runs(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of consecutive views with the same shape: ``[224, 224, 96, 96] -> [[0, 1], [2, 3]]``."""
    runs: list[list[int]] = []
    for index, view in enumerate(views):
        if runs and views[runs[-1][-1]].shape == view.shape:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _per_sample_values(per_view: list[float], batch: int, device: torch.device) -> torch.Tensor:
    """One value per view -> one per sample of those views stacked, ``[len(per_view) * batch]``."""
    return torch.tensor(per_view, device=device).repeat_interleave(batch)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 views ``[B, 3, H, W]`` (0..255) or float ones in ``[0, 1]`` -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    return (images.float() - mean * scale) / (std * scale)


def _draw(batch: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    """``[B]`` uniform draws in ``[low, high)``."""
    return torch.empty(batch, device=device).uniform_(low, high)


def _happens(batch: int, p: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B]`` booleans, each true with probability ``p`` (a number, or one per sample ``[B]``)."""
    return torch.rand(batch, device=device) < p


def color_jitter(images: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample colour jitter with probability ``p``; each sample applies the four ops in its own order.

    Every op runs once per position of the order on the whole batch, with the identity factor for
    samples that apply another op at that position (or none): no host synchronisation.
    """
    batch, device = len(images), images.device
    applied = _happens(batch, p, device)
    factors = {name: _draw(batch, *bounds, device) for name, bounds in JITTER.items()}
    identity = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    order = torch.rand(batch, len(JITTER), device=device).argsort(dim=1)  # a random permutation per sample
    for position in range(len(JITTER)):
        for op_index, (name, op) in enumerate(_JITTER_OPS.items()):
            active = applied & (order[:, position] == op_index)
            images = op(images, torch.where(active, factors[name], identity[name]))
    return images


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB images ``[B, 3, H, W]`` (ITU-R 601-2, as PIL and torchvision)."""
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factors)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean gray level."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean, images, _per_sample(factors)).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with each image's grayscale version."""
    return torch.lerp(grayscale(images), images, _per_sample(factors)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shifts`` ``[B]`` (fractions of a turn) in HSV space; a zero shift returns the image as is."""
    hue, saturation, value = rgb_to_hsv(images).unbind(1)
    hue = torch.remainder(hue + shifts.view(-1, 1, 1), 1.0)
    rotated = hsv_to_rgb(torch.stack([hue, saturation, value], dim=1))
    return torch.where(_per_sample(shifts != 0), rotated, images)  # no round-off for unjittered samples


_JITTER_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
               "hue": adjust_hue}


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` in ``[0, 1]`` -> HSV, hue in ``[0, 1)``."""
    red, green, blue = images.unbind(1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    saturation = chroma / value.clamp(min=1e-12)  # 0 for black (chroma 0)
    safe_chroma = chroma.clamp(min=1e-12)
    hue = torch.where(value == red, (green - blue) / safe_chroma,
                      torch.where(value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma))
    hue = torch.where(chroma > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """HSV ``[B, 3, H, W]`` (hue in ``[0, 1)``) -> RGB in ``[0, 1]``."""
    hue, saturation, value = images.unbind(1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue[:, None], 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[:, None] - (value * saturation)[:, None] * ramp


def random_grayscale(images: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each image by its 3-channel grayscale with probability ``p``."""
    chosen = _per_sample(_happens(len(images), p, images.device))
    return torch.where(chosen, grayscale(images).expand_as(images), images)


def random_gaussian_blur(images: torch.Tensor, p: float | torch.Tensor,
                         sigma_range: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Blur each image with probability ``p`` (or ``p[i]``), with sigma drawn from ``U(sigma_range)``."""
    sigma = _draw(len(images), *sigma_range, images.device)
    sigma = torch.where(_happens(len(images), p, images.device), sigma, 0.0)
    return gaussian_blur(images, sigma, radius=int(3 * sigma_range[1] + 0.5))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with per-sample ``sigma [B]`` (0: unchanged), reflected borders."""
    batch, channels, height, width = images.shape
    radius = min(radius, height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma.clamp(min=1e-6)[:, None]) ** 2)  # sigma 0: a unit impulse
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # per (sample, channel)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=len(kernels))
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=len(kernels))
    return flat.view(batch, channels, height, width)


def random_solarize(images: torch.Tensor, p: float | torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` of each image with probability ``p`` (or ``p[i]``)."""
    chosen = _per_sample(_happens(len(images), p, images.device))
    return torch.where(chosen & (images >= threshold), 1.0 - images, images)
