"""Copy detection on Copydays with frozen features (DINO's protocol).

    python eval_copy_detection.py --pretrained_weights out/checkpoint.pth --data_path /path/to/copydays \\
        --whitening_path /path/to/extra_images --distractors_path /path/to/distractors

``<data_path>`` holds ``original/*.jpg`` (the database), ``strong/*.jpg``, ``jpegqual/<q>/*.jpg`` and
``crops/<pct>/*.jpg`` (the query blocks; their sizes come from the files). A query's positive is
the original with the same file name, or for ``strong`` the originals whose names share the first
four characters. Features: the CLS token concatenated with GeM-pooled (p=4) patch tokens of the
last layer, optionally PCA-whitened (power 0.5) with statistics of ``--whitening_path`` images, then
L2-normalised. Each query retrieves its top 20; AP uses the Holidays trapezoid rule. DINO's command lines parse:
``--use_cuda``, ``--dist_url`` and ``--local_rank`` (``utils.add_dino_launch_args``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import utils
import vision_transformer as vits
from eval_image_retrieval import ImageList, average_precision
from eval_knn import extract_features, sequential_loader
from transforms_patch import IMAGENET_MEAN, IMAGENET_STD

GEM_POWER = 4.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Copy detection on Copydays.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--data_path", required=True, type=str,
                        help="Copydays root: original/, strong/, jpegqual/<q>/, crops/<pct>/ of .jpg files.")
    parser.add_argument("--distractors_path", default="", type=str,
                        help="A folder of images added to the database as distractors (optional).")
    parser.add_argument("--whitening_path", default="", type=str,
                        help="A folder of images to learn PCA whitening on (optional; not Copydays images).")
    parser.add_argument("--imsize", default=320, type=int, help="Images are resized to imsize x imsize.")
    parser.add_argument("--topk", default=20, type=int, help="Results retrieved per query (at least 1).")
    parser.add_argument("--batch_size_per_gpu", default=16, type=int, help="Images per forward pass.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data-loading processes per GPU.")
    utils.add_device_arg(parser)
    parser.add_argument("--output_dir", default=".", type=str, help="Where copydays.json is written.")
    utils.add_tensorboard_arg(parser)
    utils.add_dino_launch_args(parser, use_cuda=True)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop at the start, naming the argument, on settings that cannot give a meaningful mAP."""
    utils.apply_dino_launch_args(args)
    vits.validate_backbone_args(args)
    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1 (results retrieved per query), got {args.topk}: with none "
                         "retrieved every query's AP would be 0")
    if args.imsize < args.patch_size or args.imsize % args.patch_size:
        raise ValueError(f"--imsize {args.imsize} must be a positive multiple of --patch_size {args.patch_size}")
    if args.batch_size_per_gpu < 1:
        raise ValueError(f"--batch_size_per_gpu must be positive, got {args.batch_size_per_gpu}")


