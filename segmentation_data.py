"""Semantic-segmentation data as ``eval_segmentation.py`` reads it: Pascal VOC 2012, ADE20K or a plain folder.

Layouts (``--data_path`` is the folder that holds the dataset folder, or the dataset folder itself):

* ``voc``: ``VOC2012/JPEGImages/<stem>.jpg``, masks ``VOC2012/SegmentationClass/<stem>.png`` (stems missing
  there are looked up in ``SegmentationClassAug/``, the SBD-augmented masks), splits
  ``VOC2012/ImageSets/Segmentation/<split>.txt`` (train, trainaug, val). 21 classes (0 is background); 255
  is ignored.
* ``ade20k``: ``ADEChallengeData2016/images/<split>/<stem>.jpg`` and ``annotations/<split>/<stem>.png``
  (training, validation). Annotations hold 1..150 and 0 ("other", ignored): class c is annotation c + 1,
  as in mmseg's ``reduce_zero_label``.
* ``folder``: ``images/<split>/`` and ``masks/<split>/`` with matching stems; ``--num_classes`` classes
  0..C-1 and ``--ignore_index`` ignored.

Masks are indexed (palette) or single-channel PNGs whose values are labels. A ``class_names.txt`` in the
dataset folder (one name per line), if present, names the classes and sets their number.

Inside the evaluation a label map is int64 class indices ``[H, W]`` with the ignored pixels set to
``num_classes`` (one past the last class), so that one integer type serves every dataset.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import utils
from transforms_patch import RandomResizedCropWithGeometry

LAYOUTS = ("voc", "ade20k", "folder")
DEFAULT_SPLITS = {"voc": ("train", "val"), "ade20k": ("training", "validation"), "folder": ("train", "val")}
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CLASS_NAMES_FILE = "class_names.txt"
MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files are and how its mask values map to classes: ``class = value - label_offset``,
    ``ignore_value`` ignored (None: nothing is)."""

    name: str
    root: Path
    num_classes: int
    ignore_value: int | None
    label_offset: int
    class_names: tuple[str, ...]

    def to_value(self, labels: np.ndarray) -> np.ndarray:
        """Internal labels (ignored = ``num_classes``) back to the dataset's own mask values."""
        values = labels.astype(np.int64) + self.label_offset
        return np.where(labels == self.num_classes, -1 if self.ignore_value is None else self.ignore_value, values)


@dataclass(frozen=True)
class Sample:
    """One image and its mask."""

    stem: str
    image: Path
    mask: Path


