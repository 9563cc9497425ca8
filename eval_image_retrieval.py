"""Image retrieval on revisited Oxford and Paris (revisitop protocol) with frozen CLS features.

    python eval_image_retrieval.py --pretrained_weights out/checkpoint.pth --data_path /path/to/revisitop \\
        --dataset roxford5k --imsize 224 --multiscale true

``<data_path>/<dataset>/jpg/*.jpg`` holds the images and ``<data_path>/<dataset>/gnd_<dataset>.pkl``
the ground truth (``imlist``, ``qimlist``, and per query ``bbx``, ``easy``, ``hard``, ``junk``).
The ground truth is unpickled with ``GroundTruthUnpickler``, which rebuilds only containers, numbers,
strings and numpy arrays (a pickle naming anything else is refused: unpickling it could run code).
Queries are cropped to their box; every image is resized so that its longer side is ``--imsize``;
features are L2-normalised CLS tokens, and the database is ranked by cosine similarity. Results:
mAP and mP@1/5/10 under the Easy, Medium and Hard protocols. DINO's command lines parse: ``--use_cuda``,
``--dist_url`` and ``--local_rank`` (``utils.add_dino_launch_args``).
"""
from __future__ import annotations

import argparse
import builtins
import codecs
import math
import pickle
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

import utils
import vision_transformer as vits
from eval_knn import extract_features, sequential_loader
from transforms_patch import IMAGENET_MEAN, IMAGENET_STD

