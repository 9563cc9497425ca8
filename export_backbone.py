"""Export backbone weights for timm or for the official DINO code.

    python export_backbone.py --pretrained_weights out/checkpoint.pth --format timm --output vit_small_pwself.pth
    python export_backbone.py --pretrained_weights out/checkpoint.pth --format dino --output vit_small_pwself_dino.pth

The architecture, patch size and sizes are the checkpoint's own (its stored training args and tensors) unless
given (``vision_transformer.resolve_backbone_args``).

The weights are read with the loading path of every evaluation (``vision_transformer.load_pretrained_weights``:
``--checkpoint_key``, ``module.``/``backbone.`` prefixes, head weights dropped, strict shapes, finite values)
into a backbone built at the size the weights were trained at: the native image side is the ``pos_embed``
grid side times the patch size, so nothing is ever resampled. The file written is a plain backbone state dict
(``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``), written atomically:

* ``timm``: what ``timm.create_model(<vit_*_patch16_224>, patch_size=P, img_size=S, num_classes=0)`` loads
  with ``strict=True``; the export checks that and that timm's features equal ours, then prints the call;
* ``dino``: the layout of DINO's released ``dino_*_pretrain.pth`` files, which DINO's
  ``utils.load_pretrained_weights`` loads into its ``vision_transformer.vit_*`` with no missing or unexpected
  keys; the export checks the key set against DINO's parameter names, then prints the call.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch

import utils
import vision_transformer as vits

# timm's registered model for each of our architectures; patch, image size and width overrides are arguments.
TIMM_MODEL_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
                    "vit_base": "vit_base_patch16_224"}
# DINO builds every evaluation backbone at its default image size (``img_size=[224]``).
DINO_IMG_SIZE = 224
# Largest absolute difference between timm's and our CLS features that the timm export accepts.
TIMM_TOLERANCE = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Export backbone weights to timm's or DINO's layout.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--format", required=True, choices=("timm", "dino"),
                        help="timm: a state dict for timm.create_model('vit_*_patch16_224', patch_size=P, "
                             "img_size=S, num_classes=0), checked against our features; dino: the layout of "
                             "DINO's released backbone weights, for the official DINO code. The Python call that "
                             "loads the file is printed.")
    parser.add_argument("--output", required=True, type=str,
                        help="File to write (its folder must exist). An existing file is kept unless --overwrite "
                             "is given; a training checkpoint (holding student, teacher, optimizer or epoch) is "
                             "never replaced.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing --output file (atomically, once the export is checked); never "
                             "a training checkpoint.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop before reading anything on arguments that cannot give an export."""
    vits.validate_backbone_args(args)
    if args.random_init or not args.pretrained_weights:
        raise ValueError("give the weights to export with --pretrained_weights PATH_OR_NAME (random weights are "
                         "not exported)")
    output = Path(args.output)
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; name the file to write, e.g. {output / 'backbone.pth'}")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"the folder of --output {output} does not exist; create it first "
                                f"(mkdir -p {output.parent}) or choose another path")
    if output.exists() and output.resolve() == Path(args.pretrained_weights).resolve():
        raise ValueError(f"--output {output} is the file being exported; write the export to another file")
    utils.check_output_file(output, "--output")
    if output.exists():
        refuse_to_replace(output, args.overwrite)


def refuse_to_replace(output: Path, overwrite: bool) -> None:
    """Stop when the existing ``output`` is a training checkpoint (always: it is a run's only copy of its state),
    or is any file and ``overwrite`` is off."""
    try:
        content = utils.load_checkpoint(output, what="existing --output")
    except RuntimeError:  # not a checkpoint we can read: an ordinary file
        content = {}
    training_keys = [key for key in vits.TRAINING_CHECKPOINT_KEYS if key in content]
    if training_keys:
        raise FileExistsError(f"--output {output} is a training checkpoint (it holds {', '.join(training_keys)}); "
                              "an export never replaces one, --overwrite included. Write the export to another "
                              "file, e.g. " + str(output.with_name(f"{output.stem}_backbone.pth")))
    if not overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite to replace it, or write the export to "
                              "another file")


def load_native_backbone(args: argparse.Namespace) -> vits.VisionTransformer:
    """Our backbone with the weights loaded by the evaluations' loader, in eval mode, at their native size.

    The loader gives the model the weights' own position-embedding grid (native side = grid side x patch
    size) instead of resampling them, so the model is the one the weights were trained as, whatever size
    it was built at.
    """
    model = vits.build_backbone(args)
    vits.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
    return model.eval()


def timm_kwargs(args: argparse.Namespace, img_size: int) -> dict:
    """Keyword arguments of ``timm.create_model`` (after the model name) for the model of the timm export."""
    return dict(pretrained=False, patch_size=args.patch_size, img_size=img_size, **vits.size_overrides(args),
                num_classes=0)


