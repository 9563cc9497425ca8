"""Geometric patch matching between two augmented views (docs/method.md section 3), and its demo.

Two rules turn the geometry of a teacher view and a student view into token correspondences:

* ``upstream`` (default, the authors' rule): the crop boxes' intersection is expressed as a block
  of each view's patch grid (rounded half-to-even), blocks of flipped views are mirrored, and the
  larger block is subsampled to the smaller one axis by axis. One-to-one; coarse.
* ``centre``: every student patch whose centre lies inside the teacher view is matched to the
  teacher patch containing that centre. Error at most half a teacher patch; many-to-one.

``match_patches`` is the readable reference for one pair of views; ``match_patches_batched`` is
the vectorised version used in training. Both agree exactly (the tests check thousands of draws).
Token 0 is CLS; patch ``(r, c)`` of a ``P x P`` grid, row-major in the (already flipped) view,
is token ``1 + r * P + c``.

Run as a script it draws one global and one local view of ``test.png`` with their patch grids
and token numbers, colours matched patches alike, writes ``result.png`` and prints both lists.
"""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path
from typing import Sequence

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch
from PIL import Image, ImageDraw, ImageFont

import utils
from transforms_patch import RandomHorizontalFlipWithGeometry, RandomResizedCropWithGeometry, ViewGeometry

MATCHING_MODES = ("upstream", "centre")
GeometryLike = ViewGeometry | Sequence[float] | torch.Tensor


def grid_side(size: int, patch_size: int) -> int:
    """Patches per side ``P`` of a ``size``-pixel view; the size must be a multiple of the patch."""
    if patch_size <= 0 or size % patch_size:
        raise ValueError(f"view size {size} is not a multiple of the patch size {patch_size}; "
                         "use crop sizes that are multiples of the patch size")
    return size // patch_size


def _check_mode(mode: str) -> None:
    if mode not in MATCHING_MODES:
        raise ValueError(f"unknown matching mode {mode!r}; choose one of {MATCHING_MODES}")


# ----------------------------------------------------------------------------------------------
# Reference: one pair of views, plain Python.
# ----------------------------------------------------------------------------------------------
def match_patches(teacher_geometry: GeometryLike, student_geometry: GeometryLike, patch_size: int,
                  mode: str = "upstream") -> tuple[list[int], list[int]]:
    """Matched tokens of a teacher view and a student view, CLS pair first.

    Args:
        teacher_geometry, student_geometry: a ``ViewGeometry`` or any sequence
            ``(top, left, height, width, flipped, size)``.
        patch_size: side of a patch in pixels (divides both view sizes).
        mode: ``"upstream"`` or ``"centre"``.

    Returns:
        ``(teacher_tokens, student_tokens)``, aligned lists; pair k is
        ``(teacher_tokens[k], student_tokens[k])`` and pair 0 is ``(0, 0)``.
    """
    _check_mode(mode)
    teacher = ViewGeometry.from_sequence(teacher_geometry)
    student = ViewGeometry.from_sequence(student_geometry)
    grid_t, grid_s = grid_side(teacher.size, patch_size), grid_side(student.size, patch_size)
    if mode == "centre":
        pairs = _centre_pairs(teacher, student, grid_t, grid_s)
    else:
        pairs = _upstream_pairs(teacher, student, grid_t, grid_s)
    return [0] + [t for t, _ in pairs], [0] + [s for _, s in pairs]


def _upstream_pairs(teacher: ViewGeometry, student: ViewGeometry, grid_t: int, grid_s: int) -> list[tuple[int, int]]:
    top, bottom = max(teacher.top, student.top), min(teacher.top + teacher.height, student.top + student.height)
    left, right = max(teacher.left, student.left), min(teacher.left + teacher.width, student.left + student.width)
    if top >= bottom or left >= right:
        return []
    rows_t = _block_cells(top, bottom, teacher.top, teacher.height, grid_t, mirrored=False)
    rows_s = _block_cells(top, bottom, student.top, student.height, grid_s, mirrored=False)
    cols_t = _block_cells(left, right, teacher.left, teacher.width, grid_t, mirrored=teacher.flipped)
    cols_s = _block_cells(left, right, student.left, student.width, grid_s, mirrored=student.flipped)
    rows_t, rows_s = _resample_to_smaller(rows_t, rows_s)
    cols_t, cols_s = _resample_to_smaller(cols_t, cols_s)
    return [(1 + rt * grid_t + ct, 1 + rs * grid_s + cs)
            for rt, rs in zip(rows_t, rows_s) for ct, cs in zip(cols_t, cols_s)]