PROTOCOLS = ("easy", "medium", "hard")
MULTISCALE_FACTORS = (1.0, 1 / math.sqrt(2), 0.5)


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Image retrieval on revisited Oxford / Paris.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--data_path", required=True, type=str,
                        help="Folder holding <dataset>/jpg/*.jpg and <dataset>/gnd_<dataset>.pkl.")
    parser.add_argument("--dataset", default="roxford5k", type=str,
                        help="roxford5k, rparis6k, or any set laid out the same way.")
    parser.add_argument("--imsize", default=224, type=int,
                        help="Longer image side in pixels (DINO's README uses 512 for Paris).")
    parser.add_argument("--multiscale", default=False, type=utils.bool_flag,
                        help="Average features over scales 1, 1/sqrt(2) and 1/2 (then re-normalise).")
    parser.add_argument("--use_faiss", action="store_true", help="Rank the database with faiss (exact).")
    parser.add_argument("--num_workers", default=10, type=int, help="Data-loading processes per GPU.")
    utils.add_device_arg(parser)
    parser.add_argument("--output_dir", default=".", type=str, help="Where retrieval_<dataset>.json is written.")
    utils.add_tensorboard_arg(parser)
    utils.add_dino_launch_args(parser, use_cuda=True)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop at the start, naming the argument, when images would be smaller than one patch."""
    utils.apply_dino_launch_args(args)
    vits.validate_backbone_args(args)
    smallest = smallest_side(args.imsize, args.multiscale)
    if smallest < args.patch_size:
        scale = " at the 1/2 scale of --multiscale" if args.multiscale else ""
        raise ValueError(f"--imsize {args.imsize} gives images of {smallest} pixels{scale}, smaller than one patch "
                         f"(--patch_size {args.patch_size}); raise --imsize")


def smallest_side(side: int, multiscale: bool) -> int:
    """The pixels left of an image side of ``side`` at the smallest scale ``cls_features`` feeds the model."""
    factor = min(MULTISCALE_FACTORS) if multiscale else 1.0
    return math.floor(side * factor)  # what F.interpolate(scale_factor=...) keeps


# ----------------------------------------------------------------------------------------------
# Metrics (revisitop semantics).
# ----------------------------------------------------------------------------------------------
def average_precision(positive_ranks: np.ndarray, num_positives: int) -> float:
    """Average precision from the sorted 0-based ranks of the retrieved positives (trapezoid rule).

    Each positive at rank ``r`` (the ``j``-th found, 0-based) adds the mean of the precision just
    before it (``j / r``, or 1 at rank 0) and at it (``(j + 1) / (r + 1)``), times ``1 / num_positives``.
    Positives never retrieved add nothing. This is the Oxford / Holidays / revisitop definition.
    """
    ap = 0.0
    for found, rank in enumerate(positive_ranks):
        precision_before = 1.0 if rank == 0 else found / rank
        precision_at = (found + 1) / (rank + 1)
        ap += (precision_before + precision_at) / (2 * num_positives)
    return ap


def compute_map(ranks: np.ndarray, gnd: list[dict], kappas=(1, 5, 10)):
    """mAP and mean precision at ``kappas`` over queries, revisitop style.

    Args:
        ranks: ``[n_database, n_queries]``, database indices by decreasing similarity per query.
        gnd: per query a dict with ``ok`` (positive indices) and optionally ``junk`` (ignored ones).

    Returns:
        ``(mAP, aps [n_queries], mean P@k [len(kappas)], P@k [n_queries, len(kappas)])``; queries
        without positives get NaN and are left out of the means.
    """
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), len(kappas)), np.nan)
    for query, entry in enumerate(gnd):
        positives = np.asarray(entry["ok"])
        if positives.size == 0:
            continue
        ranking = ranks[:, query]
        positive_ranks = np.flatnonzero(np.isin(ranking, positives))
        junk_ranks = np.flatnonzero(np.isin(ranking, np.asarray(entry.get("junk", []))))
        # Junk images are removed from the ranking: each positive moves up by the junk above it.
        positive_ranks = positive_ranks - np.searchsorted(junk_ranks, positive_ranks)
        aps[query] = average_precision(positive_ranks, positives.size)
        precisions[query] = _precision_at(positive_ranks + 1, kappas)
    return float(np.nanmean(aps)), aps, np.nanmean(precisions, axis=0), precisions


def _precision_at(positions: np.ndarray, kappas) -> np.ndarray:
    """revisitop's P@k from 1-based positive positions: k is capped at the last positive's position."""
    cut = [min(positions.max(), kappa) for kappa in kappas]
    return np.array([(positions <= k).sum() / k for k in cut])


def protocol_ground_truth(gnd: list[dict], protocol: str) -> list[dict]:
    """Per query ``ok``/``junk`` for the Easy, Medium or Hard protocol."""
    chosen = []
    for entry in gnd:
        easy, hard, junk = (list(entry.get(key, [])) for key in ("easy", "hard", "junk"))
        ok, ignored = {"easy": (easy, junk + hard), "medium": (easy + hard, junk),
                       "hard": (hard, junk + easy)}[protocol]
        chosen.append({"ok": np.asarray(ok, dtype=np.int64), "junk": np.asarray(ignored, dtype=np.int64)})
    return chosen


# ----------------------------------------------------------------------------------------------
# Data and features.
# ----------------------------------------------------------------------------------------------
class ImageList(Dataset):
    """Images from a list of files, optionally cropped to boxes ``(x1, y1, x2, y2)``; yields ``(image, index)``."""

    def __init__(self, files: list[Path], transform, boxes: list | None = None):
        self.files, self.transform, self.boxes = list(files), transform, boxes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = utils.read_rgb_image(self.files[index])
        if self.boxes is not None:
            image = image.crop(tuple(float(v) for v in self.boxes[index]))
        return self.transform(image), index


class ResizeLongerSide:
    """Resize (bicubic, keeping the aspect ratio) so that the longer side is ``size``."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = self.size / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(new_size, Image.BICUBIC)


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How protocol 2 rebuilds ``bytes``: ``_codecs.encode(text, "latin1")``; no other codec is looked up."""
    if encoding != "latin1" or not isinstance(text, str):
        raise RefusedPickleType(f"a ground-truth pickle asks for _codecs.encode with {encoding!r}; only latin1 "
                                "(how pickle stores bytes) is allowed")
    return codecs.encode(text, encoding)


# What a pickle of containers, numbers, strings and numpy arrays (any protocol, numpy 1 or 2) asks to rebuild:
# ``module.name`` -> the object. Protocol 2 spells builtins ``__builtin__`` and stores bytes as ``_codecs.encode``.
SAFE_PICKLE_GLOBALS = {
    **{f"{module}.{name}": getattr(builtins, name)
       for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytes", "bytearray", "complex")},
    "_codecs.encode": _latin1_bytes,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    **{f"{module}.{name}": function
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, function in (("_reconstruct", np.zeros(1).__reduce__()[0]),
                              ("scalar", np.float64(0).__reduce__()[0]))},
    # Protocol 5 stores an array's bytes out of band and rebuilds it with ``numeric._frombuffer``.
    **{f"{module}._frombuffer": np.zeros(1).__reduce_ex__(5)[0] for module in ("numpy.core.numeric",
                                                                               "numpy._core.numeric")},
}


class RefusedPickleType(ValueError):
    """A ground-truth pickle asked for a type outside ``SAFE_PICKLE_GLOBALS``."""


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles only ``SAFE_PICKLE_GLOBALS``: a crafted ``gnd_*.pkl`` (whose ``__reduce__`` would call ``os.system``,
    ``open``, ...) is refused instead of run. The official revisitop files need nothing else."""

    def __init__(self, handle, path: Path):
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = SAFE_PICKLE_GLOBALS.get(f"{module}.{name}")
        if allowed is None:
            raise RefusedPickleType(
                f"{self.path} asks to build {module}.{name} while being unpickled; it is not loaded, because that could "
                "run arbitrary code (a ground-truth file holds only lists, dicts, numbers, strings and numpy arrays). "
                "Use the official file from revisitop, or re-save yours with those types only.")
        return allowed