def timm_usage(args: argparse.Namespace, img_size: int) -> str:
    """The Python lines that load the timm export, as printed for users."""
    kwargs = ", ".join(f"{name}={value}" for name, value in timm_kwargs(args, img_size).items())
    return (f'import timm, torch\n'
            f'model = timm.create_model("{TIMM_MODEL_NAMES[args.arch]}", {kwargs})\n'
            f'model.load_state_dict(torch.load("{args.output}", map_location="cpu"), strict=True)\n'
            f"features = model(images)  # CLS [B, D] after the final norm, as ours; images [B, 3, {img_size}, "
            f"{img_size}] normalised with ImageNet's mean and std as in training (not the 0.5 of timm's config)\n"
            f"# other image sizes: add dynamic_img_size=True; timm then resamples the position embeddings its own "
            f"way (to the exact grid, antialiased when shrinking), not DINO's as ours do, so features differ slightly")


def check_timm(model: vits.VisionTransformer, state: dict, args: argparse.Namespace, img_size: int) -> float:
    """Load ``state`` strictly into timm's own model and return the largest CLS feature difference to ours."""
    import timm  # only this format needs it at run time

    reference = timm.create_model(TIMM_MODEL_NAMES[args.arch], **timm_kwargs(args, img_size)).eval()
    reference.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (reference(images) - model(images)).abs().max().item()
    if not difference <= TIMM_TOLERANCE:
        raise RuntimeError(f"timm's model gives other features than ours (largest difference {difference:.2e} > "
                           f"{TIMM_TOLERANCE}); the installed timm {timm.__version__} computes its ViT differently")
    return difference


def dino_parameter_names(depth: int) -> set[str]:
    """The state-dict keys of DINO's ``VisionTransformer`` with ``depth`` blocks and ``num_classes=0``."""
    block = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    return names | {f"blocks.{index}.{name}" for index in range(depth) for name in block}


def check_dino_keys(state: dict, depth: int) -> None:
    """Refuse a state dict whose keys are not exactly DINO's: DINO loads non-strictly, so a renamed or extra
    tensor would be skipped silently and leave a randomly initialised one in its model."""
    expected = dino_parameter_names(depth)
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        raise RuntimeError(f"the backbone's keys differ from DINO's ViT: not in DINO's model "
                           f"{', '.join(extra) or 'none'}; missing {', '.join(missing) or 'none'}")


def dino_usage(args: argparse.Namespace, img_size: int) -> str:
    """The Python lines (in a clone of facebookresearch/dino) that load the DINO export, as printed for users."""
    overrides = vits.size_overrides(args)
    if overrides:  # DINO's vit_* fix the width, depth and heads, so another size needs the class itself
        sizes = {**vits.ARCH_SIZES[args.arch], **overrides}
        build = ("vits.VisionTransformer(" + ", ".join(f"{name}={value}" for name, value in sizes.items()) +
                 f", mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), "
                 f"patch_size={args.patch_size}, img_size=[{img_size}], num_classes=0)")
    else:
        size = "" if img_size == DINO_IMG_SIZE else f", img_size=[{img_size}]"
        build = f"vits.{args.arch}(patch_size={args.patch_size}{size}, num_classes=0)"
    lines = ["# in a clone of github.com/facebookresearch/dino:",
             "from functools import partial; import torch.nn as nn" if overrides else "",
             "import utils, vision_transformer as vits",
             f"model = {build}",
             f'utils.load_pretrained_weights(model, "{args.output}", "teacher", "{args.arch}", {args.patch_size})'
             "  # msg: <All keys matched successfully>"]
    if overrides or img_size != DINO_IMG_SIZE:
        lines.append(f"# DINO's eval_*.py build vits.{args.arch}(patch_size=..., num_classes=0) at {DINO_IMG_SIZE} px: "
                     "replace that line by the model line above to evaluate these weights with them")
    else:
        lines.append(f"# or: python eval_knn.py --arch {args.arch} --patch_size {args.patch_size} "
                     f"--pretrained_weights {args.output} --data_path /path/to/imagenet")
    return "\n".join(line for line in lines if line)


def main(args: argparse.Namespace) -> dict:
    """Export the backbone; returns the file, format, native image size and, for timm, the feature difference."""
    validate_args(args)
    model = load_native_backbone(args)
    img_size = model.patch_embed.img_size[0]
    state = model.state_dict()
    summary = {"output": args.output, "format": args.format, "img_size": img_size, "patch_size": args.patch_size}
    # Check before writing, so that a failed check leaves no file behind.
    if args.format == "timm":
        summary["max_abs_difference"] = check_timm(model, state, args, img_size)
        usage = timm_usage(args, img_size)
    else:
        check_dino_keys(state, len(model.blocks))
        usage = dino_usage(args, img_size)
    utils.save_atomic(state, args.output)
    checked = (f"timm's features equal ours to {summary['max_abs_difference']:.1e}" if args.format == "timm"
               else "keys equal DINO's ViT")
    print(f"Wrote {len(state)} backbone tensors in {args.format} layout to {args.output} (native size {img_size} px, "
          f"patch {args.patch_size}; {checked}). Load them with:\n{usage}", flush=True)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