# ----------------------------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------------------------
def resolve_layout(data_path: str | Path, dataset: str, num_classes: int | None = None,
                   ignore_index: int | None = None) -> Layout:
    """The layout of ``dataset`` under ``data_path``, checked: an error names the folders it expected and
    those it found."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of {', '.join(LAYOUTS)}")
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise FileNotFoundError(f"--data_path {data_path} is not a folder")
    root, required = {"voc": _voc_root, "ade20k": _ade_root, "folder": _folder_root}[dataset](data_path)
    missing = [name for name in required if not (root / name).is_dir()]
    if dataset == "voc" and not any((root / name).is_dir() for name in ("SegmentationClass", "SegmentationClassAug")):
        missing.append("SegmentationClass or SegmentationClassAug")
    if missing:
        expected = required + (["SegmentationClass or SegmentationClassAug"] if dataset == "voc" else [])
        found = ", ".join(entry.name + "/" for entry in utils.scan_folder(root) if entry.is_dir()) \
            if root.is_dir() else f"no folder {root.name}/"
        raise FileNotFoundError(f"{root} is not a {dataset} layout: expected {', '.join(expected)} in it (missing: "
                                f"{', '.join(missing)}); found {found or 'no folders'}. {_layout_help(dataset)}")
    names = read_class_names(root)
    classes = {"voc": 21, "ade20k": 150, "folder": None}[dataset]
    classes = num_classes or (len(names) if names else classes)
    if classes is None:
        raise ValueError(f"--dataset folder needs --num_classes (or a {CLASS_NAMES_FILE} in {root})")
    if names and len(names) != classes:
        raise ValueError(f"{root / CLASS_NAMES_FILE} names {len(names)} classes but --num_classes is {classes}")
    if dataset != "folder" and ignore_index is not None:
        raise ValueError(f"--ignore_index is set by the {dataset} layout (255 for voc, 0 for ade20k); give it only "
                         "with --dataset folder")
    ignore, offset = {"voc": (255, 0), "ade20k": (0, 1), "folder": (folder_ignore(ignore_index, classes), 0)}[dataset]
    if not names:
        names = VOC_CLASSES if dataset == "voc" and classes == 21 else tuple(f"class{i}" for i in range(classes))
    return Layout(dataset, root, classes, ignore, offset, tuple(names))


def folder_ignore(ignore_index: int | None, num_classes: int) -> int | None:
    """The ignored mask value of a folder layout: 255 by default, None for -1 (nothing ignored)."""
    if ignore_index is None:
        return 255
    if ignore_index == -1:
        return None
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"--ignore_index {ignore_index} is one of the {num_classes} classes (0..{num_classes - 1}); "
                         "choose a value outside them, or -1 for none")
    return ignore_index


def _voc_root(data_path: Path) -> tuple[Path, list[str]]:
    root = data_path if (data_path / "JPEGImages").is_dir() else data_path / "VOC2012"
    return root, ["JPEGImages", "ImageSets/Segmentation"]


def _ade_root(data_path: Path) -> tuple[Path, list[str]]:
    root = data_path if (data_path / "annotations").is_dir() else data_path / "ADEChallengeData2016"
    return root, ["images", "annotations"]


def _folder_root(data_path: Path) -> tuple[Path, list[str]]:
    return data_path, ["images", "masks"]


def _layout_help(dataset: str) -> str:
    return {"voc": "Give the VOCdevkit folder (holding VOC2012/) or VOC2012/ itself.",
            "ade20k": "Give the folder holding ADEChallengeData2016/, or that folder itself.",
            "folder": "Give a folder with images/<split>/ and masks/<split>/ (matching file stems)."}[dataset]


def read_class_names(root: Path) -> tuple[str, ...]:
    """The names in ``root/class_names.txt`` (blank lines skipped), or () when there is no such file."""
    path = root / CLASS_NAMES_FILE
    if not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------
# Samples of a split.
# ----------------------------------------------------------------------------------------------
def list_samples(layout: Layout, split: str) -> list[Sample]:
    """The ``(image, mask)`` pairs of ``split``; a missing mask or a listed image that does not exist is an
    error naming the files."""
    if layout.name == "voc":
        return _voc_samples(layout.root, split)
    image_folder, mask_folder = (("images", "annotations") if layout.name == "ade20k" else ("images", "masks"))
    images_dir, masks_dir = layout.root / image_folder / split, layout.root / mask_folder / split
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            found = ", ".join(entry.name for entry in utils.scan_folder(folder.parent) if entry.is_dir())
            raise FileNotFoundError(f"split {split!r}: {folder} not found (splits there: {found or 'none'}); "
                                    "choose --train_split / --val_split among them")
    images, masks = files_by_stem(images_dir), files_by_stem(masks_dir)
    missing = [stem for stem in images if stem not in masks]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {images_dir} have no mask in {masks_dir} (expected "
                                f"{masks_dir}/<stem>.png), e.g. {', '.join(missing[:5])}")
    return [Sample(stem, images[stem], masks[stem]) for stem in images]


def _voc_samples(root: Path, split: str) -> list[Sample]:
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_path.is_file():
        found = sorted(path.stem for path in list_path.parent.glob("*.txt"))
        raise FileNotFoundError(f"split list {list_path} not found (lists there: {', '.join(found) or 'none'})")
    stems = [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]
    if not stems:
        raise ValueError(f"split list {list_path} names no image")
    images = files_by_stem(root / "JPEGImages")
    masks = {}
    for folder in ("SegmentationClassAug", "SegmentationClass"):  # SegmentationClass wins where both have a mask
        if (root / folder).is_dir():
            masks.update(files_by_stem(root / folder))
    missing = [f"{stem} ({'image' if stem not in images else 'mask'})" for stem in stems
               if stem not in images or stem not in masks]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(stems)} names in {list_path} lack an image in "
                                f"{root / 'JPEGImages'} or a mask in SegmentationClass(Aug), e.g. "
                                f"{', '.join(missing[:5])}")
    return [Sample(stem, images[stem], masks[stem]) for stem in stems]


def files_by_stem(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder``; two files with one stem are an error."""
    found: dict[str, Path] = {}
    for path in utils.list_images(folder):
        if path.stem in found:
            raise ValueError(f"{found[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}; "
                             "keep one of them")
        found[path.stem] = path
    return found