def load_ground_truth(data_path: str, dataset: str) -> dict:
    """``gnd_<dataset>.pkl`` read safely (``GroundTruthUnpickler``), with ``imlist``, ``qimlist`` and ``gnd``."""
    path = Path(data_path) / dataset / f"gnd_{dataset}.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the revisitop layout <data_path>/{dataset}/"
                                f"gnd_{dataset}.pkl with the images in <data_path>/{dataset}/jpg/")
    try:
        with open(path, "rb") as handle:
            ground_truth = GroundTruthUnpickler(handle, path).load()
    except RefusedPickleType:
        raise
    except Exception as error:  # pickle raises many kinds for truncated or foreign files
        raise ValueError(f"cannot read {path}: {type(error).__name__}: {error}. It is truncated or not a revisitop "
                         "ground-truth pickle; download it again.") from error
    if not isinstance(ground_truth, dict):
        raise ValueError(f"{path} holds a {type(ground_truth).__name__}, not the ground-truth dict of revisitop")
    missing = {"imlist", "qimlist", "gnd"} - set(ground_truth)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    return ground_truth


def check_query_boxes(ground_truth: dict, args: argparse.Namespace) -> None:
    """Refuse, naming the query and its box, a ``bbx`` that crops to nothing (x1 <= x0 or y1 <= y0, after
    PIL's rounding) or to a sliver that is thinner than one patch once resized to ``--imsize``."""
    for index, (name, entry) in enumerate(zip(ground_truth["qimlist"], ground_truth["gnd"])):
        box = entry.get("bbx")
        where = f"query {index} ({name}) in gnd_{args.dataset}.pkl has the box {box}"
        if box is None or len(box) != 4:
            raise ValueError(f"{where}: expected bbx = [x1, y1, x2, y2]; fix the ground truth")
        x0, y0, x1, y1 = (round(float(value)) for value in box)  # as Image.crop rounds it
        width, height = x1 - x0, y1 - y0
        if width <= 0 or height <= 0:
            raise ValueError(f"{where}, which crops to {max(width, 0)}x{max(height, 0)} pixels (x2 <= x1 or "
                             "y2 <= y1): fix that box, or drop the query from the ground truth")
        short = smallest_side(max(1, round(min(width, height) * args.imsize / max(width, height))), args.multiscale)
        if short < args.patch_size:
            raise ValueError(f"{where} ({width}x{height} pixels): resized to --imsize {args.imsize} its shorter side "
                             f"is {short} pixels, under one patch (--patch_size {args.patch_size}); raise --imsize "
                             "or fix that box")