def _block_cells(start: float, end: float, view_start: float, view_extent: float, grid: int,
                 mirrored: bool) -> list[int]:
    """Grid cells (along one axis) covering ``[start, end)`` of a view, in source-image order."""
    first = round(grid * ((start - view_start) / view_extent))
    count = round(grid * ((end - start) / view_extent))
    first, last = min(max(first, 0), grid), min(max(first + count, 0), grid)
    cells = list(range(first, last))
    return [grid - 1 - cell for cell in cells] if mirrored else cells


def _resample_to_smaller(cells_t: list[int], cells_s: list[int]) -> tuple[list[int], list[int]]:
    """Subsample the longer list to the shorter one's length at ``floor(linspace(0, n-1, m))``."""
    if len(cells_t) >= len(cells_s):
        return [cells_t[i] for i in floor_linspace(len(cells_t), len(cells_s))], cells_s
    return cells_t, [cells_s[i] for i in floor_linspace(len(cells_s), len(cells_t))]


def floor_linspace(n: int, m: int) -> list[int]:
    """``floor(linspace(0, n - 1, m))`` in exact integer arithmetic: ``i * (n - 1) // (m - 1)``."""
    if m <= 1:
        return [0] * m
    return [i * (n - 1) // (m - 1) for i in range(m)]


def _centre_pairs(teacher: ViewGeometry, student: ViewGeometry, grid_t: int, grid_s: int) -> list[tuple[int, int]]:
    pairs = []
    for row in range(grid_s):
        for col in range(grid_s):
            source_col = grid_s - 1 - col if student.flipped else col
            y = student.top + (row + 0.5) * student.height / grid_s
            x = student.left + (source_col + 0.5) * student.width / grid_s
            if not (teacher.top <= y < teacher.top + teacher.height
                    and teacher.left <= x < teacher.left + teacher.width):
                continue
            row_t = min(int((y - teacher.top) / teacher.height * grid_t), grid_t - 1)
            col_t = min(int((x - teacher.left) / teacher.width * grid_t), grid_t - 1)
            col_t = grid_t - 1 - col_t if teacher.flipped else col_t
            pairs.append((1 + row_t * grid_t + col_t, 1 + row * grid_s + col))
    return pairs


# ----------------------------------------------------------------------------------------------
# Batched: many pairs of views at once, vectorised torch on any device.
# ----------------------------------------------------------------------------------------------
def match_patches_batched(teacher_geometry: torch.Tensor, student_geometry: torch.Tensor, patch_size: int,
                          mode: str = "upstream") -> torch.Tensor:
    """For every student token, the matched teacher token or -1; no loop over samples.

    Args:
        teacher_geometry: ``[B, 6]`` rows ``[top, left, height, width, flipped, size]``.
        student_geometry: ``[B, 6]``; all student views share one size.
        patch_size: side of a patch in pixels.
        mode: ``"upstream"`` or ``"centre"``.

    Returns:
        int64 ``[B, 1 + P_s * P_s]`` on the geometry's device; column 0 (CLS) is always 0.
    """
    _check_mode(mode)
    teacher, student = _as_geometry_batch(teacher_geometry), _as_geometry_batch(student_geometry)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"teacher and student batches differ: {teacher.shape[0]} vs {student.shape[0]}")
    grid_s = _uniform_grid_side(student[:, 5], patch_size, "student")
    grid_t = _uniform_grid_side(teacher[:, 5], patch_size, "teacher")
    axis_fn = _centre_axis if mode == "centre" else _upstream_axis
    patch_map = _patch_map(axis_fn, teacher, student, grid_t, grid_s)
    cls_column = torch.zeros_like(patch_map[:, :1])
    return torch.cat([cls_column, patch_map], dim=1)


