"""Dense patch correspondence under known geometry: how well do frozen patch tokens find their partner?

    python eval_correspondence.py --pretrained_weights out/checkpoint.pth --data_path /path/to/val
    python eval_correspondence.py --random_init --data_path /path/to/val --output_json corr_random.json
    python eval_correspondence.py --pretrained_weights out/checkpoint.pth --data_path /path/to/val \\
        --size 32 --patch_size 4 --n_last_blocks 2 --visualize 8 corr_figures
    python eval_correspondence.py ... --query_size 32 --query_scale 0.2 0.6 --photometric false  # the earlier protocol

Per image, a reference view and a query view are cut with the training crop and flip transforms,
so their geometry is known. By default they are cut as a training step cuts a global and a local
view: the reference at ``--size`` from 0.4-1 of the image, the query at half that size
(``--query_size``) from 0.05-0.4 (``--query_scale``), and both coloured by DINO's recipe
(``--photometric``). The ground truth of a query patch is the reference patch containing its centre
(``patch_matching``'s ``centre`` rule with reference = teacher, query = student); query patches whose
centre lies outside the reference view are not evaluated. The prediction is the reference patch whose
token is most cosine-similar (the last ``--n_last_blocks`` blocks' patch tokens, each block
L2-normalised, then concatenated).

Reported over all evaluated query patches and over "textured" ones (ground-truth reference patch
with a pixel standard deviation above ``--texture_threshold``, in 0-255 units, pooled over the
channels so that a flat patch of any colour is untextured): exact accuracy,
within-one-patch accuracy (Chebyshev distance <= 1), mean error in reference patches (Euclidean).
Beside them, the same three for predictors that see no pixels: a uniformly random guess
(``chance_*``), the reference cell at the query patch's own place in its view (``same_cell_*``), and
that cell mirrored when exactly one view is flipped (``flip_aware_*``). Crops of the same image
overlap around its centre, so the last two are far above chance: a model's figure means something only
above them. The earlier protocol, equal views from 0.2-0.6 without colour (``--query_size`` = ``--size``
``--query_scale 0.2 0.6 --photometric false``), put them above every trained model's within-one-patch
accuracy. Views are drawn from a generator seeded by (``--seed``, image index), so every model and
batch size sees the same pairs.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms

import utils
import vision_transformer as vits
from vision_transformer import backbone_patch_features
from device_augment import normalize
from patch_matching import match_patches_batched
from transforms_patch import RandomHorizontalFlipWithGeometry, RandomResizedCropWithGeometry, photometric_transform

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
SCORES = ("accuracy", "within_one", "mean_error")
# Position-only predictors (no pixels seen), scored like a model: the floor a patch-level reading must clear.
FLOORS = ("same_cell", "flip_aware")
METRIC_NAMES = SCORES + tuple(f"{prefix}_{score}" for prefix in ("chance",) + FLOORS for score in SCORES)
MIN_FIGURE_SIDE = 256  # small views are upscaled (nearest) to at least this many pixels per side


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Dense patch correspondence under known geometry.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--data_path", default="", type=str,
                        help="Images to cut view pairs from: an ImageFolder (class sub-folders) or a flat folder.")
    parser.add_argument("--size", default=224, type=int,
                        help="Side of the reference view in pixels, a multiple of --patch_size; use the training "
                             "global crop size (e.g. 32 for CIFAR-sized models).")
    parser.add_argument("--query_size", default=None, type=int,
                        help="Side of the query view in pixels, a multiple of --patch_size. Default: half of --size, "
                             "rounded down to a multiple of --patch_size (at least one patch), a local view's share "
                             "as in training (16 px for 32, 112 for 224). --size gives the earlier protocol's equal "
                             "views.")
    parser.add_argument("--reference_scale", default=(0.4, 1.0), type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="Area range of the reference crop, relative to the image (like a global view).")
    parser.add_argument("--query_scale", default=(0.05, 0.4), type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="Area range of the query crop, relative to the image: DINO's local-view range by "
                             "default (0.2 0.6 before; see the module docstring).")
    parser.add_argument("--flip_p", default=0.5, type=float,
                        help="Probability of a horizontal flip, drawn for each view on its own.")
    parser.add_argument("--photometric", default=True, type=utils.bool_flag,
                        help="Apply DINO's colour recipe (jitter, grayscale, blur p=0.5, no solarization) to "
                             "both views (true/false; true by default). false measures geometry alone, as before.")
    parser.add_argument("--num_images", default=500, type=int,
                        help="Images to evaluate: a seeded random subset of this size (all when fewer exist).")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the image subset and of every view (one generator per image).")
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="Patch tokens of this many last blocks, each L2-normalised, then concatenated.")
    parser.add_argument("--texture_threshold", default=10.0, type=float,
                        help="A query patch counts as textured when the pixel standard deviation (0-255, "
                             "pooled over channels) of its ground-truth reference patch exceeds this.")
    parser.add_argument("--batch_size", default=64, type=int, help="View pairs per forward pass.")
    utils.add_device_arg(parser)
    parser.add_argument("--output_json", default="", type=str, help="Also write the results to this JSON file.")
    utils.add_tensorboard_arg(parser)
    parser.add_argument("--visualize", default=None, nargs=2, metavar=("N", "DIR"),
                        help="Draw N view pairs, evenly spaced over the evaluated images, with their predicted "
                             "matches as DIR/correspondence_*.png.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop early, with the argument's name, on settings that cannot work."""
    vits.validate_backbone_args(args)
    if args.size < args.patch_size:
        raise ValueError(f"--size {args.size} is smaller than one patch (--patch_size {args.patch_size})")
    if args.size % args.patch_size:
        raise ValueError(f"--size {args.size} is not a multiple of --patch_size {args.patch_size}")
    if args.query_size is not None and (args.query_size < args.patch_size or args.query_size % args.patch_size):
        raise ValueError(f"--query_size {args.query_size} is not a positive multiple of --patch_size {args.patch_size}")
    for name in ("reference_scale", "query_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            raise ValueError(f"--{name} {low} {high} must satisfy 0 < MIN <= MAX <= 1")
    if not 0 <= args.flip_p <= 1:
        raise ValueError(f"--flip_p must lie in [0, 1], got {args.flip_p}")
    for name in ("num_images", "n_last_blocks", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.data_path or not Path(args.data_path).is_dir():
        raise ValueError(f"--data_path {args.data_path!r} is not a folder of images")
    utils.visualization_request(args.visualize)


def query_size_of(size: int, patch_size: int, query_size: int | None) -> int:
    """``--query_size``, or its default: half of ``size`` rounded down to whole patches, at least one patch."""
    if query_size is not None:
        return query_size
    return max(patch_size, size // 2 // patch_size * patch_size)


# ----------------------------------------------------------------------------------------------
# View pairs.
# ----------------------------------------------------------------------------------------------
def select_images(data_path: str | Path, num_images: int, seed: int) -> list[tuple[int, Path]]:
    """A seeded random subset of ``num_images`` images (all if fewer), as ``(index in the listing, path)``
    in listing order; the index seeds the image's views, so they do not depend on the subset."""
    files = utils.list_image_files(data_path)
    if num_images >= len(files):
        return list(enumerate(files))
    # A random subset rather than the first images, so that it spans the classes of an ImageFolder.
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:num_images]
    return [(index, files[index]) for index in sorted(chosen.tolist())]


@dataclass
class PairBatch:
    """View pairs of several images: uint8 views ``[B, 3, S, S]`` (query ``[B, 3, Sq, Sq]``), float64
    geometries ``[B, 6]``."""

    reference: torch.Tensor
    query: torch.Tensor
    reference_geometry: torch.Tensor
    query_geometry: torch.Tensor
    names: list[str]


class ViewPairSampler:
    """Cuts the reference and query view of an image, seeded by ``(seed, index)`` alone.

    Both crops and flips are drawn before any colour operation, so the geometry (and thus the
    ground truth) is the same with and without ``photometric``.
    """

    def __init__(self, size: int, reference_scale: Sequence[float], query_scale: Sequence[float], flip_p: float,
                 photometric: bool, seed: int, query_size: int | None = None):
        self.reference_crop = RandomResizedCropWithGeometry(size, scale=tuple(reference_scale))
        self.query_crop = RandomResizedCropWithGeometry(query_size or size, scale=tuple(query_scale))
        self.flip = RandomHorizontalFlipWithGeometry(p=flip_p)
        self.finish = photometric_transform(blur_p=0.5, solarize_p=0.0) if photometric else transforms.PILToTensor()
        self.seed = seed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ViewPairSampler":
        return cls(args.size, args.reference_scale, args.query_scale, args.flip_p, args.photometric, args.seed,
                   query_size_of(args.size, args.patch_size, args.query_size))

    def __call__(self, image: Image.Image, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reference [3, S, S] uint8, reference geometry [6], query [3, Sq, Sq] uint8, query geometry [6])``."""
        with utils.seeded_cpu_rng(utils.derived_seed(self.seed, index)):
            reference, reference_geometry = self.flip(*self.reference_crop(image))
            query, query_geometry = self.flip(*self.query_crop(image))
            return (self.finish(reference), reference_geometry.to_tensor(),
                    self.finish(query), query_geometry.to_tensor())


def build_view_pairs(images: Sequence[tuple[int, Path]], sampler: ViewPairSampler) -> PairBatch:
    """Read ``(index, path)`` images and cut one view pair from each."""
    drawn = [sampler(utils.read_rgb_image(path), index) for index, path in images]
    reference, reference_geometry, query, query_geometry = (torch.stack(parts) for parts in zip(*drawn))
    names = [f"{path.parent.name}/{path.name}" for _, path in images]
    return PairBatch(reference, query, reference_geometry, query_geometry, names)


# ----------------------------------------------------------------------------------------------
# Ground truth, predictions, texture.
# ----------------------------------------------------------------------------------------------
def ground_truth_cells(reference_geometry: torch.Tensor, query_geometry: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference cell containing the centre of each query patch, or -1 outside the reference view.

    Geometries ``[B, 6]``; returns int64 ``[B, N]`` (cells row-major, ``N = P * P``).
    """
    tokens = match_patches_batched(reference_geometry, query_geometry, patch_size, mode="centre")[:, 1:]
    return torch.where(tokens > 0, tokens - 1, -1)


def position_floor_cells(reference_geometry: torch.Tensor, query_geometry: torch.Tensor, reference_grid: int,
                         query_grid: int, flip_aware: bool) -> torch.Tensor:
    """What a predictor that sees no pixels answers: the reference cell at the query patch's own place in its view.

    A query cell ``(r, c)`` of a ``Q x Q`` grid maps to the reference cell holding the same relative point,
    ``floor((r + 0.5) * R / Q)`` (the same cell when both grids are equal). ``flip_aware`` also knows the two
    flips (not the crops) and mirrors the column when exactly one view is flipped. Geometries ``[B, 6]``;
    returns int64 ``[B, Q * Q]`` reference cells, row-major.
    """
    cells = torch.arange(query_grid)
    same_place = torch.div((2 * cells + 1) * reference_grid, 2 * query_grid, rounding_mode="floor")
    rows = same_place.view(1, query_grid, 1).expand(len(query_geometry), query_grid, query_grid)
    cols = same_place.view(1, 1, query_grid).expand_as(rows)
    if flip_aware:
        mirrored = (reference_geometry[:, 4] > 0) != (query_geometry[:, 4] > 0)
        cols = torch.where(mirrored.view(-1, 1, 1), reference_grid - 1 - cols, cols)
    return (rows * reference_grid + cols).flatten(1)


def correspondence_predictions(features_reference: torch.Tensor, features_query: torch.Tensor) -> torch.Tensor:
    """For each query token, the most cosine-similar reference token.

    Args:
        features_reference: ``[B, N_ref, D]`` patch tokens of the reference views.
        features_query: ``[B, N_query, D]`` patch tokens of the query views.

    Returns:
        int64 ``[B, N_query]``: reference cell per query patch.
    """
    similarity = F.normalize(features_query, dim=-1) @ F.normalize(features_reference, dim=-1).transpose(1, 2)
    return similarity.argmax(dim=-1)


def predict_cells(reference: torch.Tensor, query: torch.Tensor, feature_fn: FeatureFn, patch_size: int,
                  device: torch.device) -> torch.Tensor:
    """uint8 views ``[B, 3, S, S]`` and ``[B, 3, Sq, Sq]`` -> predicted reference cell per query patch, int64
    ``[B, Nq]`` on the CPU. Views of one size go through the model in one pass."""
    if reference.shape == query.shape:
        reference_tokens, query_tokens = view_tokens(torch.cat([reference, query]), feature_fn, patch_size,
                                                     device).split(len(reference))
    else:
        reference_tokens, query_tokens = (view_tokens(views, feature_fn, patch_size, device)
                                          for views in (reference, query))
    return correspondence_predictions(reference_tokens, query_tokens).cpu()


def view_tokens(views: torch.Tensor, feature_fn: FeatureFn, patch_size: int, device: torch.device) -> torch.Tensor:
    """uint8 views ``[B, 3, S, S]`` -> float patch tokens ``[B, N, D]``, their shape checked."""
    tokens = feature_fn(normalize(views.to(device)))
    expected = (views.shape[-1] // patch_size) ** 2
    if tokens.ndim != 3 or tokens.shape[:2] != (len(views), expected):
        raise ValueError(f"the feature function must return patch tokens [{len(views)}, {expected}, D] "
                         f"(no CLS token), got {tuple(tokens.shape)}")
    return tokens.float()


def patch_pixel_std(views: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel standard deviation of each patch, in 0-255 units, pooled over the three channels.

    Each channel's spread is taken around its own mean (the root of the mean per-channel variance),
    so a flat patch of any colour scores 0: a clear blue sky is not texture. uint8 views
    ``[B, 3, S, S]`` -> float64 ``[B, N]``, patches row-major.
    """
    batch, channels, size, _ = views.shape
    grid = size // patch_size
    patches = views.double().reshape(batch, channels, grid, patch_size, grid, patch_size)
    pixels = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels, -1)
    return pixels.var(dim=-1, correction=0).mean(dim=-1).sqrt()


@torch.no_grad()
def evaluate_batch(pairs: PairBatch, feature_fn: FeatureFn, patch_size: int, texture_threshold: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(predicted, truth, textured)``, each ``[B, N]``: predicted and true reference cells (truth -1 where
    the query patch is not evaluated), and whether the true reference patch is textured (False there)."""
    truth = ground_truth_cells(pairs.reference_geometry, pairs.query_geometry, patch_size)
    predicted = predict_cells(pairs.reference, pairs.query, feature_fn, patch_size, device)
    reference_std = patch_pixel_std(pairs.reference, patch_size)
    textured = (reference_std.gather(1, truth.clamp(min=0)) > texture_threshold) & (truth >= 0)
    return predicted, truth, textured


def position_floors(pairs: PairBatch, patch_size: int) -> dict[str, torch.Tensor]:
    """``{floor: reference cells [B, Nq]}`` of the position-only predictors (``FLOORS``) on ``pairs``."""
    grids = (pairs.reference.shape[-1] // patch_size, pairs.query.shape[-1] // patch_size)
    return {name: position_floor_cells(pairs.reference_geometry, pairs.query_geometry, *grids,
                                       flip_aware=name == "flip_aware") for name in FLOORS}


def evaluate_pairs(images: Sequence[tuple[int, Path]], sampler: ViewPairSampler, feature_fn: FeatureFn,
                   patch_size: int, texture_threshold: float, batch_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``evaluate_batch`` over all ``images`` in batches; returns ``(predicted, truth, textured, floors)``, each
    ``[M, Nq]`` (``floors``: ``{floor: cells}``, see ``position_floors``)."""
    outcomes, floors = [], []
    starts = range(0, len(images), batch_size)
    for start in utils.progress(starts, "Correspondence:"):
        pairs = build_view_pairs(images[start:start + batch_size], sampler)
        outcomes.append(evaluate_batch(pairs, feature_fn, patch_size, texture_threshold, device))
        floors.append(position_floors(pairs, patch_size))
    predicted, truth, textured = (torch.cat(parts) for parts in zip(*outcomes))
    return predicted, truth, textured, {name: torch.cat([part[name] for part in floors]) for name in FLOORS}


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------
def cell_distances(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean (float64) and Chebyshev (int64) distances ``[P*P, P*P]`` between the cells of a ``P x P`` grid."""
    cells = torch.arange(grid * grid)
    rows, cols = cells // grid, cells % grid
    row_gap, col_gap = rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]
    euclidean = torch.sqrt((row_gap ** 2 + col_gap ** 2).double())
    return euclidean, torch.maximum(row_gap.abs(), col_gap.abs())


def correspondence_metrics(predicted: torch.Tensor, truth: torch.Tensor, textured: torch.Tensor, grid: int,
                           floors: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Metrics over the evaluated query patches (``truth >= 0``): ``{"all": {...}, "textured": {...}}``.

    Args:
        predicted, truth: reference cells, int64, any matching shape (``[M, N]`` in the script).
        textured: bool, same shape; the textured block uses the evaluated patches where it is true.
        grid: reference patches per side ``P``.
        floors: ``{floor: cells}`` of the position-only predictors, same shape, scored as ``<floor>_<score>``.
    """
    evaluated = truth >= 0
    blocks = {"all": evaluated, "textured": evaluated & textured}
    return {name: block_metrics(predicted[kept], truth[kept], grid,
                                {floor: cells[kept] for floor, cells in (floors or {}).items()})
            for name, kept in blocks.items()}


def block_metrics(predicted: torch.Tensor, truth: torch.Tensor, grid: int,
                  floors: dict[str, torch.Tensor] | None = None) -> dict:
    """Percent exact and within one patch and mean error in patches of flat ``[M]`` cells, with the same for
    a uniform guess (``chance_*``) and for each of ``floors`` (``{name: [M] cells}``: ``<name>_*``); ``pairs``
    0 and None elsewhere when ``M`` is 0."""
    names = SCORES + tuple(f"{prefix}_{score}" for prefix in ("chance", *(floors or {})) for score in SCORES)
    if truth.numel() == 0:
        return {"pairs": 0, **{name: None for name in names}}
    euclidean, chebyshev = cell_distances(grid)
    # A uniform guess over the grid, per true cell ([P*P], averaged over all guesses), then over the patches.
    chance_within_one, chance_error = (chebyshev <= 1).double().mean(dim=1), euclidean.mean(dim=1)
    values = {**scores_of(predicted, truth, euclidean, chebyshev),
              "chance_accuracy": torch.tensor(100.0 / grid ** 2),
              "chance_within_one": 100.0 * chance_within_one[truth].mean(),
              "chance_mean_error": chance_error[truth].mean()}
    for floor, cells in (floors or {}).items():
        values.update({f"{floor}_{score}": value for score, value in
                       scores_of(cells, truth, euclidean, chebyshev).items()})
    return {"pairs": int(truth.numel()), **{name: float(values[name]) for name in names}}


def scores_of(predicted: torch.Tensor, truth: torch.Tensor, euclidean: torch.Tensor,
              chebyshev: torch.Tensor) -> dict[str, torch.Tensor]:
    """``SCORES`` of predicted against true cells ``[M]``, given the grid's cell distances ``[P*P, P*P]``."""
    return {"accuracy": 100.0 * (predicted == truth).double().mean(),
            "within_one": 100.0 * (chebyshev[truth, predicted] <= 1).double().mean(),
            "mean_error": euclidean[truth, predicted].mean()}


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------
GRID_COLOUR, RIGHT_COLOUR, WRONG_COLOUR = (225, 225, 225), (0, 200, 0), (230, 0, 0)


def render_correspondence(reference: torch.Tensor, query: torch.Tensor, predicted: torch.Tensor,
                          truth: torch.Tensor, patch_size: int, title: str) -> Image.Image:
    """Reference view (left) and query view (right), upscaled alike, with patch grids and, for every evaluated
    query patch, a line to its predicted reference patch: green when exact, red otherwise.

    Views uint8 ``[3, S, S]`` and ``[3, Sq, Sq]``; ``predicted`` and ``truth`` ``[Nq]`` reference cells (truth -1:
    not evaluated).
    """
    zoom = max(1, math.ceil(MIN_FIGURE_SIDE / reference.shape[-1]))
    sides = [view.shape[-1] * zoom for view in (reference, query)]
    cell, margin, gap, header = patch_size * zoom, 12, 32, 28
    canvas = Image.new("RGB", (2 * margin + sum(sides) + gap, header + max(sides) + margin), "white")
    origins = ((margin, header), (margin + sides[0] + gap, header))
    draw = ImageDraw.Draw(canvas)
    for view, side, (x0, y0) in zip((reference, query), sides, origins):
        canvas.paste(Image.fromarray(view.permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST), (x0, y0))
        for i in range(side // cell + 1):
            draw.line([(x0 + i * cell, y0), (x0 + i * cell, y0 + side)], fill=GRID_COLOUR)
            draw.line([(x0, y0 + i * cell), (x0 + side, y0 + i * cell)], fill=GRID_COLOUR)
    for query_cell in torch.nonzero(truth >= 0).flatten().tolist():
        colour = RIGHT_COLOUR if predicted[query_cell] == truth[query_cell] else WRONG_COLOUR
        start = _cell_centre(query_cell, sides[1] // cell, cell, origins[1])
        end = _cell_centre(int(predicted[query_cell]), sides[0] // cell, cell, origins[0])
        draw.line([start, end], fill=colour, width=1)
        draw.ellipse([start[0] - 2, start[1] - 2, start[0] + 2, start[1] + 2], fill=colour)
    draw.text((margin, 7), title, fill="black", font=ImageFont.load_default(size=14))
    return canvas


def _cell_centre(cell_index: int, grid: int, cell: int, origin: tuple[int, int]) -> tuple[float, float]:
    row, col = divmod(cell_index, grid)
    return origin[0] + (col + 0.5) * cell, origin[1] + (row + 0.5) * cell


def save_visualizations(images: Sequence[tuple[int, Path]], sampler: ViewPairSampler, predicted: torch.Tensor,
                        truth: torch.Tensor, patch_size: int, folder: Path) -> list[Path]:
    """Figures of the view pairs of ``images`` as ``folder/correspondence_000.png`` ...

    The views are cut again from the same seeds (the same pairs as evaluated); row i of ``predicted``
    and ``truth`` (``[len(images), N]``, from ``evaluate_pairs``) belongs to ``images[i]``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pairs = build_view_pairs(images, sampler)
    paths = []
    for i, name in enumerate(pairs.names):
        evaluated = truth[i] >= 0
        correct = int((predicted[i] == truth[i])[evaluated].sum())
        accuracy = f"{100.0 * correct / int(evaluated.sum()):.0f}%" if evaluated.any() else "n/a"
        title = f"{name}: {accuracy} exact ({correct}/{int(evaluated.sum())} patches)"
        figure = render_correspondence(pairs.reference[i], pairs.query[i], predicted[i], truth[i], patch_size, title)
        paths.append(folder / f"correspondence_{i:03}.png")
        utils.save_image(figure, paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def run_evaluation(args: argparse.Namespace, images: Sequence[tuple[int, Path]], feature_fn: FeatureFn,
                   device: torch.device) -> dict:
    """Evaluate ``feature_fn`` on view pairs of ``images`` (from ``select_images``); returns the summary dict."""
    sampler = ViewPairSampler.from_args(args)
    predicted, truth, textured, floors = evaluate_pairs(images, sampler, feature_fn, args.patch_size,
                                                        args.texture_threshold, args.batch_size, device)
    request = utils.visualization_request(args.visualize)
    if request:
        count, folder = request
        # Evenly spaced pairs: the images are in listing order, so the first few would share a class.
        chosen = torch.linspace(0, len(images) - 1, min(count, len(images))).round().long().unique()
        save_visualizations([images[i] for i in chosen], sampler, predicted[chosen], truth[chosen], args.patch_size,
                            folder)
    metrics = correspondence_metrics(predicted, truth, textured, args.size // args.patch_size, floors)
    return {"eval": "correspondence", "weights": args.pretrained_weights or "random_init",
            "settings": settings_of(args), "images": len(images), **metrics}


def settings_of(args: argparse.Namespace) -> dict:
    """The arguments that define the measurement, for the record."""
    names = ("data_path", "arch", "patch_size", "checkpoint_key", "size", "reference_scale", "query_scale", "flip_p",
             "photometric", "num_images", "seed", "n_last_blocks", "texture_threshold")
    settings = {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(args, name)) for name in names)}
    return {**settings, "query_size": query_size_of(args.size, args.patch_size, args.query_size)}


def check_outputs(args: argparse.Namespace) -> None:
    """Stop before any work when ``--output_json``, ``--tensorboard`` or the folder of ``--visualize`` cannot be
    written: a file in the way, a read-only or full disk. Creates nothing."""
    if args.output_json:
        utils.check_output_file(args.output_json, "--output_json")
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    request = utils.visualization_request(args.visualize)
    if request:
        utils.check_output_dir(request[1], "the folder of --visualize N DIR")


def format_summary(summary: dict) -> str:
    """A readable table of the metrics, their chance levels and the position-only floors."""
    settings = summary["settings"]
    sizes = f"{settings['size']} px" if settings.get("query_size") in (None, settings["size"]) else \
        f"{settings['size']} px reference, {settings['query_size']} px query"
    lines = [f"Correspondence of {summary['weights']} on {summary['images']} images "
             f"({sizes} views, patch {settings['patch_size']}):",
             f"  {'':<18}{'pairs':>9}{'exact %':>10}{'within 1 %':>12}{'error (patches)':>17}"]
    rows = (("  chance", "chance_"), ("  same cell", "same_cell_"), ("  flip-aware cell", "flip_aware_"))
    for block in ("all", "textured"):
        metrics = summary[block]
        for label, pairs, prefix in ((block, metrics["pairs"], ""), *((label, "", prefix) for label, prefix in rows)):
            values = [metrics[prefix + name] for name in SCORES]
            cells = "".join(f"{'-' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(values, (10, 12, 17)))
            lines.append(f"  {label:<18}{pairs:>9}{cells}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; prints a summary and a ``FINAL {json}`` line, returns the summary dict."""
    validate_args(args)
    check_outputs(args)
    images = select_images(args.data_path, args.num_images, args.seed)
    device = utils.resolve_device(args.device)
    model = vits.build_frozen_backbone(args, img_size=args.size).to(device)
    if args.n_last_blocks > len(model.blocks):
        raise ValueError(f"--n_last_blocks {args.n_last_blocks} exceeds the model's {len(model.blocks)} blocks")
    print(f"Data: {len(images)} images from {args.data_path}")
    summary = run_evaluation(args, images, backbone_patch_features(model, args.n_last_blocks), device)
    print(format_summary(summary))
    utils.report_final(summary, args.output_json, args.tensorboard)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