# ----------------------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------------------
def read_labels(path: Path, layout: Layout) -> np.ndarray:
    """The internal labels of a mask file, int64 ``[H, W]`` (ignored pixels = ``num_classes``).

    A value that is neither a class nor the ignored value is an error naming the file, the value and the
    class count; so is a colour (RGB) mask, whose colours would have to be mapped back to labels.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise ValueError(f"mask {path} is a {image.mode} image; masks must be indexed (palette) or "
                                 "single-channel PNGs whose values are class labels")
            values = np.array(image).astype(np.int64)
    except (OSError, SyntaxError) as error:
        raise utils.UnreadableImageError(f"cannot read mask {path}: {type(error).__name__}: {error}") from error
    labels = values - layout.label_offset
    ignored = values == layout.ignore_value if layout.ignore_value is not None else np.zeros_like(values, bool)
    invalid = ~ignored & ((labels < 0) | (labels >= layout.num_classes))
    if invalid.any():
        bad = np.unique(values[invalid])
        ignore = f"{layout.ignore_value} (ignored)" if layout.ignore_value is not None else "no ignored value"
        classes = f"{layout.label_offset}..{layout.label_offset + layout.num_classes - 1}"
        raise ValueError(f"mask {path} holds the value {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1
                         else "") + f" in {int(invalid.sum())} pixel(s); with {layout.num_classes} classes the "
                         f"{layout.name} layout allows {classes} and {ignore}. Fix the mask, or set --num_classes"
                         + (" / --ignore_index" if layout.name == "folder" else ""))
    labels[ignored] = layout.num_classes
    return labels


def resize_labels(labels: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Labels ``[H, W]`` (or the ``box`` = left, top, right, bottom part of them) resized to ``[size, size]`` by
    nearest neighbour, as PIL resizes the images (same pixel-centre convention)."""
    resized = Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.NEAREST, box=box)
    return np.asarray(resized).astype(np.int64)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header, or an error naming the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError) as error:
        raise utils.UnreadableImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