def _as_geometry_batch(geometry: torch.Tensor) -> torch.Tensor:
    geometry = torch.as_tensor(geometry)
    if geometry.ndim != 2 or geometry.shape[1] != 6:
        raise ValueError(f"batched geometry must be [B, 6], got shape {tuple(geometry.shape)}")
    return geometry.to(torch.float64)


def _uniform_grid_side(sizes: torch.Tensor, patch_size: int, role: str) -> int:
    if sizes.numel() == 0:
        raise ValueError(f"empty {role} batch: matching needs at least one view")
    size = int(sizes[0])
    if not bool((sizes == size).all()):
        raise ValueError(f"all {role} views of a batch must share one size, got {sorted(set(sizes.tolist()))}")
    return grid_side(size, patch_size)


def _patch_map(axis_fn, teacher: torch.Tensor, student: torch.Tensor, grid_t: int, grid_s: int) -> torch.Tensor:
    """``[B, P_s * P_s]`` teacher token per student patch (or -1), from a rule applied to each axis.

    Rows never flip; columns carry each view's flip.
    """
    no_flip_t, no_flip_s = torch.zeros_like(teacher[:, 4]), torch.zeros_like(student[:, 4])
    row_t = axis_fn(teacher[:, 0], teacher[:, 2], student[:, 0], student[:, 2], no_flip_t, no_flip_s, grid_t, grid_s)
    col_t = axis_fn(teacher[:, 1], teacher[:, 3], student[:, 1], student[:, 3], teacher[:, 4], student[:, 4],
                    grid_t, grid_s)
    return _combine_axes(row_t, col_t, grid_t)


def _upstream_axis(start_t, extent_t, start_s, extent_s, flipped_t, flipped_s, grid_t: int,
                   grid_s: int) -> torch.Tensor:
    """Along one axis: the teacher grid cell matched to each student grid cell, or -1.

    Inputs are ``[B]`` float64; returns int64 ``[B, P_s]`` indexed by the student's grid cell
    (in the flipped view's own order when the student is flipped).
    """
    lo, hi = torch.maximum(start_t, start_s), torch.minimum(start_t + extent_t, start_s + extent_s)
    overlap = lo < hi
    first_t, count_t = _block_span(lo, hi, start_t, extent_t, grid_t)
    first_s, count_s = _block_span(lo, hi, start_s, extent_s, grid_s)
    count_t, count_s = count_t * overlap, count_s * overlap

    cells = torch.arange(grid_s, device=start_t.device).expand(len(start_t), grid_s)
    source_cells = torch.where(flipped_s[:, None] > 0, grid_s - 1 - cells, cells)
    k_s = source_cells - first_s[:, None]  # position of the cell inside the student block
    index_t, kept = _resampled_partner(k_s, count_t[:, None], count_s[:, None])
    cell_t = first_t[:, None] + index_t
    cell_t = torch.where(flipped_t[:, None] > 0, grid_t - 1 - cell_t, cell_t)
    return torch.where(kept, cell_t, torch.full_like(cell_t, -1))