def image_files(data_path: str, dataset: str, names: list[str]) -> list[Path]:
    folder = Path(data_path) / dataset / "jpg"
    files = [folder / f"{name}.jpg" for name in names]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} images listed in the ground truth are missing, e.g. {absent[0]}")
    return files


def crop_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Drop the right and bottom pixels beyond the last whole patch (as DINO's strided patch embedding does)."""
    height, width = images.shape[-2:]
    if height < patch_size or width < patch_size:
        raise ValueError(f"an image of {height}x{width} pixels is smaller than one {patch_size}-pixel patch; "
                         "raise --imsize")
    return images[..., : height - height % patch_size, : width - width % patch_size]


def cls_features(model: vits.VisionTransformer, images: torch.Tensor, multiscale: bool) -> torch.Tensor:
    """L2-normalised CLS features ``[B, D]``, optionally averaged over three scales."""
    factors = MULTISCALE_FACTORS if multiscale else (1.0,)
    total = 0
    for factor in factors:
        scaled = images if factor == 1.0 else F.interpolate(images, scale_factor=factor, mode="bilinear",
                                                            align_corners=False)
        total = total + model(crop_to_patch_multiple(scaled, model.patch_size))
    return F.normalize(total / len(factors), dim=-1)


def rank_database(query_features: torch.Tensor, database_features: torch.Tensor, use_faiss: bool) -> np.ndarray:
    """``[n_database, n_queries]`` database indices by decreasing cosine similarity."""
    if use_faiss:
        import faiss
        index = faiss.IndexFlatIP(database_features.shape[1])
        index.add(database_features.numpy())
        return index.search(query_features.numpy(), len(database_features))[1].T
    similarity = query_features @ database_features.T
    return torch.argsort(similarity, dim=1, descending=True).numpy().T


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def evaluate_protocols(ranks: np.ndarray, gnd: list[dict], kappas=(1, 5, 10)) -> dict:
    results = {}
    for protocol in PROTOCOLS:
        mean_ap, _, mean_precisions, _ = compute_map(ranks, protocol_ground_truth(gnd, protocol), kappas)
        results[protocol] = {"mAP": 100 * mean_ap, **{f"mP@{k}": 100 * p for k, p in zip(kappas, mean_precisions)}}
    return results


def main(args: argparse.Namespace) -> dict:
    """Evaluate; returns ``{protocol: {"mAP", "mP@1", "mP@5", "mP@10"}}`` in percent."""
    validate_args(args)
    output_json = utils.check_output_dir(args.output_dir, "--output_dir") / f"retrieval_{args.dataset}.json"
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    ground_truth = load_ground_truth(args.data_path, args.dataset)
    check_query_boxes(ground_truth, args)
    transform = transforms.Compose([ResizeLongerSide(args.imsize), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    database = ImageList(image_files(args.data_path, args.dataset, ground_truth["imlist"]), transform)
    queries = ImageList(image_files(args.data_path, args.dataset, ground_truth["qimlist"]), transform,
                        boxes=[entry["bbx"] for entry in ground_truth["gnd"]])
    print(f"{args.dataset}: {len(database)} database images, {len(queries)} queries")
    model = vits.build_frozen_backbone(args, img_size=args.imsize).to(device)

    def feature_fn(images):
        return cls_features(model, images, args.multiscale)

    database_features, query_features = (extract_features(feature_fn, sequential_loader(split, 1, args.num_workers),
                                                          device, f"{name} features:")
                                         for split, name in ((database, "Database"), (queries, "Query")))
    results = evaluate_protocols(rank_database(query_features, database_features, args.use_faiss), ground_truth["gnd"])
    for protocol, values in results.items():
        print(f"{args.dataset} {protocol:>6}: " + ", ".join(f"{name} {value:.2f}" for name, value in values.items()))
    summary = {"eval": "retrieval", "dataset": args.dataset, "weights": args.pretrained_weights or "random_init",
               "multiscale": args.multiscale, "imsize": args.imsize, "results": results}
    utils.report_final(summary, output_json, args.tensorboard)
    return results


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
