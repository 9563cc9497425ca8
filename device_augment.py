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
* optionally (``patch_augment_p > 0``), the patch-level photometrics of docs/method.md section 5
  (``patch_photometric``): every patch-size tile of a view gets its own small colour jitter, blur,
  sharpness and posterize, in its own order. The blur is the authors' vertical 5-tap kernel by default
  (``patch_blur="authors"``) or a square one (``"isotropic"``, see ``PATCH_BLURS``). The CPU-augmented
  path runs the same function in the data workers (``transforms_patch.PatchPhotometric``);
* ImageNet normalisation (``normalize`` alone is what the CPU-augmented path runs on the device).

Images are float ``[B, 3, H, W]`` in ``[0, 1]`` between steps, clamped after every colour op as
torchvision does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import utils

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # here, not in transforms_patch, which imports this module
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}


class DevicePhotometric:
    """Per-view photometric recipe for ``2 + local_crops_number`` views; call it on a list of uint8 batches.

    Args:
        local_crops_number: local views after the two global ones.
        jitter_p, grayscale_p: probabilities of colour jitter and grayscale (every view).
        blur_p: blur probability of (global 1, global 2, local views).
        solarize_p: solarization probability of global view 2 (0 elsewhere).
        patch_augment_p: probability that a view (any view) gets the patch-level photometrics
            (``patch_photometric``) after the ones above; 0 (the default) runs nothing and draws nothing.
        patch_size: side of the tiles of the patch-level photometrics (the ViT's patch size).
        patch_blur: kernel of their tile blur, one of ``PATCH_BLURS`` (the authors' vertical 5 taps by default).
    """

    def __init__(self, local_crops_number: int, jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5), solarize_p: float = 0.2,
                 patch_augment_p: float = 0.0, patch_size: int = 16, patch_blur: str = "authors"):
        check_probability(patch_augment_p, "patch_augment_p")
        check_patch_size(patch_size)
        check_patch_blur(patch_blur)
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_p = [blur_p[0], blur_p[1]] + [blur_p[2]] * local_crops_number
        self.solarize_p = [0.0, solarize_p] + [0.0] * local_crops_number
        self.patch_augment_p, self.patch_size, self.patch_blur = patch_augment_p, patch_size, patch_blur

    def __call__(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """``V`` uint8 batches ``[B, 3, S_v, S_v]`` -> augmented, normalised float32 batches.

        Consecutive views of one size are augmented as one batch (each sample with its view's probabilities).
        """
        if len(views) != len(self.blur_p):
            raise ValueError(f"expected {len(self.blur_p)} views, got {len(views)}")
        outputs: list[torch.Tensor] = []
        for group in same_size_runs(views):
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
        images = random_solarize(images, solarize_p)
        if self.patch_augment_p > 0:  # skipped at 0 so that the random draws stay those of the plain recipe
            images = patch_photometric(images, self.patch_size, self.patch_augment_p, blur=self.patch_blur)
        return images

    def __repr__(self) -> str:
        patch = (f", patch_augment_p={self.patch_augment_p}, patch_size={self.patch_size}, "
                 f"patch_blur={self.patch_blur!r}" if self.patch_augment_p else "")
        return (f"{type(self).__name__}(jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
                f"blur_p={self.blur_p}, solarize_p={self.solarize_p}{patch})")


def same_size_runs(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of consecutive views with the same shape: ``[224, 224, 96, 96] -> [[0, 1], [2, 3]]``."""
    return utils.consecutive_runs([view.shape for view in views])


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
    return gaussian_blur(images, sigma, radius=blur_radius(sigma_range[1]))


def blur_radius(max_sigma: float) -> int:
    """Kernel radius for sigmas up to ``max_sigma``: 3 sigma (2.0 -> 6, a 13-tap kernel)."""
    return int(3 * max_sigma + 0.5)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int, vertical_only: bool = False
                  ) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with per-sample ``sigma [B]`` (0: unchanged), reflected borders.

    The kernel has ``2 * radius + 1`` taps (torchvision's weights, the radius capped below the side for the
    reflection); ``vertical_only`` skips the horizontal pass: torchvision's ``kernel_size=(1, 2 * radius + 1)``.
    """
    batch, channels, height, width = images.shape
    radius = min(radius, height - 1) if vertical_only else min(radius, height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma.clamp(min=1e-6)[:, None]) ** 2)  # sigma 0: a unit impulse
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # per (sample, channel)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=len(kernels))
    if not vertical_only:
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :],
                        groups=len(kernels))
    return flat.view(batch, channels, height, width)


