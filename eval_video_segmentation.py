"""DAVIS-2017 semi-supervised video object segmentation by label propagation on frozen patch features.

    python eval_video_segmentation.py --pretrained_weights out/checkpoint.pth --arch vit_small --patch_size 16 \\
        --data_path /path/to/DAVIS --output_dir davis_out
    python eval_video_segmentation.py --random_init --data_path /path/to/DAVIS --videos bike-packing blackswan

DINO's protocol (its ``eval_video_segmentation.py``): the first frame's mask is given; every later frame
takes its labels from the first frame and the ``--n_last_frames`` previous frames. Each frame is resized
(shorter side ``--frame_size``, longer side floored to a multiple of 64) and normalised; its features are
the last block's patch tokens, L2-normalised. A target patch's affinity to a source patch is
``exp(cosine / --temperature)``, zero outside a ``(2 r + 1)^2`` window of patches around it
(``--size_mask_neighborhood`` r); only its ``--topk`` largest affinities over all context frames are kept
and normalised to sum to 1; its label is the weighted sum of the sources' labels (one-hot for the first
frame, the propagated soft labels for the others). The soft labels are upsampled bilinearly by the patch
size, each object's channel is min-max normalised, the argmax is resized (nearest) to the frame's size
and written as an indexed PNG with DAVIS's palette to ``--output_dir/<video>/<frame>.png``.

When every frame of a video has an annotation, J (region IoU) and F (boundary F-measure) are computed
per object as in davis2017-evaluation (semi-supervised: the first and the last frame are not scored)
and summarised as DAVIS does: mean, recall (share of frames above 0.5) and decay per object; J-mean
and F-mean over all objects of all videos; J&F = their mean. DAVIS's void pixels (255) count as background, as
in davis2017-evaluation's semi-supervised evaluation (``--void ignore`` leaves them out instead). Results go to
``results.json`` and a ``FINAL {json}`` line. DINO's command lines parse (its ``--bs`` is accepted and ignored).
"""
from __future__ import annotations

import argparse
import math
import re
import resource
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import utils
import vision_transformer as vits
from segmentation_data import files_by_stem

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
VOID_LABEL = 255  # DAVIS marks pixels to ignore with this value
LABEL_MODES = ("P", "L", "1")  # annotations whose pixel values are object ids
COLOUR_MASK_FIX = ("annotations must be indexed (palette) or single-channel PNGs whose values are object ids (DAVIS's "
                   "own are palette PNGs); map each colour to its id and save the ids, e.g. "
                   "Image.fromarray(ids.astype('uint8')).save(path)")
