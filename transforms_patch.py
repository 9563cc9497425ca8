"""Multi-crop augmentation that records where every view came from.

Each view carries its geometry (docs/method.md section 2): the crop box ``top, left, height, width`` in
source-image pixels as drawn by RandomResizedCrop, whether it was ``flipped`` horizontally after
cropping, and its output side ``size`` in pixels. Colour operations, including the optional
patch-level photometrics (docs/method.md section 5, ``PatchPhotometric``), leave geometry unchanged.
Patch matching (``patch_matching.py``) turns two geometries into token correspondences.

A geometry travels as a float64 tensor row ``[top, left, height, width, flipped, size]`` (float64
holds every pixel coordinate exactly, and the matching rule rounds float64 ratios).

All randomness comes from torch's global generator; nothing here reseeds it (training seeds it per
sample, see ``patch_wise_dino.TrainingImages``). Every image gets its own views.

Run as a script, draws one view before and after the patch-level photometrics:
    python transforms_patch.py --output docs/patch_augment.png
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import utils
from device_augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (defined there, imported from here too)
from device_augment import (PATCH_BLURS, check_patch_blur, check_patch_size, check_probability, check_tiling,
                            from_tiles, patch_photometric, same_size_runs, to_tiles)

GEOMETRY_FIELDS = ("top", "left", "height", "width", "flipped", "size")


@dataclass(frozen=True)
class ViewGeometry:
    """Where a square view of ``size x size`` pixels was cut from its source image.

    ``top, left, height, width`` is the crop box in source pixels; ``flipped`` is a horizontal
    flip applied after cropping and resizing.
    """

    top: float
    left: float
    height: float
    width: float
    flipped: bool
    size: int

    def to_tensor(self) -> torch.Tensor:
        """The geometry as a float64 row ``[6]``: ``[top, left, height, width, flipped, size]``."""
        return torch.tensor([self.top, self.left, self.height, self.width, float(self.flipped), self.size],
                            dtype=torch.float64)

    @classmethod
    def from_sequence(cls, values: Sequence[float] | torch.Tensor) -> "ViewGeometry":
        """Build from ``(top, left, height, width, flipped, size)`` (a tuple, list or tensor row)."""
        if isinstance(values, ViewGeometry):
            return values
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(values) != len(GEOMETRY_FIELDS):
            raise ValueError(f"a geometry has 6 values {GEOMETRY_FIELDS}, got {len(values)}: {values}")
        top, left, height, width, flipped, size = values
        if height <= 0 or width <= 0 or size <= 0:
            raise ValueError(f"geometry needs positive height, width and size, got {values}")
        return cls(top, left, height, width, bool(flipped), int(size))


_PIL_FILTERS = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR,
                InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.LANCZOS: Image.LANCZOS}


class RandomResizedCropWithGeometry(transforms.RandomResizedCrop):
    """torchvision's RandomResizedCrop to a square ``size``, also returning the crop's geometry.

    The crop box follows torchvision's ``get_params`` rule (same distribution), with all its random
    numbers drawn in one call.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"crop size must be a positive int (square views), got {size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)

    def forward(self, image: Image.Image) -> tuple[Image.Image, ViewGeometry]:
        """Crop and resize in one PIL call (the filter reads true neighbours, not a clamped border, at the box edge)."""
        top, left, height, width = self.draw_box(image.height, image.width)
        box = (left, top, left + width, top + height)
        view = image.resize(self.size[::-1], _PIL_FILTERS[self.interpolation], box=box)
        return view, ViewGeometry(top, left, height, width, False, self.size[0])

    def draw_box(self, image_height: int, image_width: int, attempts: int = 10) -> tuple[int, int, int, int]:
        """``top, left, height, width`` of a box with area ``U(scale)`` of the image and log aspect ratio
        ``U(log ratio)``, at a uniform position; after ``attempts`` boxes that do not fit, the centred
        crop of the image clipped to the ratio range (torchvision's rule)."""
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for area_u, ratio_u, top_u, left_u in torch.rand(attempts, 4).tolist():
            area = image_height * image_width * (self.scale[0] + (self.scale[1] - self.scale[0]) * area_u)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ratio_u)
            width, height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < width <= image_width and 0 < height <= image_height:
                top = min(int(top_u * (image_height - height + 1)), image_height - height)
                left = min(int(left_u * (image_width - width + 1)), image_width - width)
                return top, left, height, width
        return self._centred_box(image_height, image_width)

    def _centred_box(self, image_height: int, image_width: int) -> tuple[int, int, int, int]:
        height, width = image_height, image_width
        if image_width / image_height < min(self.ratio):
            height = round(image_width / min(self.ratio))
        elif image_width / image_height > max(self.ratio):
            width = round(image_height * max(self.ratio))
        return (image_height - height) // 2, (image_width - width) // 2, height, width