def random_solarize(images: torch.Tensor, p: float | torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` of each image with probability ``p`` (or ``p[i]``)."""
    chosen = _per_sample(_happens(len(images), p, images.device))
    return torch.where(chosen & (images >= threshold), 1.0 - images, images)


# ----------------------------------------------------------------------------------------------
# Patch-level photometric augmentation (docs/method.md section 5).
# ----------------------------------------------------------------------------------------------
PATCH_JITTER = {"brightness": (0.9, 1.1), "hue": (-0.1, 0.1)}  # torchvision ColorJitter(brightness=0.1, hue=0.1)
PATCH_BLUR_SIGMA = (0.1, 2.0)
# The authors' GaussianBlur(kernel_size=(1, 5)) is (width, height): 1 tap wide, 5 tall (docs/method.md section 5).
PATCH_BLUR_TAPS = 5
PATCH_BLURS = {"authors": "vertical only, 5 taps (the authors' kernel_size=(1, 5))",
               "isotropic": "square, up to 13x13 taps (about twice the change per pixel)"}
PATCH_SHARPNESS_FACTOR, PATCH_SHARPNESS_P = 2.0, 0.5
PATCH_POSTERIZE_BITS, PATCH_POSTERIZE_P = 3, 0.5


def check_probability(p: float, name: str) -> None:
    """Raise unless ``0 <= p <= 1``."""
    if not 0 <= p <= 1:
        raise ValueError(f"{name} is a probability: pass a value in [0, 1], got {p!r}")


def check_patch_size(patch_size: int) -> None:
    """Raise unless ``patch_size`` is a positive int."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int (the ViT's patch size), got {patch_size!r}")


def check_patch_blur(blur: str) -> None:
    """Raise unless ``blur`` names a tile blur kernel of ``PATCH_BLURS``."""
    if blur not in PATCH_BLURS:
        kinds = "; ".join(f"{name!r}: {what}" for name, what in PATCH_BLURS.items())
        raise ValueError(f"patch_blur must be one of {', '.join(map(repr, PATCH_BLURS))} ({kinds}), got {blur!r}")


def check_tiling(shape: tuple[int, ...], patch_size: int) -> None:
    """Raise unless ``shape`` is RGB views ``[B, 3, H, W]`` with ``H`` and ``W`` multiples of ``patch_size``."""
    check_patch_size(patch_size)
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"expected RGB views [B, 3, H, W], got shape {tuple(shape)}")
    if shape[2] % patch_size or shape[3] % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the {shape[2]}x{shape[3]} views: use crop sizes "
                         f"that are multiples of the patch size")


def to_tiles(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Views ``[B, C, H, W]`` -> tiles ``[B * (H/p) * (W/p), C, p, p]`` (``p = patch_size``), row-major per view."""
    batch, channels, height, width = images.shape
    grid = images.reshape(batch, channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, patch_size, patch_size)


def from_tiles(tiles: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of ``to_tiles``: tiles ``[B * (H/p) * (W/p), C, p, p]`` -> views of ``shape`` ``(B, C, H, W)``."""
    batch, channels, height, width = shape
    patch = tiles.shape[-1]
    grid = tiles.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def patch_photometric(images: torch.Tensor, patch_size: int, p: float | torch.Tensor = 1.0, *,
                      masked: bool | None = None, blur: str = "authors") -> torch.Tensor:
    """Patch-level photometric augmentation of views ``[B, 3, H, W]`` (float in ``[0, 1]``), docs/method.md section 5.

    Each view is augmented with probability ``p`` (a number, or one per view ``[B]``). In an augmented
    view every ``patch_size`` tile draws its own order and parameters of the four ops
    (``random_tile_photometric``) and sees only its own pixels, so no pixel moves (the geometry is
    unchanged) and each output tile is a function of its input tile alone. Random numbers come from
    the device's default generator, the same draws whatever the dispatch (``masked``, see ``_apply_where``)
    or the ``blur`` kernel (``PATCH_BLURS``).
    Returns float ``[B, 3, H, W]`` in ``[0, 1]``; views not augmented are returned bit for bit.
    """
    check_tiling(images.shape, patch_size)
    check_patch_blur(blur)
    if not isinstance(p, torch.Tensor):
        check_probability(p, "p")
    applied = _happens(len(images), p, images.device)
    tiles_per_view = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    tiles = random_tile_photometric(to_tiles(images, patch_size), applied.repeat_interleave(tiles_per_view),
                                    masked=masked, blur=blur)
    return torch.where(_per_sample(applied), from_tiles(tiles, images.shape), images)


def random_tile_photometric(tiles: torch.Tensor, where: torch.Tensor | None = None, *,
                            masked: bool | None = None, blur: str = "authors") -> torch.Tensor:
    """Colour jitter, blur (kernel ``blur``), sharpness and posterize on tiles ``[T, 3, p, p]``, each in its own order.

    As torchvision's ``RandomOrder``, with parameters drawn per tile (``_draw_tile_parameters``); only the
    tiles ``where`` ``[T]`` is true (all if ``None``) change, but every tile draws (the draws do not
    depend on ``where``). At each position of the order each op runs on the tiles that apply it there
    (``_apply_where``): no loop over tiles.
    """
    count, device, ops = len(tiles), tiles.device, _tile_ops(blur)
    order = torch.rand(count, len(ops), device=device).argsort(dim=1)  # a random permutation per tile
    parameters = _draw_tile_parameters(count, device)
    for position in range(len(ops)):
        for op_index, (name, op) in enumerate(ops.items()):
            active = order[:, position] == op_index
            if where is not None:
                active &= where
            tiles = _apply_where(tiles, op, active, parameters[name], _TILE_IDENTITY[name], masked)
    return tiles


def _apply_where(tiles: torch.Tensor, op: Callable, active: torch.Tensor, values: tuple[torch.Tensor, ...],
                 identities: tuple[float | bool, ...], masked: bool | None = None) -> torch.Tensor:
    """``op(tiles, *values)`` on the ``active`` tiles ``[T]`` (``values`` per tile ``[T]``), the others unchanged.

    The one place the two dispatches differ, same draws and same op. Indexed (the default on the CPU):
    the op runs on the active tiles only, so each tile computes each op once. Masked (the default
    elsewhere, or ``masked=True``): the op runs on every tile, the inactive ones with the ``identities``
    values, which return them bit for bit; no data-dependent shape, so no host synchronisation on a GPU.
    """
    if masked is None:
        masked = tiles.device.type != "cpu"
    if masked:
        return op(tiles, *(torch.where(active, value, identity) for value, identity in zip(values, identities)))
    index = active.nonzero().squeeze(1)
    if len(index) == 0:
        return tiles
    return tiles.index_copy(0, index, op(tiles[index], *(value[index] for value in values)))


def _draw_tile_parameters(count: int, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per-tile parameters ``[T]`` of each op of ``_tile_ops``: factors, sigmas, coin flips (any blur kernel)."""
    return {
        "jitter": (_draw(count, *PATCH_JITTER["brightness"], device), _draw(count, *PATCH_JITTER["hue"], device),
                   _happens(count, 0.5, device)),  # brightness before the hue shift, or after
        "blur": (_draw(count, *PATCH_BLUR_SIGMA, device),),
        "sharpness": (_happens(count, PATCH_SHARPNESS_P, device),),
        "posterize": (_happens(count, PATCH_POSTERIZE_P, device),),
    }


def _tile_jitter(tiles: torch.Tensor, brightness: torch.Tensor, hue: torch.Tensor,
                 brightness_first: torch.Tensor) -> torch.Tensor:
    """ColorJitter(brightness, hue) on every tile ``[T]``, the two in each tile's own order.

    One hue pass, with brightness on either side of it: each tile applies one of the two brightness passes.
    """
    tiles = adjust_brightness(tiles, torch.where(brightness_first, brightness, 1.0))
    tiles = adjust_hue(tiles, hue)
    return adjust_brightness(tiles, torch.where(brightness_first, 1.0, brightness))


def _tile_blur_authors(tiles: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's ``GaussianBlur(kernel_size=(1, 5))`` of every tile ``[T, 3, p, p]`` with its ``sigma [T]``:
    vertical only, borders reflected inside each tile."""
    return gaussian_blur(tiles, sigma, radius=PATCH_BLUR_TAPS // 2, vertical_only=True)


def _tile_blur_isotropic(tiles: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Square Gaussian blur of every tile ``[T, 3, p, p]`` with its ``sigma [T]``, 3-sigma radius (up to 13x13
    taps), borders reflected inside each tile (the radius capped to its side)."""
    return gaussian_blur(tiles, sigma, radius=blur_radius(PATCH_BLUR_SIGMA[1]))


def _tile_sharpness(tiles: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return adjust_sharpness(tiles, torch.where(chosen, PATCH_SHARPNESS_FACTOR, 1.0))


def _tile_posterize(tiles: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(chosen), posterize(tiles, PATCH_POSTERIZE_BITS), tiles)


_TILE_BLURS = {"authors": _tile_blur_authors, "isotropic": _tile_blur_isotropic}  # the kernels of PATCH_BLURS


def _tile_ops(blur: str) -> dict[str, Callable]:
    """The four tile ops with the ``blur`` kernel, in the fixed order each tile's drawn permutation indexes."""
    return {"jitter": _tile_jitter, "blur": _TILE_BLURS[blur], "sharpness": _tile_sharpness,
            "posterize": _tile_posterize}


# The values of each op's parameters that return a tile bit for bit (the inactive tiles of the masked dispatch).
_TILE_IDENTITY = {"jitter": (1.0, 0.0, False), "blur": (0.0,), "sharpness": (False,), "posterize": (False,)}


def adjust_sharpness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_sharpness`` with per-sample ``factors [B]`` on ``[B, C, H, W]``: 1 returns the image.

    Blends each image with its smoothed version: inside, the 3x3 filter ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``
    (PIL's SMOOTH); on the 1-pixel border, the image itself. Sums of shifted slices, not a convolution with
    one group per channel, which is several times slower on small tiles.
    """
    rows = images[..., :, :-2] + images[..., :, 1:-1] + images[..., :, 2:]  # sums of 3 neighbours in a row
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # 3x3 sums
    smoothed = images.clone()
    smoothed[..., 1:-1, 1:-1] = (box + 4 * images[..., 1:-1, 1:-1]) / 13
    return torch.lerp(smoothed, images, _per_sample(factors)).clamp_(0, 1)  # weight 1 returns the image exactly


def posterize(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` of each pixel's 8-bit level (torchvision's ``posterize``) on floats in ``[0, 1]``."""
    mask = 256 - 2 ** (8 - bits)  # 3 bits: 0b11100000
    levels = images.mul(255).round_().to(torch.uint8)
    return levels.bitwise_and_(mask).to(images.dtype).div_(255)