def _block_span(lo, hi, view_start, view_extent, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First grid cell and cell count ``[B]`` (int64) of ``[lo, hi)``, clipped to the grid."""
    first = torch.round(grid * ((lo - view_start) / view_extent)).long()
    count = torch.round(grid * ((hi - lo) / view_extent)).long()
    first, last = first.clamp(0, grid), (first + count).clamp(0, grid)
    return first, (last - first).clamp(min=0)


def _resampled_partner(k_s: torch.Tensor, n_t: torch.Tensor, n_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index in the teacher block of student block position ``k_s``, and whether it is kept.

    When ``n_t >= n_s`` every student position is kept and its partner is
    ``k_s * (n_t - 1) // (n_s - 1)``. Otherwise student positions ``j * (n_s - 1) // (n_t - 1)``
    are kept, partnered with ``j``; the candidate ``j`` is ``ceil(k_s * (n_t - 1) / (n_s - 1))``.
    """
    inside = (k_s >= 0) & (k_s < n_s)
    k = k_s.clamp(min=0)
    partner_if_teacher_larger = k * (n_t - 1) // (n_s - 1).clamp(min=1)
    j = (k * (n_t - 1) + (n_s - 2).clamp(min=0)) // (n_s - 1).clamp(min=1)
    j_hits = j * (n_s - 1) // (n_t - 1).clamp(min=1) == k
    teacher_larger = n_t >= n_s
    partner = torch.where(teacher_larger, partner_if_teacher_larger, j)
    kept = inside & (teacher_larger | ((n_t > 0) & j_hits))
    return partner, kept


def _combine_axes(row_t: torch.Tensor, col_t: torch.Tensor, grid_t: int) -> torch.Tensor:
    """Row ``[B, P_s]`` and column ``[B, P_s]`` partners -> teacher tokens ``[B, P_s * P_s]`` (-1 if none)."""
    tokens = 1 + row_t[:, :, None] * grid_t + col_t[:, None, :]
    matched = (row_t[:, :, None] >= 0) & (col_t[:, None, :] >= 0)
    return torch.where(matched, tokens, torch.full_like(tokens, -1)).flatten(1)


def _centre_axis(start_t, extent_t, start_s, extent_s, flipped_t, flipped_s, grid_t: int, grid_s: int) -> torch.Tensor:
    """Along one axis: the teacher cell containing each student cell's centre, or -1; ``[B, P_s]``."""
    cells = torch.arange(grid_s, dtype=torch.float64, device=start_t.device).expand(len(start_t), grid_s)
    source_cells = torch.where(flipped_s[:, None] > 0, grid_s - 1 - cells, cells)
    centre = start_s[:, None] + (source_cells + 0.5) * extent_s[:, None] / grid_s
    inside = (start_t[:, None] <= centre) & (centre < (start_t + extent_t)[:, None])
    cell_t = ((centre - start_t[:, None]) / extent_t[:, None] * grid_t).floor().long().clamp(0, grid_t - 1)
    cell_t = torch.where(flipped_t[:, None] > 0, grid_t - 1 - cell_t, cell_t)
    return torch.where(inside, cell_t, torch.full_like(cell_t, -1))


def pairs_from_map(patch_map: torch.Tensor) -> tuple[list[int], list[int]]:
    """One row ``[1 + N_s]`` of ``match_patches_batched`` -> aligned (teacher, student) token lists."""
    student_tokens = torch.nonzero(patch_map >= 0).flatten()
    return patch_map[student_tokens].tolist(), student_tokens.tolist()


# ----------------------------------------------------------------------------------------------
# Demo.
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(
        __file__, "PW-Self patch matching demo: draws a global (teacher) and a local (student) view of an image "
                  "with their patch grids and token numbers, colours matched patches alike, and prints the "
                  "aligned token lists (CLS pair first).")
    parser.add_argument("--image", default="test.png", type=Path, help="Source image (any format PIL reads).")
    parser.add_argument("--output", default="result.png", type=Path, help="Where to write the drawing (PNG).")
    parser.add_argument("--patch_size", default=32, type=int,
                        help="Patch side in pixels; it must divide both view sizes. 32 keeps the "
                             "drawing readable; training uses 16 or 8.")
    parser.add_argument("--seed", default=8, type=int, help="Seed of the random crops and flips.")
    parser.add_argument("--mode", default="upstream", choices=MATCHING_MODES,
                        help="Matching rule: 'upstream' (the authors', one-to-one) or 'centre' (each "
                             "student patch to the teacher patch containing its centre).")
    parser.add_argument("--global_size", default=224, type=int, help="Side of the global view in pixels.")
    parser.add_argument("--local_size", default=96, type=int, help="Side of the local view in pixels.")
    parser.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                        help="Area range of the global crop, relative to the image.")
    parser.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                        help="Area range of the local crop, relative to the image.")
    return parser


def draw_views(image: Image.Image, global_size: int, local_size: int, global_scale, local_scale):
    """One global and one local view of ``image`` (crop + flip only), with their geometries."""
    flip = RandomHorizontalFlipWithGeometry(p=0.5)
    global_view = flip(*RandomResizedCropWithGeometry(global_size, scale=tuple(global_scale))(image))
    local_view = flip(*RandomResizedCropWithGeometry(local_size, scale=tuple(local_scale))(image))
    return global_view, local_view


