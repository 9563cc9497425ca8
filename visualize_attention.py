"""Where does the CLS token look? The last block's self-attention, head by head (DINO's visualisation).

    python visualize_attention.py --pretrained_weights dino_vits8 --image_path photo.jpg --output_dir attention
    python visualize_attention.py --random_init --image_path test.png --output_dir attention_random
    python visualize_attention.py --pretrained_weights out/checkpoint.pth --image_path folder/ --threshold 0.6 \\
        --output_dir attention

For each image, resized by ``--image_size`` and cropped at the right and bottom to whole patches (as DINO
does), the attention of the CLS token to every patch in the last block is drawn per head. The architecture
and patch size are the weights' own unless given (patch 8, DINO's, for random weights). Written to
``--output_dir`` (for a folder of images, one sub-folder per image named by its full file name, e.g.
``photo.jpg/``, so that ``a.jpg`` and ``a.png`` keep apart); ``img.png`` and ``attn-head{h}.png`` are the files
DINO's script writes, pixel for pixel:

* ``img.png``: the model's input (resized, cropped, ImageNet-normalised) stretched as a whole to its own
  min and max, DINO's ``save_image(..., normalize=True)`` (so colours shift slightly against the photo);
* ``attn-head{h}.png``: head h's CLS-to-patch attention, one value per patch, enlarged to the image
  (nearest, so every patch is a flat square), in viridis scaled to that head's own range (matplotlib's
  ``imsave``, RGBA, as DINO's ``plt.imsave``);
* with ``--threshold``: ``mask-head{h}.png``, the patches that hold that share of head h's attention mass
  (white), DINO's thresholded masks;
* ``attention.png``: one figure, the image and every head's map on top; with ``--threshold``, each mask
  over the image below.

Ends with ``FINAL {json}``: per image the size, patch grid, and per head the CLS-to-CLS share; with
``--threshold`` also the patches kept and the mass they hold (``--output_json FILE`` writes the same).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import matplotlib.image
import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from PIL import Image
from torchvision import transforms

import utils
import vision_transformer as vits

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COLOUR_MAP = "viridis"  # matplotlib's default image.cmap, which DINO's plt.imsave gets; pinned against a matplotlibrc
DINO_PATCH_SIZE = 8  # DINO's visualize_attention.py default (its paper's figures use ViT-S/8)
MASK_COLOUR = np.array([255, 64, 32], dtype=np.float64)
PANEL_INCHES, FIGURE_DPI = 1.6, 100


def get_args_parser() -> argparse.ArgumentParser:
    # "resolve": the --patch_size below replaces the shared one, whose help tells the evaluations' defaults.
    parser = utils.script_parser(__file__, "Self-attention maps of the last block.", conflict_handler="resolve")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--patch_size", default=None, type=int,
                        help="Patch side in pixels. Left out, it is the weights' own: a reference-weights name's, "
                             "or read from a weights file's patch embedding (patch_embed.proj.weight, "
                             f"[D, 3, p, p]); with --random_init it is {DINO_PATCH_SIZE}, DINO's default. Given, "
                             "it must agree with the weights.")
    parser.add_argument("--image_path", default="", type=str,
                        help="An image file, or a folder: every image directly inside it (by extension, hidden "
                             "files ignored) gets its own sub-folder of --output_dir.")
    parser.add_argument("--image_size", default=[480, 480], type=int, nargs="+", metavar="SIZE",
                        help="Resize to H W (two numbers), or the shorter side to SIZE keeping the aspect ratio "
                             "(one number); then the right and bottom are cropped to whole patches, as in DINO. "
                             "Use about the training resolution or larger (e.g. 64 for a 32 px model).")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Also write masks (mask-head{h}.png, and a row of them in attention.png) that keep, "
                             "per head, the fewest highest-attention patches holding at least this share (0-1] of "
                             "the head's CLS-to-patch attention (DINO's rule; its paper shows 0.6). Default: off, "
                             "no masks, as in DINO.")
    parser.add_argument("--output_dir", default="attention", type=str, help="Where the PNGs are written.")
    utils.add_device_arg(parser)
    parser.add_argument("--output_json", default="", type=str, help="Also write the summary to this JSON file.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop early, with the argument's name, on settings that cannot work; the backbone last, as it reads the
    weights file (``vits.resolve_backbone_args``: the architecture and patch size not given are the weights')."""
    if not args.image_path:
        raise ValueError("--image_path is required: an image file or a folder of images")
    if not Path(args.image_path).exists():
        raise FileNotFoundError(f"--image_path {args.image_path} does not exist")
    if len(args.image_size) not in (1, 2):
        raise ValueError(f"--image_size takes one number (shorter side) or two (H W), got {args.image_size}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if args.random_init and args.patch_size is None:
        args.patch_size = DINO_PATCH_SIZE
    vits.validate_backbone_args(args)
    if min(args.image_size) < args.patch_size:
        raise ValueError(f"--image_size {' '.join(map(str, args.image_size))} is smaller than one patch "
                         f"(--patch_size {args.patch_size})")


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------
def list_inputs(image_path: str | Path) -> list[Path]:
    """The image file itself, or the images directly inside a folder (none is an error)."""
    path = Path(image_path)
    if path.is_file():
        return [path]
    images = utils.list_images(path)
    if not images:
        raise ValueError(f"no images in {path} (image extensions: {', '.join(utils.IMAGE_EXTENSIONS)})")
    return images


def output_folders(images: list[Path], output_dir: str | Path, single_file: bool) -> list[Path]:
    """Where each image's PNGs go: ``output_dir`` for a single file, else one sub-folder per image named by its
    full file name (``a.png/``, ``a.png.png/``, ``a.jpg/``): unique, as the names in one folder are."""
    root = Path(output_dir)
    return [root] if single_file else [root / path.name for path in images]


def check_outputs(images: list[Path], folders: list[Path], args: argparse.Namespace) -> None:
    """Stop before the model is built when an output folder or ``--output_json`` cannot be written (a file in
    the way, such as an input image where its own folder would go; a read-only or full disk). Creates nothing."""
    utils.check_output_dir(args.output_dir, "--output_dir")
    for image, folder in zip(images, folders):
        utils.check_output_dir(folder, f"the output folder of {image.name}")
    if args.output_json:
        utils.check_output_file(args.output_json, "--output_json")


def prepare_image(path: str | Path, image_size: list[int], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels, model input)``: uint8 ``[3, H, W]`` and ImageNet-normalised float ``[1, 3, H, W]``.

    Resized with torchvision's ``Resize`` (bilinear, antialiased: DINO's transform), then cropped at the right
    and bottom so that H and W are multiples of ``patch_size`` (DINO drops the remainder the same way).
    """
    size = image_size[0] if len(image_size) == 1 else tuple(image_size)
    resized = transforms.Resize(size)(utils.read_rgb_image(path))
    pixels = transforms.PILToTensor()(resized)
    height, width = (side - side % patch_size for side in pixels.shape[1:])
    if height == 0 or width == 0:
        raise ValueError(f"{path} is {resized.width}x{resized.height} px after resizing, smaller than one patch "
                         f"({patch_size} px): raise --image_size")
    pixels = pixels[:, :height, :width]
    model_input = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels.float() / 255)
    return pixels, model_input[None]


# ----------------------------------------------------------------------------------------------
# Attention and masks.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(model: vits.VisionTransformer, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's CLS attention of every head.

    Args:
        model: a ViT with ``get_last_selfattention``.
        image: one normalised image ``[1, 3, H, W]``, sides multiples of the patch size.

    Returns:
        ``(maps, cls_share)``: CLS-to-patch attention ``[heads, H / patch, W / patch]`` (patches row-major, as
        the tokens), each head summing to ``1 - cls_share``; and the CLS-to-CLS attention ``[heads]``.
    """
    attention = model.get_last_selfattention(image)[0, :, 0].float()  # [heads, 1 + N]: the CLS token's row
    grid = (image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size)
    return attention[:, 1:].reshape(-1, *grid), attention[:, 0]


def threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row, the fewest largest entries that hold at least ``threshold`` of the row's total (DINO's masks).

    DINO's rule: sort a head's attention ascending, normalise by its sum, and keep the entries whose cumulative
    share exceeds ``1 - threshold``; what is kept is then the largest entries down to the one that makes the
    kept share reach ``threshold``. (Among equal values at the boundary, which one is kept is arbitrary.)

    Args:
        attentions: non-negative ``[heads, N]``.
        threshold: in (0, 1].

    Returns:
        bool ``[heads, N]``.
    """
    values, order = attentions.sort(dim=-1)
    cumulative = (values / values.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
    kept_sorted = cumulative > 1 - threshold
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


# ----------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------
def enlarge(values: np.ndarray, factor: int) -> np.ndarray:
    """Each entry of ``[h, w, ...]`` repeated as a ``factor x factor`` block: ``[h * factor, w * factor, ...]``
    (DINO's nearest upsampling by the patch size)."""
    return values.repeat(factor, axis=0).repeat(factor, axis=1)


def overlay(pixels: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` with bool ``mask`` ``[H, W]`` tinted in ``MASK_COLOUR`` (DINO: alpha 0.5)."""
    tinted = pixels.astype(np.float64)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * MASK_COLOUR
    return tinted.round().astype(np.uint8)


def render_figure(pixels: np.ndarray, maps: np.ndarray, masks: np.ndarray | None, mass_kept: list[float] | None,
                  threshold: float | None, title: str) -> Figure:
    """Top row: the image, then each head's map; with masks, a bottom row of each head's mask over the image.

    ``pixels`` uint8 ``[H, W, 3]``; ``maps`` float ``[heads, H, W]``; ``masks`` bool ``[heads, H, W]`` or None.
    """
    heads, (height, width), rows = len(maps), pixels.shape[:2], 1 if masks is None else 2
    panel_height = PANEL_INCHES * height / width
    title_inches, label_inches = 0.3, 0.2  # room for the title and each row's labels
    figure = Figure(figsize=(PANEL_INCHES * (heads + 1), rows * (panel_height + label_inches) + title_inches),
                    dpi=FIGURE_DPI)
    axes = figure.subplots(rows, heads + 1, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    axes[0, 0].imshow(pixels, interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for head in range(heads):  # imshow scales each map to its own range, as the PNGs
        axes[0, head + 1].imshow(maps[head], cmap=COLOUR_MAP, interpolation="nearest")
        axes[0, head + 1].set_title(f"head {head}", fontsize=8)
    if masks is not None:
        axes[1, 0].text(0.5, 0.5, f"masks: the fewest\npatches holding\n{threshold:.0%} of each\nhead's attention",
                        ha="center", va="center", fontsize=7, transform=axes[1, 0].transAxes)
        for head in range(heads):
            axes[1, head + 1].imshow(overlay(pixels, masks[head]), interpolation="nearest")
            axes[1, head + 1].set_title(f"{masks[head].mean():.0%} of area, {mass_kept[head]:.0%} mass", fontsize=7)
    figure.suptitle(title, fontsize=8)
    total = figure.get_figheight()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (title_inches + label_inches) / total,
                           wspace=0.05, hspace=label_inches / panel_height)
    return figure


def save_dino_pngs(folder: Path, model_input: torch.Tensor, big_maps: np.ndarray) -> None:
    """``img.png`` and ``attn-head{h}.png`` as DINO's script writes them, with the same library calls.

    ``img.png``: the normalised input ``[1, 3, H, W]`` min-max stretched and rounded by torchvision's
    ``save_image(normalize=True, scale_each=True)``. ``attn-head{h}.png``: float32 ``big_maps[h]``
    (``[heads, H, W]``) through matplotlib's ``imsave`` (each map's min-max, a 256-colour table converted
    to bytes by truncation, RGBA), as ``plt.imsave`` with its default colour map.
    """
    utils.write_atomic(folder / "img.png", lambda handle: torchvision.utils.save_image(
        model_input, handle, format="png", normalize=True, scale_each=True))
    for head, head_map in enumerate(big_maps):
        utils.write_atomic(folder / f"attn-head{head}.png", lambda handle: matplotlib.image.imsave(
            handle, head_map, cmap=COLOUR_MAP, format="png"))


def save_outputs(folder: Path, pixels: torch.Tensor, model_input: torch.Tensor, maps: torch.Tensor,
                 masks: torch.Tensor | None, mass_kept: list[float] | None, args: argparse.Namespace,
                 title: str) -> None:
    """Write DINO's PNGs (``save_dino_pngs``), ``mask-head{h}.png`` when masks are given, and ``attention.png``.

    ``pixels`` uint8 ``[3, H, W]``; ``model_input`` ``[1, 3, H, W]``; ``maps`` ``[heads, h, w]``; ``masks``
    bool ``[heads, h, w]`` (patch grid) or None.
    """
    folder.mkdir(parents=True, exist_ok=True)
    big_maps = enlarge(maps.numpy().transpose(1, 2, 0), args.patch_size).transpose(2, 0, 1)
    save_dino_pngs(folder, model_input, big_maps)
    big_masks = None
    if masks is not None:
        big_masks = enlarge(masks.numpy().transpose(1, 2, 0), args.patch_size).transpose(2, 0, 1)
        for head, head_mask in enumerate(big_masks):
            utils.save_image(Image.fromarray(head_mask.astype(np.uint8) * 255), folder / f"mask-head{head}.png")
    image = pixels.permute(1, 2, 0).numpy()
    figure = render_figure(image, big_maps, big_masks, mass_kept, args.threshold, title)
    utils.write_atomic(folder / "attention.png", lambda handle: figure.savefig(handle, format="png"))


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def visualize_image(model: vits.VisionTransformer, path: Path, folder: Path, args: argparse.Namespace,
                    device: torch.device) -> dict:
    """Maps, masks (with ``--threshold``) and figure of one image; returns its summary entry."""
    pixels, model_input = prepare_image(path, args.image_size, args.patch_size)
    maps, cls_share = attention_maps(model, model_input.to(device))
    maps, cls_share = maps.cpu(), cls_share.cpu()
    heads, grid = maps.shape[0], list(maps.shape[1:])
    entry = {"image": str(path), "output_dir": str(folder), "size": list(pixels.shape[1:]), "grid": grid,
             "heads": heads, "cls_to_cls": [round(float(v), 6) for v in cls_share]}
    masks = mass_kept = None
    if args.threshold is not None:
        flat = maps.reshape(heads, -1)
        masks = threshold_masks(flat, args.threshold)
        shares = flat / flat.sum(dim=-1, keepdim=True)
        mass_kept = [float(shares[head][masks[head]].sum()) for head in range(heads)]
        entry.update(patches_kept=[int(m.sum()) for m in masks], mass_kept=[round(v, 6) for v in mass_kept])
        masks = masks.reshape(heads, *grid)
    weights = Path(args.pretrained_weights).name if args.pretrained_weights else "random init"
    title = f"{path.name}: last-block CLS attention, {weights} ({args.arch}/{args.patch_size})"
    save_outputs(folder, pixels, model_input, maps, masks, mass_kept, args, title)
    print(f"{path}: {heads} heads on a {grid[0]}x{grid[1]} grid -> {folder}", flush=True)
    return entry


def main(args: argparse.Namespace) -> dict:
    """Draw every image's attention; prints and returns the summary (``FINAL {json}``)."""
    validate_args(args)
    images = list_inputs(args.image_path)
    folders = output_folders(images, args.output_dir, Path(args.image_path).is_file())
    check_outputs(images, folders, args)
    device = utils.resolve_device(args.device)
    native = max(args.image_size) // args.patch_size * args.patch_size  # random weights are built for this size
    model = vits.build_frozen_backbone(args, img_size=native).to(device)
    with utils.created_output_dir(args.output_dir):  # removed again, if still empty, when an image fails
        entries = [visualize_image(model, path, folder, args, device) for path, folder in zip(images, folders)]
    summary = {"eval": "attention", "weights": args.pretrained_weights or "random_init", "arch": args.arch,
               "patch_size": args.patch_size, "threshold": args.threshold, "images": entries}
    utils.report_final(summary, args.output_json)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