# ----------------------------------------------------------------------------------------------
# Datasets for the DataLoader: every item is (image uint8 [3, S, S], labels int64 [S, S], problem).
# ----------------------------------------------------------------------------------------------
class SegmentationSamples(torch.utils.data.Dataset):
    """Images and masks of a split resized to ``size`` square (image bilinear, mask nearest).

    With ``augment_pass`` set, each item is instead a random resized crop (area ``scale`` of the image, aspect
    3/4-4/3) and a horizontal flip with p=0.5, the same for image and mask, drawn from a generator seeded by
    ``(seed, augment_pass, index)``: every model sees the same crops. A problem with a file (unreadable image,
    mask of another size, invalid value) is returned as text, so that the main process raises it by name
    (``raise_problems``) rather than as a worker's traceback; the image and labels are then empty.
    """

    def __init__(self, samples: list[Sample], layout: Layout, size: int, augment_pass: int | None = None,
                 scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, labels_only: bool = False):
        self.samples, self.layout, self.size = samples, layout, size
        self.augment_pass, self.seed, self.labels_only = augment_pass, seed, labels_only
        self.crop = RandomResizedCropWithGeometry(size, scale=scale)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        empty = (torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        try:
            image, labels = self.load(index)
        except (ValueError, OSError) as error:
            return (*empty, str(error))
        return image, labels, ""

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        labels = read_labels(sample.mask, self.layout)
        width, height = image_size(sample.image)
        if (height, width) != labels.shape:
            raise ValueError(f"image {sample.image} is {width}x{height} but its mask {sample.mask} is "
                             f"{labels.shape[1]}x{labels.shape[0]}; they must have one size")
        box, flip = self.draw(index, height, width)
        labels = resize_labels(labels, self.size, box)
        if self.labels_only:
            return torch.zeros(0, dtype=torch.uint8), torch.from_numpy(np.ascontiguousarray(labels))
        image = utils.read_rgb_image(sample.image).resize((self.size, self.size), Image.BILINEAR, box=box)
        pixels = np.array(image)  # a writable copy: torch refuses to wrap PIL's read-only buffer
        if flip:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous(),
                torch.from_numpy(np.ascontiguousarray(labels)))

    def draw(self, index: int, height: int, width: int) -> tuple[tuple[int, int, int, int] | None, bool]:
        """The crop box (left, top, right, bottom; None: the whole image) and the flip of item ``index``."""
        if self.augment_pass is None:
            return None, False
        with utils.seeded_cpu_rng(utils.derived_seed(self.seed, self.augment_pass, index)):
            top, left, box_height, box_width = self.crop.draw_box(height, width)
            flip = torch.rand(1).item() < 0.5
        return (left, top, left + box_width, top + box_height), flip


def raise_problems(problems: list[str]) -> None:
    """Raise the first problem a ``SegmentationSamples`` batch reported (with how many there were)."""
    found = [problem for problem in problems if problem]
    if found:
        more = f" ({len(found) - 1} more file(s) in this batch have problems)" if len(found) > 1 else ""
        raise ValueError(found[0] + more)


def collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Stack a batch of ``SegmentationSamples`` items. A batch with a problem carries no tensors, only the
    problems: collation runs in the worker, so they are raised by the main process (``raise_problems``)."""
    images, labels, problems = zip(*batch)
    if any(problems):
        return None, None, list(problems)
    return torch.stack(images), torch.stack(labels), list(problems)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The dataset arguments of ``eval_segmentation.py``."""
    parser.add_argument("--data_path", default="", type=str,
                        help="The folder holding the dataset folder (VOCdevkit for voc, the folder holding "
                             "ADEChallengeData2016 for ade20k), or the dataset folder itself.")
    parser.add_argument("--dataset", default="voc", choices=LAYOUTS,
                        help="Layout: voc (VOC2012/JPEGImages, SegmentationClass[Aug], "
                             "ImageSets/Segmentation/<split>.txt; 21 classes, 255 ignored), ade20k "
                             "(ADEChallengeData2016/images|annotations/<split>; 150 classes, 0 ignored), folder "
                             "(images/<split>/ and masks/<split>/, matching stems; --num_classes, --ignore_index).")
    parser.add_argument("--train_split", default=None, type=str,
                        help="Split the probe and the memory bank learn from (default: train for voc and folder, "
                             "training for ade20k; trainaug for VOC with SBD's masks).")
    parser.add_argument("--val_split", default=None, type=str,
                        help="Split reported on (default: val for voc and folder, validation for ade20k).")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="Number of classes (default: the layout's, or the lines of class_names.txt in the "
                             "dataset folder; required for folder without one).")
    parser.add_argument("--ignore_index", default=None, type=int,
                        help="With --dataset folder: the mask value that is ignored (default 255; -1: none).")