class RandomHorizontalFlipWithGeometry(torch.nn.Module):
    """Flip a view horizontally with probability ``p`` and toggle its geometry's ``flipped``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, image: Image.Image, geometry: ViewGeometry) -> tuple[Image.Image, ViewGeometry]:
        if torch.rand(1).item() < self.p:
            return TF.hflip(image), replace(geometry, flipped=not geometry.flipped)
        return image, geometry


class RandomGaussianBlur:
    """PIL Gaussian blur with radius drawn from ``U(radius_min, radius_max)``, applied with probability ``p``."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(1).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=U({self.radius_min}, {self.radius_max}))"


def photometric_transform(blur_p: float, solarize_p: float) -> transforms.Compose:
    """DINO's photometric recipe after crop and flip: colour, grayscale, blur, solarize, then a uint8 tensor.

    Normalisation is left to the training device (``device_augment.normalize``): a uint8 view is a
    quarter of the bytes to pass between processes, pin and copy.
    """
    return transforms.Compose([
        transforms.RandomApply(
            [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        RandomGaussianBlur(blur_p),
        transforms.RandomSolarize(threshold=128, p=solarize_p),
        transforms.PILToTensor(),
    ])


class PatchPhotometric:
    """Patch-level photometric augmentation (docs/method.md section 5) of uint8 views in the data workers.

    The float op is ``device_augment.patch_photometric``, the one ``--gpu_augment`` runs on the device:
    uint8 ``[B, 3, S, S]`` -> ``/ 255`` -> every tile of ``patch_size`` augmented on its own (each view
    with probability ``p``) -> rounded back to uint8 ``[B, 3, S, S]``. On the CPU each op runs only on the
    tiles that apply it (the device runs it on all, masked); same draws, from torch's global CPU generator.
    ``blur`` is the tile blur's kernel, one of ``device_augment.PATCH_BLURS`` (the authors' vertical 5 taps).
    """

    def __init__(self, patch_size: int, p: float = 1.0, blur: str = "authors"):
        check_patch_size(patch_size)
        check_probability(p, "patch_augment_p")
        check_patch_blur(blur)
        self.patch_size, self.p, self.blur = patch_size, p, blur

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        if views.dtype != torch.uint8:
            raise TypeError(f"PatchPhotometric takes uint8 views [B, 3, S, S], got {views.dtype} (float views in "
                            "[0, 1] go to device_augment.patch_photometric)")
        images = patch_photometric(views.float().div_(255), self.patch_size, self.p, blur=self.blur)
        return images.mul_(255).round_().to(torch.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patch_size={self.patch_size}, p={self.p}, blur={self.blur!r})"


class MultiCropAugmentation:
    """DINO's multi-crop augmentation, returning the views and their geometry.

    Views, in order: global 1 (blur p=1.0), global 2 (blur p=0.1, solarize p=0.2), then
    ``local_crops_number`` local views (blur p=0.5). Each is cropped, flipped (p=0.5), colour
    jittered (p=0.8), turned grayscale (p=0.2), blurred and solarized; with ``photometric=False``
    only cropped and flipped (the colour part then runs on the training device, ``device_augment.py``).

    With ``patch_augment_p > 0`` every view then gets, with that probability, the patch-level
    photometrics on tiles of ``patch_size`` (``PatchPhotometric``, tile blur kernel ``patch_blur``), here
    when ``photometric`` is true and on the device otherwise. They run after all views are cut and coloured,
    so that the crops, flips and DINO photometrics draw the same random numbers as without them; at 0 (the
    default) nothing is drawn.

    Calling it on a PIL image returns ``(views, geometry)``: a list of ``2 + local_crops_number``
    uint8 tensors ``[3, S, S]`` (S the global or local size; normalisation happens on the device)
    and a float64 tensor ``[V, 6]``.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96, photometric: bool = True,
                 patch_augment_p: float = 0.0, patch_size: int | None = None, patch_blur: str = "authors"):
        if not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an int >= 0, got {local_crops_number!r}")
        check_probability(patch_augment_p, "patch_augment_p")
        check_patch_blur(patch_blur)
        if patch_augment_p > 0:
            if patch_size is None:
                raise ValueError("patch_augment_p > 0 needs patch_size (the ViT's patch size)")
            for size in [global_crops_size] + [local_crops_size] * bool(local_crops_number):
                check_tiling((1, 3, size, size), patch_size)
        self.local_crops_number = local_crops_number
        self.global_crop = RandomResizedCropWithGeometry(global_crops_size, scale=tuple(global_crops_scale))
        self.local_crop = RandomResizedCropWithGeometry(local_crops_size, scale=tuple(local_crops_scale))
        self.flip = RandomHorizontalFlipWithGeometry(p=0.5)
        self.photometric = photometric
        if photometric:
            self.global_photometrics = [photometric_transform(blur_p=1.0, solarize_p=0.0),
                                        photometric_transform(blur_p=0.1, solarize_p=0.2)]
            self.local_photometric = photometric_transform(blur_p=0.5, solarize_p=0.0)
        else:
            self.global_photometrics = [transforms.PILToTensor()] * 2
            self.local_photometric = transforms.PILToTensor()
        self.patch_augment_p, self.patch_size, self.patch_blur = patch_augment_p, patch_size, patch_blur
        here = photometric and patch_augment_p > 0  # with photometric=False the device runs them
        self.patch_photometric = PatchPhotometric(patch_size, patch_augment_p, patch_blur) if here else None

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops_number

    def pipelines(self) -> list[tuple[RandomResizedCropWithGeometry, Callable]]:
        """(crop, photometric) for every view, globals first."""
        globals_ = [(self.global_crop, photometric) for photometric in self.global_photometrics]
        return globals_ + [(self.local_crop, self.local_photometric)] * self.local_crops_number

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        if image.mode != "RGB":
            image = utils.to_rgb(image)  # as utils.read_rgb_image: 16-bit grayscale scaled, not clipped to white
        views, geometries = [], []
        for crop, photometric in self.pipelines():
            view, geometry = self.flip(*crop(image))
            views.append(photometric(view))
            geometries.append(geometry.to_tensor())
        if self.patch_photometric is not None:
            views = self.patch_augment(views)
        return views, torch.stack(geometries)

    def patch_augment(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The patch-level photometrics of uint8 views ``V x [3, S_v, S_v]``, one call per run of same-size views."""
        augmented: list[torch.Tensor] = []
        for run in same_size_runs(views):
            augmented.extend(self.patch_photometric(torch.stack([views[v] for v in run])).unbind(0))
        return augmented

    def __repr__(self) -> str:
        where = "here" if self.photometric else "on the device"
        patch = (f", patch photometrics p={self.patch_augment_p} on {self.patch_size}px tiles {where} "
                 f"({self.patch_blur} blur)" if self.patch_augment_p > 0 else "")
        return (f"{type(self).__name__}(global={self.global_crop.size[0]}px scale={self.global_crop.scale}, "
                f"local={self.local_crops_number}x{self.local_crop.size[0]}px scale={self.local_crop.scale}, "
                f"photometric={where}{patch})")


def collate_multicrop(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Stack ``[((views, geometry), label), ...]`` (an ImageFolder over MultiCropAugmentation).

    Returns:
        images: list of ``V`` tensors ``[B, 3, S_v, S_v]``, one per view;
        geometry: float64 ``[B, V, 6]``;
        labels: int64 ``[B]`` (any per-sample integer: training passes counts of skipped images).
    """
    samples, labels = zip(*batch)
    views_per_sample, geometries = zip(*samples)
    num_views = len(views_per_sample[0])
    if any(len(views) != num_views for views in views_per_sample):
        raise ValueError("every sample of a batch must have the same number of views")
    images = [torch.stack([views[v] for views in views_per_sample]) for v in range(num_views)]
    return images, torch.stack(geometries), torch.as_tensor(labels, dtype=torch.int64)


def eval_transform(resize_size: int, crop_size: int) -> transforms.Compose:
    """Evaluation preprocessing: bicubic resize of the shorter side, centre crop, normalise."""
    if crop_size > resize_size:
        raise ValueError(f"--crop_size {crop_size} cannot exceed --resize_size {resize_size}")
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ----------------------------------------------------------------------------------------------
# Script: a view before and after the patch-level photometrics.
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Patch-level photometric augmentation of one view, drawn: writes a random "
                                           "view of --image before and after the patch-level photometrics "
                                           "(docs/method.md section 5), with its tile grid.")
    parser.add_argument("--image", default="test.png", type=Path, help="Source photo (any format PIL reads).")
    parser.add_argument("--output", default="patch_augment.png", type=Path, help="Where to write the drawing (PNG).")
    parser.add_argument("--size", default=224, type=int, help="Side of the view in pixels (a global view).")
    parser.add_argument("--patch_size", default=16, type=int, help="Side of the tiles (the ViT's patch size).")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the crop, the flip and the tiles' draws.")
    parser.add_argument("--patch_blur", default="authors", choices=list(PATCH_BLURS),
                        help="Kernel of the tile blur, as the training script's --patch_blur.")
    return parser


def with_tile_grid(view: torch.Tensor, patch_size: int, gap: int = 1) -> Image.Image:
    """uint8 view ``[3, S, S]`` -> PIL image with a white ``gap`` between its tiles (no pixel hidden)."""
    tiles = F.pad(to_tiles(view[None], patch_size), (0, gap, 0, gap), value=255)
    side = view.shape[-1] // patch_size * (patch_size + gap)
    grid = from_tiles(tiles, (1, 3, side, side))[0, :, :side - gap, :side - gap]
    return TF.to_pil_image(grid)


def side_by_side(panels: dict[str, Image.Image], margin: int = 8, caption: int = 16) -> Image.Image:
    """Equal-size panels in a row on white, each under its caption."""
    width, height = next(iter(panels.values())).size
    canvas = Image.new("RGB", (len(panels) * (width + margin) + margin, height + caption + margin), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (title, panel) in enumerate(panels.items()):
        left = margin + index * (width + margin)
        draw.text((left, 2), title, fill="black")
        canvas.paste(panel, (left, caption))
    return canvas


def main(args: argparse.Namespace) -> Path:
    check_tiling((1, 3, args.size, args.size), args.patch_size)
    utils.check_output_file(args.output, "--output")
    if not args.image.is_file():
        raise FileNotFoundError(f"image {args.image} not found; pass --image PATH to a photo")
    image = utils.read_rgb_image(args.image)
    torch.manual_seed(args.seed)
    crop, flip = RandomResizedCropWithGeometry(args.size, (0.4, 1.0)), RandomHorizontalFlipWithGeometry(p=0.5)
    view, geometry = flip(*crop(image))
    before = TF.pil_to_tensor(view)
    after = PatchPhotometric(args.patch_size, blur=args.patch_blur)(before[None])[0]
    drawing = side_by_side({f"view ({args.size} px)": with_tile_grid(before, args.patch_size),
                            f"patch-augmented ({args.patch_size} px tiles, {args.patch_blur} blur)":
                                with_tile_grid(after, args.patch_size)})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    utils.save_image(drawing, args.output, optimize=True)
    print(f"view {geometry}; wrote {args.output} ({args.output.stat().st_size / 1000:.0f} kB)")
    return args.output


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