def render_matches(teacher_view: Image.Image, student_view: Image.Image, teacher_tokens: list[int],
                   student_tokens: list[int], patch_size: int, zoom: int = 2) -> Image.Image:
    """The two views side by side (zoomed), with patch grids, token numbers and matched patches."""
    margin, gap, header = 12, 40, 28
    teacher_px, student_px = teacher_view.width * zoom, student_view.width * zoom
    canvas = Image.new("RGB", (2 * margin + teacher_px + gap + student_px, header + teacher_px + margin), "white")
    origins = ((margin, header), (margin + teacher_px + gap, header))
    for view, origin in zip((teacher_view, student_view), origins):
        canvas.paste(view.convert("RGB").resize((view.width * zoom, view.height * zoom), Image.NEAREST), origin)

    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell = patch_size * zoom
    colours = _pair_colours(teacher_tokens[1:])
    for t_token, s_token in zip(teacher_tokens[1:], student_tokens[1:]):
        colour = colours[t_token]
        t_box = _token_box(t_token, teacher_view.width // patch_size, cell, origins[0])
        s_box = _token_box(s_token, student_view.width // patch_size, cell, origins[1])
        for box in (t_box, s_box):
            draw.rectangle(box, fill=colour + (110,), outline=colour + (255,), width=2)
        draw.line([_box_centre(t_box), _box_centre(s_box)], fill=colour + (200,), width=1)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for view, origin in zip((teacher_view, student_view), origins):
        _draw_grid(draw, view.width // patch_size, cell, origin, font)
    draw.text((margin, 6), "teacher: global view", fill="black", font=ImageFont.load_default(size=14))
    draw.text((origins[1][0], 6), "student: local view", fill="black", font=ImageFont.load_default(size=14))
    return canvas


def _pair_colours(teacher_tokens: list[int]) -> dict[int, tuple[int, int, int]]:
    """A distinct saturated colour per teacher token (several student patches may share one)."""
    unique = sorted(set(teacher_tokens))
    return {token: tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(len(unique), 1), 0.9, 1.0))
            for i, token in enumerate(unique)}


def _token_box(token: int, grid: int, cell: int, origin: tuple[int, int]) -> tuple[int, int, int, int]:
    row, col = divmod(token - 1, grid)
    x, y = origin[0] + col * cell, origin[1] + row * cell
    return x, y, x + cell - 1, y + cell - 1


def _box_centre(box: tuple[int, int, int, int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _draw_grid(draw: ImageDraw.ImageDraw, grid: int, cell: int, origin: tuple[int, int], font) -> None:
    x0, y0 = origin
    for i in range(grid + 1):
        draw.line([(x0 + i * cell, y0), (x0 + i * cell, y0 + grid * cell)], fill="black", width=1)
        draw.line([(x0, y0 + i * cell), (x0 + grid * cell, y0 + i * cell)], fill="black", width=1)
    for token in range(1, grid * grid + 1):
        box = _token_box(token, grid, cell, origin)
        draw.text((box[0] + 3, box[1] + 2), str(token), fill="white", font=font, stroke_width=2, stroke_fill="black")


def main(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    grid_side(args.global_size, args.patch_size)
    grid_side(args.local_size, args.patch_size)
    utils.check_output_file(args.output, "--output")
    if not args.image.is_file():
        raise FileNotFoundError(f"image {args.image} not found; pass --image PATH to a photo")
    image = utils.read_rgb_image(args.image)  # 16-bit images scaled, not clipped to white
    torch.manual_seed(args.seed)
    (global_view, global_geometry), (local_view, local_geometry) = draw_views(
        image, args.global_size, args.local_size, args.global_crops_scale, args.local_crops_scale)
    teacher_tokens, student_tokens = match_patches(global_geometry, local_geometry, args.patch_size, args.mode)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    utils.save_image(render_matches(global_view, local_view, teacher_tokens, student_tokens, args.patch_size),
                     args.output)
    print(f"teacher (global) view: {global_geometry}")
    print(f"student (local) view:  {local_geometry}")
    print(f"teacher tokens: {teacher_tokens}")
    print(f"student tokens: {student_tokens}")
    print(f"{len(teacher_tokens) - 1} matched patch pairs plus the CLS pair ({args.mode} rule); wrote {args.output}")
    return teacher_tokens, student_tokens


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