# ----------------------------------------------------------------------------------------------
# Layout.
# ----------------------------------------------------------------------------------------------
def read_copydays(root: str | Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """The originals and the query blocks (``strong``, ``jpegqual/<q>``, ``crops/<pct>``) found on disk."""
    root = Path(root)
    if not (root / "original").is_dir():
        raise FileNotFoundError(f"{root / 'original'} not found: expected the Copydays layout original/, "
                                "strong/, jpegqual/<q>/, crops/<pct>/")
    originals = utils.list_images(root / "original")
    blocks: dict[str, list[Path]] = {}
    if (root / "strong").is_dir():
        blocks["strong"] = utils.list_images(root / "strong")
    for family in ("jpegqual", "crops"):
        if (root / family).is_dir():
            for level in sorted((p for p in (root / family).iterdir() if p.is_dir()), key=_numeric_name):
                blocks[f"{family}/{level.name}"] = utils.list_images(level)
    blocks = {name: files for name, files in blocks.items() if files}
    if not originals or not blocks:
        raise ValueError(f"{root} holds {len(originals)} originals and no query block with images")
    return originals, blocks


def _numeric_name(path: Path):
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def positives_of(query: Path, block: str, originals: list[Path]) -> np.ndarray:
    """Indices of the originals a query is a copy of."""
    if block == "strong":
        return np.array([i for i, o in enumerate(originals) if o.name[:4] == query.name[:4]], dtype=np.int64)
    return np.array([i for i, o in enumerate(originals) if o.name == query.name], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Features.
# ----------------------------------------------------------------------------------------------
def cls_gem_features(model: vits.VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2D]``: the last layer's CLS token and its patch tokens GeM-pooled with p = 4."""
    tokens = model.get_intermediate_layers(images, n=1)[0]
    patches = tokens[:, 1:].clamp(min=1e-6)
    gem = patches.pow(GEM_POWER).mean(dim=1).pow(1.0 / GEM_POWER)
    return torch.cat([tokens[:, 0], gem], dim=1)


class PCAWhitening:
    """Centre, rotate onto the principal axes and scale each by ``eigenvalue ** -0.5``.

    Directions with (numerically) zero variance are dropped, so fewer whitening images than
    feature dimensions still give a well-defined transform.
    """

    def __init__(self, features: torch.Tensor, power: float = 0.5):
        features = features.double()
        self.mean = features.mean(dim=0)
        centred = features - self.mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(features))
        keep = eigenvalues > eigenvalues.max() * 1e-8
        self.projection = (eigenvectors[:, keep] * eigenvalues[keep].pow(-power)).float()
        self.mean = self.mean.float()
        print(f"PCA whitening learned on {len(features)} images: {int(keep.sum())} of {len(keep)} dimensions kept")

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) @ self.projection


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def evaluate_blocks(query_features: torch.Tensor, database_features: torch.Tensor, blocks: dict[str, list[Path]],
                    originals: list[Path], topk: int) -> dict[str, float]:
    """mAP (percent) per query block and over all queries; AP of each query over its top ``topk``."""
    similarity = query_features @ database_features.T
    retrieved = similarity.topk(min(topk, similarity.shape[1]), dim=1).indices.numpy()
    aps_per_block, start = {}, 0
    for name, files in blocks.items():
        aps = []
        for offset, query in enumerate(files):
            positives = positives_of(query, name, originals)
            ranks = np.flatnonzero(np.isin(retrieved[start + offset], positives))
            aps.append(average_precision(ranks, max(len(positives), 1)))
        aps_per_block[name] = aps
        start += len(files)
    results = {name: 100 * float(np.mean(aps)) for name, aps in aps_per_block.items()}
    results["overall"] = 100 * float(np.mean([ap for aps in aps_per_block.values() for ap in aps]))
    return results


def main(args: argparse.Namespace) -> dict:
    """Evaluate; returns ``{block: mAP, ..., "overall": mAP}`` in percent."""
    validate_args(args)
    output_json = utils.check_output_dir(args.output_dir, "--output_dir") / "copydays.json"
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    originals, blocks = read_copydays(args.data_path)
    distractors = utils.list_images(args.distractors_path) if args.distractors_path else []
    print(f"Copydays: {len(originals)} originals, {len(distractors)} distractors, blocks "
          + ", ".join(f"{name} ({len(files)})" for name, files in blocks.items()))
    model = vits.build_frozen_backbone(args, img_size=args.imsize).to(device)
    transform = transforms.Compose([
        transforms.Resize((args.imsize, args.imsize), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def features_of(files: list[Path], what: str) -> torch.Tensor:
        loader = sequential_loader(ImageList(files, transform), args.batch_size_per_gpu, args.num_workers)
        return extract_features(lambda images: cls_gem_features(model, images), loader, device, f"{what} features:")

    database = features_of(originals + distractors, "Database")
    queries = features_of([f for files in blocks.values() for f in files], "Query")
    if args.whitening_path:
        whiten = PCAWhitening(features_of(utils.list_images(args.whitening_path), "Whitening"))
        database, queries = whiten(database), whiten(queries)
    results = evaluate_blocks(F.normalize(queries, dim=1), F.normalize(database, dim=1), blocks, originals, args.topk)
    for name, value in results.items():
        print(f"{name:>14}: mAP {value:.2f}")
    summary = {"eval": "copydays", "weights": args.pretrained_weights or "random_init", "imsize": args.imsize,
               "whitening": bool(args.whitening_path), "distractors": len(distractors), "mAP": results}
    utils.report_final(summary, output_json, args.tensorboard)
    return results


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
