"""Check that our ViT gives the official DINO ViT's outputs, at the native size and off it.

    git clone https://github.com/facebookresearch/dino /path/to/dino
    python check_dino_parity.py --dino_path /path/to/dino

Builds DINO's ``vision_transformer.vit_small`` (or ``--arch``) from its own code with random, non-trivial
weights, copies them into ours, and prints one Markdown row per input size: the largest difference of the
CLS and of the patch tokens, relative to the largest DINO value. It does so for a model used at the size
it was built for, one built at another size and loaded with ``load_pretrained_weights`` (as the
evaluations do), and smooth position embeddings (like trained ones), where resampling errors show most.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch

import utils
import vision_transformer as vits

SIZES = ((224, 224), (96, 96), (320, 256), (256, 320), (480, 480), (32, 32))
LOADED_SIZES = {480: ((480, 480), (512, 384)), 320: ((320, 320),)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Our ViT against the official DINO ViT.")
    parser.add_argument("--dino_path", required=True, type=Path,
                        help="A clone of github.com/facebookresearch/dino (its vision_transformer.py is imported).")
    parser.add_argument("--arch", default="vit_small", choices=sorted(vits.ARCHS), help="Architecture to compare.")
    parser.add_argument("--patch_size", default=16, type=int, help="Patch size (the native image is 224 px).")
    parser.add_argument("--tolerance", default=1e-5, type=float,
                        help="Largest relative difference accepted; the script exits with status 1 above it.")
    return parser


def import_dino_vits(dino_path: Path):
    """DINO's ``vision_transformer`` module, imported under another name so that ours stays importable."""
    source = dino_path / "vision_transformer.py"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: --dino_path must be a clone of "
                                "github.com/facebookresearch/dino")
    spec = importlib.util.spec_from_file_location("dino_vision_transformer", source)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(dino_path))  # its module imports DINO's utils
    saved_utils = sys.modules.pop("utils")
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(dino_path))
        sys.modules["utils"] = saved_utils
    return module


def random_dino_model(dino_vits, arch: str, patch_size: int) -> torch.nn.Module:
    """DINO's ViT with every parameter drawn from N(0, 0.05^2): norms and biases matter too."""
    torch.manual_seed(0)
    model = getattr(dino_vits, arch)(patch_size=patch_size).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    return model


def make_position_embeddings_smooth(model: torch.nn.Module) -> None:
    """Replace the patch position embeddings ``[1, 1+n^2, D]`` by low-frequency waves over the grid."""
    tokens, dim = model.pos_embed.shape[1] - 1, model.pos_embed.shape[2]
    side = math.isqrt(tokens)
    rows, cols = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    generator = torch.Generator().manual_seed(1)
    frequencies = torch.rand(dim, 2, generator=generator) * 2 * math.pi / side
    phases = torch.rand(dim, generator=generator) * 2 * math.pi
    waves = torch.sin(rows[..., None] * frequencies[:, 0] + cols[..., None] * frequencies[:, 1] + phases)
    with torch.no_grad():
        model.pos_embed[:, 1:] = waves.reshape(1, tokens, dim)


def relative_errors(ours: torch.nn.Module, dino: torch.nn.Module, height: int, width: int) -> tuple[float, float]:
    """Largest |ours - DINO| / max |DINO| of the CLS token and of the patch tokens for a random input."""
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))
    with torch.no_grad():
        theirs = dino.get_intermediate_layers(images, 1)[0]
        mine = ours.forward_features(images)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    return error(mine[:, 0], theirs[:, 0]), error(mine[:, 1:], theirs[:, 1:])


def rows_for(label: str, ours: torch.nn.Module, dino: torch.nn.Module, sizes) -> list[tuple[str, str, float, float]]:
    return [(label, f"{h}x{w}", *relative_errors(ours, dino, h, w)) for h, w in sizes]


def our_copy(dino: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Our ViT built at 224 px holding DINO's weights (strict: the parameter names are the same)."""
    model = vits.ARCHS[args.arch](patch_size=args.patch_size).eval()
    model.load_state_dict(dino.state_dict(), strict=True)
    return model


def loaded_copies(dino: torch.nn.Module, args: argparse.Namespace):
    """``(img_size, model)``: ours built at other sizes, DINO's weights loaded as the evaluations load them."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dino_backbone.pth"
        torch.save(dino.state_dict(), path)
        for img_size in LOADED_SIZES:
            model = vits.ARCHS[args.arch](patch_size=args.patch_size, img_size=img_size)
            vits.load_pretrained_weights(model, str(path))
            yield img_size, model.eval()


def main(args: argparse.Namespace) -> list[tuple[str, str, float, float]]:
    """Print the table; returns its rows ``(model, input size, CLS error, patch error)``."""
    torch.set_num_threads(min(4, torch.get_num_threads()))
    dino = random_dino_model(import_dino_vits(args.dino_path), args.arch, args.patch_size)
    rows = rows_for("built at 224", our_copy(dino, args), dino, SIZES)
    for img_size, model in loaded_copies(dino, args):
        rows += rows_for(f"built at {img_size}, loaded", model, dino, LOADED_SIZES[img_size])
    make_position_embeddings_smooth(dino)
    rows += rows_for("smooth pos_embed", our_copy(dino, args), dino, SIZES[1:])
    print(f"| {args.arch}/{args.patch_size} | input HxW | CLS rel. error | patch tokens rel. error |")
    print("| --- | --- | ---: | ---: |")
    for label, size, cls_error, patch_error in rows:
        print(f"| {label} | {size} | {cls_error:.1e} | {patch_error:.1e} |")
    worst = max(max(row[2], row[3]) for row in rows)
    if worst > args.tolerance:
        raise RuntimeError(f"largest relative difference {worst:.1e} exceeds --tolerance {args.tolerance:g}")
    print(f"All within {args.tolerance:g} (largest {worst:.1e}).")
    return rows


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