VOID_RULES = ("background", "ignore")  # how --void scores them: davis2017-evaluation's rule first
# DINO's frame normalisation: ImageNet's mean and, as in its (UVC-derived) code, 0.228 as the red std.
FRAME_MEAN, FRAME_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
SIDE_MULTIPLE = 64  # DINO floors the longer side to a multiple of this
AFFINITY_BUDGET = 2 ** 24  # affinity entries per step (64 MiB in float32): bounds memory at any frame size


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "DAVIS-2017 video object segmentation by label propagation.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--data_path", default="", type=str,
                        help="DAVIS root: JPEGImages/<resolution>/<video>/*.jpg, Annotations/<resolution>/<video>/"
                             "*.png (indexed PNGs; the first frame's is required, the others are used to score) and "
                             "ImageSets/2017/val.txt.")
    parser.add_argument("--resolution", default="480p", type=str,
                        help="The sub-folder of JPEGImages and Annotations to read (480p or Full-Resolution).")
    parser.add_argument("--video_list", default="", type=str,
                        help="A file naming one video per line (default: <data_path>/ImageSets/2017/val.txt).")
    parser.add_argument("--videos", default=None, nargs="+", metavar="NAME",
                        help="Segment these videos instead of a list file.")
    parser.add_argument("--output_dir", default="davis_segmentation", type=str,
                        help="Masks go to <output_dir>/<video>/<frame>.png; results to <output_dir>/results.json.")
    parser.add_argument("--output_json", default="", type=str,
                        help="Where to write the results (default <output_dir>/results.json).")
    utils.add_tensorboard_arg(parser)
    parser.add_argument("--frame_size", default=480, type=int,
                        help="Frames are resized so that the shorter side is this (a multiple of --patch_size) and "
                             "the longer side is the aspect-true length floored to a multiple of 64 (DINO's rule: "
                             "854x480 becomes 832x480).")
    parser.add_argument("--n_last_frames", default=7, type=int,
                        help="Previous frames whose propagated labels are sources, besides the first frame.")
    parser.add_argument("--size_mask_neighborhood", default=12, type=int,
                        help="Sources are limited to patches within this many rows and columns of the target "
                             "patch (a square window); 0 lifts the limit (every patch of every context frame).")
    parser.add_argument("--topk", default=5, type=int,
                        help="Each target patch keeps its k largest affinities over all context frames. A patch "
                             "with fewer candidates (a corner of the second frame, with the first frame alone as "
                             "context) keeps all of them; a note says when that happens.")
    parser.add_argument("--temperature", default=0.1, type=float,
                        help="Affinity exp(cosine / T); 0.1 in DINO's code.")
    parser.add_argument("--bound_th", default=0.008, type=float,
                        help="Boundary tolerance of F: a fraction of the frame diagonal (below 1) or pixels.")
    parser.add_argument("--void", default="background", choices=VOID_RULES,
                        help="How the annotations' void pixels (255) are scored. background (default): they count "
                             "as background for J and F, so a prediction covering them is a false positive; this "
                             "is davis2017-evaluation's semi-supervised rule and makes J&F comparable with "
                             "published figures. ignore: they are left out of J and F.")
    parser.add_argument("--bs", default=None, type=int,
                        help="DINO's batch-size flag, which its script parses but never reads; accepted and ignored: "
                             "the affinities here are computed in steps of at most 2^24 entries (64 MiB) at any "
                             "frame size, so there is nothing to lower on running out of memory.")
    utils.add_device_arg(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop early, with the argument's name, on settings that cannot work."""
    if args.bs is not None:
        print(f"note: --bs {args.bs} (DINO's flag, unused by DINO too) is ignored: the affinities are computed in "
              f"steps of at most {AFFINITY_BUDGET} entries whatever the frame size", flush=True)
    vits.validate_backbone_args(args)
    if not args.data_path or not Path(args.data_path).is_dir():
        raise FileNotFoundError(f"--data_path {args.data_path!r} is not a folder: give the DAVIS root (the folder "
                                "holding JPEGImages, Annotations and ImageSets)")
    if args.videos and args.video_list:
        raise ValueError("give either --videos or --video_list, not both")
    if args.frame_size < args.patch_size or args.frame_size % args.patch_size:
        raise ValueError(f"--frame_size {args.frame_size} must be a positive multiple of --patch_size "
                         f"{args.patch_size}")
    for name in ("topk", "temperature", "bound_th"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("n_last_frames", "size_mask_neighborhood"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be 0 or more, got {getattr(args, name)}")


# ----------------------------------------------------------------------------------------------
# DAVIS files.
# ----------------------------------------------------------------------------------------------
def read_video_names(args: argparse.Namespace) -> list[str]:
    """``--videos``, or the names in ``--video_list`` (default ``ImageSets/2017/val.txt``), blank lines skipped.
    A name given twice is an error: both runs would write the same masks and be scored twice."""
    if args.videos:
        names = list(args.videos)
    else:
        path = Path(args.video_list) if args.video_list else Path(args.data_path) / "ImageSets" / "2017" / "val.txt"
        if not path.is_file():
            raise FileNotFoundError(f"video list {path} not found: give --video_list FILE or --videos NAME ...")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"video list {path} names no video")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"the videos {', '.join(repeated)} are named more than once; name each video once")
    return names


@dataclass
class Video:
    """A video's frames in order, their annotations (``annotations[i]`` is None where frame i has none), frame
    size ``(H, W)`` and the ids of the objects of its first mask."""

    name: str
    frames: list[Path]
    annotations: list[Path | None]
    size: tuple[int, int]
    ids: list[int]


def find_videos(args: argparse.Namespace) -> list[Video]:
    """Every video to segment, each checked by ``find_video`` before any work; the problems of all of them
    are raised together, so that one rerun after fixing them is enough."""
    videos, problems = [], []
    for name in read_video_names(args):
        try:
            videos.append(find_video(args.data_path, args.resolution, name))
        except (ValueError, OSError) as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ValueError(f"{len(problems)} of {len(videos) + len(problems)} videos cannot be segmented (nothing was "
                         "computed): " + "; ".join(str(problem) for problem in problems))
    return videos


def find_video(data_path: str | Path, resolution: str, name: str) -> Video:
    """The frames of ``JPEGImages/<resolution>/<name>`` and their annotations, checked before any work.

    Frames are ordered by the numbers in their names (``2.jpg`` before ``10.jpg``, as ``00002.jpg`` before
    ``00010.jpg``). Errors name the file: a missing or empty folder, two frames of one stem, an annotation that
    is not ``<frame stem>.png``, a missing first mask, a frame or annotation of another size than the first
    frame, a colour annotation, a first mask without objects.
    """
    frame_folder = Path(data_path) / "JPEGImages" / resolution / name
    if not frame_folder.is_dir():
        raise FileNotFoundError(f"video {name}: frames folder {frame_folder} not found")
    frames = sorted(files_by_stem(frame_folder).values(), key=natural_key)
    if not frames:
        raise ValueError(f"video {name}: no frames in {frame_folder}")
    annotation_folder = Path(data_path) / "Annotations" / resolution / name
    annotations = find_annotations(name, frames, annotation_folder)
    if annotations[0] is None:
        raise FileNotFoundError(f"video {name}: the first frame's mask {annotation_folder / (frames[0].stem + '.png')} "
                                "is missing; semi-supervised segmentation starts from it")
    size = check_headers(name, frames, [path for path in annotations if path is not None])
    return Video(name, frames, annotations, size, first_object_ids(name, annotations[0]))


def natural_key(path: Path) -> tuple[list, str]:
    """Sort key ordering the numbers in a file name by value (``frame2`` before ``frame10``), then by name."""
    parts = re.split(r"(\d+)", path.name)  # text at even positions, digit runs at odd ones
    return [int(part) if position % 2 else part for position, part in enumerate(parts)], path.name


def find_annotations(name: str, frames: list[Path], folder: Path) -> list[Path | None]:
    """``folder/<frame stem>.png`` for each frame, None where there is none. Any other image file in ``folder``
    is an error: it would be silently left out (masks named unlike their frames, or not PNGs)."""
    expected = {f"{frame.stem}.png" for frame in frames}
    strays = [path.name for path in utils.list_images(folder) if path.name not in expected] if folder.is_dir() else []
    if strays:
        more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
        raise ValueError(f"video {name}: {len(strays)} file(s) in {folder} match no frame ({', '.join(strays[:3])}"
                         f"{more}); an annotation is named after its frame, as a PNG ({frames[0].name} -> "
                         f"{frames[0].stem}.png): rename them, or move them away")
    return [folder / f"{frame.stem}.png" if (folder / f"{frame.stem}.png").is_file() else None for frame in frames]


def check_headers(name: str, frames: list[Path], annotations: list[Path]) -> tuple[int, int]:
    """The first frame's size ``(H, W)``, after checking from the files' headers that every frame and
    annotation has it and that every annotation holds ids (indexed or single-channel, not colour)."""
    size, _ = image_header(frames[0])
    colour = []
    for path in frames[1:] + annotations:
        (height, width), mode = image_header(path)
        if (height, width) != size:
            kind = "frame" if path.parent == frames[0].parent else "annotation"
            raise ValueError(f"video {name}: {kind} {path.name} is {width}x{height} but the first frame is "
                             f"{size[1]}x{size[0]}; all frames and masks must share one size")
        if path in annotations and mode not in LABEL_MODES:
            colour.append(f"{path.name} ({mode})")
    if colour:
        more = f" and {len(colour) - 3} more" if len(colour) > 3 else ""
        raise ValueError(f"video {name}: {len(colour)} annotation(s) in {annotations[0].parent} are colour images "
                         f"({', '.join(colour[:3])}{more}); {COLOUR_MASK_FIX}")
    return size


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """``((H, W), mode)`` of an image file, from its header."""
    try:
        with Image.open(path) as image:
            return (image.height, image.width), image.mode
    except Exception as error:  # PIL raises many kinds for files that are not images
        raise utils.UnreadableImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def read_label_map(path: Path) -> tuple[np.ndarray, list[int] | None]:
    """The object ids of an annotation, uint8 ``[H, W]``, and its palette (flat RGB list) if it has one.

    Indexed (palette) PNGs give their indices, single-channel PNGs their values; colour PNGs are refused
    (their colours would have to be mapped back to ids).
    """
    with Image.open(path) as image:
        if image.mode not in LABEL_MODES:
            raise ValueError(f"{path} is a {image.mode} image; {COLOUR_MASK_FIX}")
        return np.array(image, dtype=np.uint8), image.getpalette() if image.mode == "P" else None


def first_object_ids(name: str, path: Path) -> list[int]:
    """The ids of the objects in the first mask ``path`` (none is an error); notes a palette unlike DAVIS's."""
    first_mask, palette = read_label_map(path)
    ids = object_ids(first_mask)
    if not ids:
        raise ValueError(f"video {name}: the first mask {path} holds no object (only 0 and {VOID_LABEL}, which DAVIS "
                         f"reads as background and void); object ids are its values 1..{VOID_LABEL - 1}: if "
                         f"{VOID_LABEL} marks your object, write it as 1 (e.g. mask // {VOID_LABEL})")
    mismatch = palette_mismatch(palette, ids)
    if mismatch is not None:
        print(f"note: {path} colours index {mismatch} unlike DAVIS's palette; the masks written use DAVIS's "
              "palette (only the indices matter for scoring)", flush=True)
    return ids


def object_ids(first_mask: np.ndarray) -> list[int]:
    """The objects to track: the distinct non-zero values of the first mask, except 255 (void), ascending."""
    return [int(value) for value in np.unique(first_mask) if value not in (0, VOID_LABEL)]


def palette_mismatch(palette: list[int] | None, ids: list[int]) -> int | None:
    """The first index among 0 and ``ids`` whose colour in ``palette`` differs from DAVIS's, else None."""
    if palette is None:
        return None
    reference = utils.voc_palette()  # DAVIS uses the PASCAL VOC colour map
    for index in [0, *ids]:
        colour = palette[3 * index:3 * index + 3]
        if len(colour) == 3 and list(reference[index]) != colour:
            return index
    return None


# ----------------------------------------------------------------------------------------------
# Frames and first-frame labels at patch resolution.
# ----------------------------------------------------------------------------------------------
def processing_size(height: int, width: int, frame_size: int, patch_size: int) -> tuple[int, int]:
    """DINO's frame size ``(H', W')``: the shorter side becomes ``frame_size``, the longer one the aspect-true
    length floored to a multiple of 64 (of lcm(64, patch) for a patch that does not divide 64)."""
    multiple = math.lcm(SIDE_MULTIPLE, patch_size)
    if height > width:
        size = (int(frame_size * height / width) // multiple * multiple, frame_size)
    else:
        size = (frame_size, int(frame_size * width / height) // multiple * multiple)
    if min(size) == 0:
        raise ValueError(f"a {width}x{height} frame at --frame_size {frame_size} leaves a side under {multiple} px")
    return size


def load_frame(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A frame resized to ``size`` (H', W') and normalised, ``[1, 3, H', W']``.

    Bilinear without antialiasing on 8-bit values, rounded back to 8 bits, as ``cv2.resize`` does in DINO's
    code (within one grey level: OpenCV interpolates in fixed point).
    """
    pixels = torch.from_numpy(np.asarray(utils.read_rgb_image(path)).copy()).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    mean, std = torch.tensor(FRAME_MEAN).view(1, 3, 1, 1), torch.tensor(FRAME_STD).view(1, 3, 1, 1)
    return (resized / 255 - mean) / std


def first_frame_labels(mask: np.ndarray, ids: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """One-hot labels ``[1 + len(ids), h, w]`` of the first mask at patch resolution; channel 0 is background.

    The mask is shrunk to the patch grid by PIL's nearest-neighbour resize (DINO's); void and any value not in
    ``ids`` count as background.
    """
    small = np.array(Image.fromarray(mask).resize((grid[1], grid[0]), Image.NEAREST))
    channels = np.zeros(small.shape, dtype=np.int64)
    for channel, object_id in enumerate(ids, start=1):
        channels[small == object_id] = channel
    return F.one_hot(torch.from_numpy(channels), 1 + len(ids)).permute(2, 0, 1).float()


# ----------------------------------------------------------------------------------------------
# Label propagation.
# ----------------------------------------------------------------------------------------------
@dataclass
class PropagationSettings:
    """``topk``, ``n_last_frames``, ``radius`` (``--size_mask_neighborhood``, 0: no window), ``temperature``."""

    topk: int = 5
    n_last_frames: int = 7
    radius: int = 12
    temperature: float = 0.1


def window_mask(target_rows: range, source_rows: range, width: int, radius: int) -> torch.Tensor:
    """bool ``[len(target_rows) * width, len(source_rows) * width]``: source patch within ``radius`` rows and
    columns of the target patch (both row-major over their rows); ``radius`` 0 allows every pair."""
    if radius == 0:
        return torch.ones(len(target_rows) * width, len(source_rows) * width, dtype=torch.bool)
    columns = torch.arange(width)
    near_rows = (torch.tensor(target_rows)[:, None] - torch.tensor(source_rows)[None]).abs() <= radius
    near_columns = (columns[:, None] - columns[None]).abs() <= radius
    return (near_rows[:, None, :, None] & near_columns[None, :, None, :]).reshape(
        len(target_rows) * width, len(source_rows) * width)


def band_rows(height: int, width: int, contexts: int, radius: int) -> int:
    """Target rows per step such that the step's affinities stay within ``AFFINITY_BUDGET`` entries."""
    for rows in range(height, 0, -1):
        source_rows = height if radius == 0 else min(height, rows + 2 * radius)
        if contexts * rows * width * source_rows * width <= AFFINITY_BUDGET:
            return rows
    return 1


def propagate_labels(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor,
                     grid: tuple[int, int], settings: PropagationSettings) -> torch.Tensor:
    """Labels of a target frame from its context frames (DINO's ``label_propagation``), a band of rows at a time.

    Args:
        target: L2-normalised patch features ``[N, D]`` of the target frame (``N = h * w``, row-major).
        sources: L2-normalised features ``[M, N, D]`` of the M context frames.
        source_labels: their labels ``[M, C, N]`` (one-hot or soft).
        grid: ``(h, w)``.

    Returns:
        soft labels ``[C, N]``: per target patch, the labels of its top-k sources (within the window) weighted
        by their normalised affinities ``exp(cosine / T)``. Bands of target rows keep memory bounded: each
        band sees only the source rows its window reaches.
    """
    height, width = grid
    contexts, classes = sources.shape[0], source_labels.shape[1]
    radius = settings.radius if 0 < settings.radius < max(height, width) else 0  # a window spanning all is none
    step = band_rows(height, width, contexts, radius)
    labels_by_source = source_labels.permute(0, 2, 1).reshape(contexts, height, width, classes)
    out = torch.empty(classes, height * width, dtype=source_labels.dtype, device=source_labels.device)
    for top in range(0, height, step):
        rows = range(top, min(height, top + step))
        near = range(max(0, top - radius), min(height, rows[-1] + radius + 1)) if radius else range(height)
        queries = target[top * width:(rows[-1] + 1) * width]
        keys = sources[:, near[0] * width:(near[-1] + 1) * width]
        logits = torch.einsum("td,msd->tms", queries, keys) / settings.temperature
        window = window_mask(rows, near, width, radius).to(logits.device)[:, None, :]
        logits = logits.masked_fill(~window, float("-inf")).reshape(len(queries), -1)  # [targets, M * sources]
        # exp(cosine / T) up to a factor per target, which the normalisation below cancels: shifting by the
        # target's largest logit keeps exp finite at any T; outside the window exp(-inf) = 0, as in DINO.
        affinity = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        k = min(settings.topk, affinity.shape[1])
        # Keep entries at least the k-th largest (ties included), as DINO does; masked-out zeros stay zero.
        kth = affinity.topk(k, dim=1).values[:, -1:]
        affinity = torch.where(affinity >= kth, affinity, torch.zeros_like(affinity))
        affinity = affinity / affinity.sum(dim=1, keepdim=True)
        band_labels = labels_by_source[:, near[0]:near[-1] + 1].reshape(-1, classes)
        out[:, top * width:(rows[-1] + 1) * width] = (affinity @ band_labels).T
    return out


def fewest_candidates(grid: tuple[int, int], radius: int) -> int:
    """Sources of a corner patch of the second frame, whose only context is the first frame."""
    height, width = grid
    if radius == 0:
        return height * width
    return min(height, radius + 1) * min(width, radius + 1)


def propagate_video(frames: Iterable[torch.Tensor], first_labels: torch.Tensor, feature_fn: FeatureFn,
                    settings: PropagationSettings) -> Iterator[torch.Tensor]:
    """Soft labels ``[C, h, w]`` of every frame after the first, one frame at a time.

    Args:
        frames: normalised frames ``[1, 3, H, W]``, the first one included, all of one size.
        first_labels: one-hot labels ``[C, h, w]`` of the first frame (``h = H / patch``).
        feature_fn: frames ``[1, 3, H, W]`` -> patch features ``[1, h * w, D]`` (normalised here).
        settings: see ``PropagationSettings``.

    Only the first frame's and the last ``n_last_frames`` frames' features and labels are kept.
    """
    classes, height, width = first_labels.shape
    frames = iter(frames)
    first = F.normalize(feature_fn(next(frames))[0].float(), dim=-1)
    if first.shape[0] != height * width:
        raise ValueError(f"the feature function gave {first.shape[0]} patch features for a {height}x{width} "
                         "label grid")
    first_flat = first_labels.reshape(classes, -1).to(first.device)
    recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames or None)
    for frame in frames:
        target = F.normalize(feature_fn(frame)[0].float(), dim=-1)
        sources = torch.stack([first] + [features for features, _ in recent])
        source_labels = torch.stack([first_flat] + [labels for _, labels in recent])
        labels = propagate_labels(target, sources, source_labels, (height, width), settings)
        if settings.n_last_frames:
            recent.append((target, labels))
        yield labels.reshape(classes, height, width)


def labels_to_mask(soft_labels: torch.Tensor, patch_size: int, size: tuple[int, int], ids: list[int]) -> np.ndarray:
    """Soft labels ``[C, h, w]`` -> object ids uint8 ``[H, W]`` at the frame's original ``size``.

    Upsampled bilinearly by the patch size, each channel min-max normalised (DINO's ``norm_mask``), argmax
    (channel c > 0 is object ``ids[c - 1]``), then resized to ``size`` with PIL's nearest neighbour.
    """
    classes, height, width = soft_labels.shape
    upsampled = F.interpolate(soft_labels[None].float(), size=(height * patch_size, width * patch_size),
                              mode="bilinear", align_corners=False)[0]
    channels = normalise_channels(upsampled).argmax(dim=0).cpu().numpy()
    lookup = np.array([0, *ids], dtype=np.uint8)
    small = Image.fromarray(lookup[channels])
    return np.array(small.resize((size[1], size[0]), Image.NEAREST))


def normalise_channels(labels: torch.Tensor) -> torch.Tensor:
    """Each channel of ``[C, H, W]`` with a positive maximum shifted and scaled to [0, 1]; channels that are all
    zero stay zero. A channel constant up to rounding (spread below 1e-6 of its maximum) becomes 1, where DINO
    would divide 0 by 0 or stretch rounding noise."""
    low = labels.amin(dim=(1, 2), keepdim=True)
    high = labels.amax(dim=(1, 2), keepdim=True)
    spread = high - low
    varies = spread > 1e-6 * high
    scaled = torch.where(varies, (labels - low) / torch.where(varies, spread, torch.ones_like(spread)),
                         torch.ones_like(labels))
    return torch.where(high > 0, scaled, labels)


# ----------------------------------------------------------------------------------------------
# J and F (davis2017-evaluation's definitions).
# ----------------------------------------------------------------------------------------------
def region_similarity(truth: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two bool masks ``[H, W]``, void pixels left out; 1 when both are empty."""
    keep = np.ones_like(truth, dtype=bool) if void is None else ~void
    union = np.sum((truth | prediction) & keep)
    return 1.0 if union == 0 else float(np.sum(truth & prediction & keep) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS's ``seg2bmap``: bool ``[H, W]`` -> its one-pixel boundary, bool ``[H, W]``.

    A pixel is on the boundary where it differs from its right, lower or lower-right neighbour (the boundary
    lies half a pixel towards the origin); on the last row only the right neighbour counts, on the last column
    only the lower one, and the bottom-right pixel never is.
    """
    right, below, diagonal = (np.zeros_like(mask) for _ in range(3))
    right[:, :-1], below[:-1, :], diagonal[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ diagonal)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """bool ``[2 r + 1, 2 r + 1]``: offsets (dy, dx) with dy^2 + dx^2 <= r^2 (skimage's ``disk``)."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool ``[H, W]`` dilated by ``disk(radius)`` (pixels beyond the border count as off)."""
    kernel = torch.from_numpy(disk(radius)).float()[None, None]
    image = torch.from_numpy(mask).float()[None, None]
    return (F.conv2d(image, kernel, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f_measure(truth: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None,
                       bound_th: float = 0.008) -> float:
    """F: the F-measure of boundary precision and recall, matching within ``bound_th`` of the diagonal (or
    ``bound_th`` pixels when at least 1), boundaries by ``boundary_map`` and dilated with a disk
    (davis2017-evaluation's ``f_measure``). bool masks ``[H, W]``."""
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape)))
    keep = np.ones_like(truth, dtype=bool) if void is None else ~void
    predicted_boundary, true_boundary = boundary_map(prediction & keep), boundary_map(truth & keep)
    n_predicted, n_true = int(predicted_boundary.sum()), int(true_boundary.sum())
    if n_predicted == 0 or n_true == 0:  # DAVIS's conventions for empty boundaries
        precision, recall = (1.0 if n_predicted == 0 else 0.0), (1.0 if n_true == 0 else 0.0)
    else:
        precision = float(np.sum(predicted_boundary & dilate(true_boundary, radius))) / n_predicted
        recall = float(np.sum(true_boundary & dilate(predicted_boundary, radius))) / n_true
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(per_frame: list[float]) -> dict[str, float]:
    """DAVIS's ``db_statistics``: mean, recall (share of frames above 0.5) and decay (mean of the first quarter
    of the frames minus mean of the last, over four overlapping bins)."""
    values = np.asarray(per_frame, dtype=np.float64)
    bounds = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[bounds[i]:bounds[i + 1] + 1] for i in range(4)]
    return {"mean": float(values.mean()), "recall": float((values > 0.5).mean()),
            "decay": float(bins[0].mean() - bins[3].mean())}


def score_frame(truth: np.ndarray, prediction: np.ndarray, ids: list[int], bound_th: float,
                void_rule: str) -> dict[int, tuple]:
    """``{id: (J, F)}`` of one frame; uint8 id maps ``[H, W]``. Void (255) in ``truth`` counts as background
    under ``void_rule`` "background" (davis2017-evaluation's rule) and is left out of J and F under "ignore"."""
    if void_rule not in VOID_RULES:
        raise ValueError(f"void_rule must be one of {VOID_RULES}, got {void_rule!r}")
    void = truth == VOID_LABEL if void_rule == "ignore" else None
    return {object_id: (region_similarity(truth == object_id, prediction == object_id, void),
                        boundary_f_measure(truth == object_id, prediction == object_id, void, bound_th))
            for object_id in ids}


# ----------------------------------------------------------------------------------------------
# One video.
# ----------------------------------------------------------------------------------------------
def frame_tensors(video: Video, size: tuple[int, int]) -> Iterator[torch.Tensor]:
    """The video's frames prepared by ``load_frame`` at ``size``, one at a time."""
    for path in video.frames:
        yield load_frame(path, size)


def evaluation_plan(video: Video) -> tuple[bool, str]:
    """Whether the video can be scored (every frame annotated, at least three frames) and, if not, why."""
    missing = sum(path is None for path in video.annotations)
    if missing == len(video.frames) - 1 and missing:
        return False, "only the first frame is annotated: masks are written, not scored"
    if missing:
        return False, f"{missing} of {len(video.frames)} frames have no annotation: masks are written, not scored"
    if len(video.frames) < 3:
        return False, "fewer than 3 frames: DAVIS scores neither the first nor the last frame, so none is scored"
    return True, ""


def note_topk_cap(topk: int, grid: tuple[int, int], radius: int) -> None:
    """Say when some target patches have fewer than ``topk`` candidates (they then keep all of them)."""
    fewest = fewest_candidates(grid, radius)
    if topk > fewest:
        print(f"note: --topk {topk} exceeds the {fewest} candidates of a corner patch of frame 2 ({grid[0]}x{grid[1]} "
              f"patches, window {radius}); patches with fewer candidates keep all of them", flush=True)


def segment_video(video: Video, feature_fn: FeatureFn, args: argparse.Namespace, output_dir: Path,
                  device: torch.device, frames_done: utils.Progress) -> dict:
    """Propagate the first mask through ``video``, write every mask, score when possible; returns its entry.
    Each frame written is a step of ``frames_done``."""
    first_mask, ids = read_label_map(video.annotations[0])[0], video.ids
    size = processing_size(*video.size, args.frame_size, args.patch_size)
    grid = (size[0] // args.patch_size, size[1] // args.patch_size)
    note_topk_cap(args.topk, grid, args.size_mask_neighborhood)
    scored, reason = evaluation_plan(video)
    if not scored:
        print(f"video {video.name}: {reason}", flush=True)
    folder = output_dir / video.name
    folder.mkdir(parents=True, exist_ok=True)
    utils.write_indexed_png(folder / f"{video.frames[0].stem}.png", first_mask)
    frames_done.step()
    settings = PropagationSettings(args.topk, args.n_last_frames, args.size_mask_neighborhood, args.temperature)
    frames = (frame.to(device) for frame in frame_tensors(video, size))
    per_object: dict[int, list[tuple]] = {object_id: [] for object_id in ids}
    start = time.perf_counter()
    for index, soft in enumerate(propagate_video(frames, first_frame_labels(first_mask, ids, grid), feature_fn,
                                                 settings), start=1):
        mask = labels_to_mask(soft, args.patch_size, video.size, ids)
        utils.write_indexed_png(folder / f"{video.frames[index].stem}.png", mask)
        frames_done.step()
        if scored and index < len(video.frames) - 1:  # DAVIS scores neither the first nor the last frame
            truth, _ = read_label_map(video.annotations[index])
            for object_id, values in score_frame(truth, mask, ids, args.bound_th, args.void).items():
                per_object[object_id].append(values)
    seconds_per_frame = round((time.perf_counter() - start) / len(video.frames), 4)
    entry = {"frames": len(video.frames), "objects": ids, "seconds_per_frame": seconds_per_frame, "scored": scored}
    return {**entry, **video_scores(per_object)} if scored else {**entry, "reason": reason}


def video_scores(per_object: dict[int, list[tuple]]) -> dict:
    """Per object J and F statistics, and the video's mean over its objects."""
    objects = {}
    for object_id, values in per_object.items():
        j_values, f_values = zip(*values)
        objects[str(object_id)] = {"J": statistics(list(j_values)), "F": statistics(list(f_values))}
    j_mean = float(np.mean([scores["J"]["mean"] for scores in objects.values()]))
    f_mean = float(np.mean([scores["F"]["mean"] for scores in objects.values()]))
    return {"scored_frames": len(next(iter(per_object.values()))), "per_object": objects,
            "J_mean": j_mean, "F_mean": f_mean, "J&F": (j_mean + f_mean) / 2}


def overall_scores(videos: dict[str, dict]) -> dict:
    """DAVIS's global numbers: every statistic averaged over all objects of all scored videos."""
    objects = [scores for entry in videos.values() if entry["scored"] for scores in entry["per_object"].values()]
    if not objects:
        return {"scored_videos": 0, "scored_objects": 0, "J&F": None}
    result = {"scored_videos": sum(entry["scored"] for entry in videos.values()), "scored_objects": len(objects)}
    for metric in ("J", "F"):
        for name in ("mean", "recall", "decay"):
            result[f"{metric}_{name}"] = float(np.mean([scores[metric][name] for scores in objects]))
    result["J&F"] = (result["J_mean"] + result["F_mean"]) / 2
    return result


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def run_evaluation(args: argparse.Namespace, videos: list[Video], feature_fn: FeatureFn,
                   device: torch.device) -> dict:
    """Segment (and score) ``videos`` with ``feature_fn``; returns the summary dict."""
    output_dir = Path(args.output_dir)
    entries = {}
    frames_done = utils.Progress(sum(len(video.frames) for video in videos), "Frames:")
    for number, video in enumerate(videos, start=1):
        print(f"[{number}/{len(videos)}] {video.name}: {len(video.frames)} frames", flush=True)
        entries[video.name] = segment_video(video, feature_fn, args, output_dir, device, frames_done)
        entry = entries[video.name]
        scores = f"J {entry['J_mean']:.3f}  F {entry['F_mean']:.3f}  " if entry["scored"] else ""
        print(f"    {scores}{entry['seconds_per_frame']:.2f} s/frame", flush=True)
    frames_done.finish()
    frames = sum(entry["frames"] for entry in entries.values())
    seconds = sum(entry["seconds_per_frame"] * entry["frames"] for entry in entries.values())
    return {"eval": "davis_video_segmentation", "weights": args.pretrained_weights or "random_init",
            "settings": settings_of(args), "void": args.void, **overall_scores(entries), "frames": frames,
            "seconds_per_frame": round(seconds / frames, 4), "videos": entries}


def settings_of(args: argparse.Namespace) -> dict:
    """The arguments that define the measurement, for the record."""
    names = ("data_path", "resolution", "arch", "patch_size", "checkpoint_key", "frame_size", "n_last_frames",
             "size_mask_neighborhood", "topk", "temperature", "bound_th")
    return {name: getattr(args, name) for name in names}


def check_outputs(args: argparse.Namespace, videos: list[Video]) -> Path:
    """Stop before any work when ``--output_dir``, a video's mask folder, ``--tensorboard`` or the results file cannot
    be written (a file in the way, a read-only or full disk); returns the results file's path. Creates nothing."""
    output_dir = utils.check_output_dir(args.output_dir, "--output_dir")
    for video in videos:
        utils.check_output_dir(output_dir / video.name, f"the mask folder of video {video.name}")
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    if args.output_json:
        return utils.check_output_file(args.output_json, "--output_json")
    return utils.check_output_file(output_dir / "results.json", "the results file (--output_dir)")


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; prints a summary and a ``FINAL {json}`` line, returns the summary dict."""
    validate_args(args)
    # Every video's files and every output path are checked before the model is built and any work is done.
    videos = find_videos(args)
    results_path = check_outputs(args, videos)
    device = utils.resolve_device(args.device)
    model = vits.build_frozen_backbone(args, img_size=args.frame_size).to(device)
    with utils.created_output_dir(args.output_dir):
        summary = run_evaluation(args, videos, vits.backbone_patch_features(model, 1), device)
    if summary["J&F"] is None:
        print("No video was scored (scoring needs an annotation for every frame): masks only", flush=True)
    else:
        print(f"J&F {summary['J&F']:.4f}  J-mean {summary['J_mean']:.4f}  F-mean {summary['F_mean']:.4f} over "
              f"{summary['scored_objects']} objects in {summary['scored_videos']} videos (void pixels: "
              f"{summary['void']})", flush=True)
    print(f"{summary['seconds_per_frame']:.3f} s per frame; peak memory {peak_memory_mib():.0f} MiB", flush=True)
    utils.report_final(summary, results_path, args.tensorboard)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
