"""Semantic segmentation from frozen patch tokens: a linear probe and in-context retrieval, scored by mIoU.

    python eval_segmentation.py --pretrained_weights out/checkpoint.pth --arch vit_small --patch_size 16 \\
        --data_path /path/to/VOCdevkit --dataset voc --train_split trainaug
    python eval_segmentation.py --pretrained_weights dino_vits16 --data_path /path/to/ADE --dataset ade20k \\
        --protocol retrieval --memory_size 1024000 --visualize 4 seg_figures

Images and masks are resized to ``--size`` square (images bilinear, masks nearest), as Leopart and the open
Hummingbird code do; predictions are scored at that size. (mmseg's protocol instead slides a window over
images resized by their shorter side and scores at the original resolution: figures from the two protocols
are not interchangeable.) The features are the patch tokens of the last ``--n_last_blocks`` blocks of the
frozen backbone, concatenated.

* ``linear``: features of the training split are extracted once; BatchNorm and a 1x1 linear layer map each
  patch token to class logits, which are upsampled bilinearly to the mask size and trained with
  cross-entropy (ignored pixels left out), SGD with momentum 0.9 and a cosine schedule. With several
  ``--lrs``, one head per learning rate is trained on the training split less a seeded ``--holdout_fraction``
  and scored there; the best is trained again on the whole training split and reported on the val split.
* ``retrieval`` (Balazevic et al. 2023, "Towards In-context Scene Understanding"): a memory bank of training
  patch tokens (each block L2-normalised) with their label distributions (the share of each class among the
  patch's labelled pixels), ``--memory_size`` patches sampled over ``--augment_epochs`` passes of random
  crops and flips of the training images, favouring patches of the classes that are rare in their image
  (open-hummingbird-eval's rule). A val patch takes its ``--k`` most cosine-similar memory patches (exact
  search, faiss or torch), weights them by ``softmax(similarity / --temperature)`` and averages their
  distributions; the result is upsampled bilinearly to pixels and the argmax is the prediction.

Scores are mmseg's: one confusion matrix over the whole split (ignored pixels left out), IoU per class, mIoU
the mean over the classes present in the truth or the prediction, pixel accuracy, and mean class accuracy.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader

import utils
import vision_transformer as vits
from device_augment import normalize
import segmentation_data as sd

PROTOCOLS = ("linear", "retrieval")
QUERY_CHUNK = 4096  # retrieval queries per search: bounds the [queries, k, classes] labels gathered
MIN_PANEL_SIDE = 128  # figure panels are upscaled (nearest) to at least this many pixels


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Semantic segmentation from frozen patch tokens (linear probe, retrieval).")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    sd.add_data_args(parser)
    parser.add_argument("--protocol", default="both", choices=["linear", "retrieval", "both"],
                        help="Which protocol(s) to run.")
    parser.add_argument("--size", default=448, type=int,
                        help="Images and masks are resized to this square side (images bilinear, masks nearest; "
                             "a multiple of --patch_size) and scored at it, as Leopart and open-hummingbird-eval "
                             "do (mmseg slides a window at the original resolution instead).")
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="Patch tokens of this many last blocks, concatenated (each L2-normalised for retrieval).")
    parser.add_argument("--batch_size", default=32, type=int, help="Images per forward pass of the backbone.")
    parser.add_argument("--num_workers", default=4, type=int, help="Data-loading processes.")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the holdout part, the heads, the data order, the crops and the sampling.")
    group = parser.add_argument_group("linear probe")
    group.add_argument("--epochs", default=20, type=int, help="Epochs of the linear heads over the training split.")
    group.add_argument("--lrs", default=[0.01, 0.03, 0.1, 0.3], type=float, nargs="+",
                       help="Learning rates (SGD, momentum 0.9, cosine): one head each on the training split less "
                            "the holdout part, the best on the holdout part retrained on the whole split. One value: "
                            "no sweep.")
    group.add_argument("--holdout_fraction", default=0.1, type=float,
                       help="Share of the training split (seeded) that scores the learning rates.")
    group.add_argument("--linear_batch_size", default=16, type=int, help="Images per step of the linear heads.")
    group = parser.add_argument_group("retrieval")
    group.add_argument("--memory_size", default=1024000, type=int,
                       help="Training patches in the memory bank, spread evenly over images and passes (capped at "
                            "the patches available, with a note).")
    group.add_argument("--augment_epochs", default=1, type=int,
                       help="Passes of random resized crops (--augment_scale, aspect 3/4-4/3) and flips over the "
                            "training images that fill the memory; 0: the resized training images themselves.")
    group.add_argument("--augment_scale", default=(0.5, 1.0), type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="Area range of the memory's random crops, relative to the image.")
    group.add_argument("--k", default=30, type=int, help="Nearest memory patches per val patch.")
    group.add_argument("--temperature", default=0.02, type=float,
                       help="Neighbour weights softmax(cosine / T).")
    group.add_argument("--knn_backend", default="faiss", choices=["faiss", "torch"],
                       help="Exact nearest-neighbour search: faiss (CPU, inner product) or torch (chunked matrix "
                            "products on --device, e.g. a GPU). Same neighbours.")
    utils.add_device_arg(parser)
    parser.add_argument("--output_json", default="", type=str, help="Also write the results to this JSON file.")
    utils.add_tensorboard_arg(parser)
    parser.add_argument("--save_masks", default="", type=str,
                        help="Write every val prediction as a palette PNG, DIR/<protocol>/<stem>.png, in the "
                             "dataset's own mask values, at --size.")
    parser.add_argument("--visualize", default=None, nargs=2, metavar=("N", "DIR"),
                        help="Draw N val images, evenly spaced: image, truth and each protocol's prediction side by "
                             "side, as DIR/segmentation_*.png.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop early, naming the argument, on settings that cannot work."""
    vits.validate_backbone_args(args)
    if args.size < args.patch_size or args.size % args.patch_size:
        raise ValueError(f"--size {args.size} must be a positive multiple of --patch_size {args.patch_size}")
    for name in ("n_last_blocks", "batch_size", "epochs", "linear_batch_size", "memory_size", "k", "temperature"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.augment_epochs < 0 or args.num_workers < 0:
        raise ValueError("--augment_epochs and --num_workers must be 0 or more")
    if any(lr <= 0 for lr in args.lrs):
        raise ValueError(f"--lrs must be positive, got {args.lrs}")
    if len(args.lrs) > 1 and not 0 < args.holdout_fraction < 1:
        raise ValueError(f"--holdout_fraction must lie in (0, 1) to choose among --lrs, got {args.holdout_fraction}")
    low, high = args.augment_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--augment_scale {low} {high} must satisfy 0 < MIN <= MAX <= 1")
    if not args.data_path:
        raise ValueError("--data_path is required")
    if utils.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise RuntimeError("eval_segmentation.py runs in one process (one GPU or the CPU): start it with python, "
                           "not torchrun with several processes")
    utils.visualization_request(args.visualize)



def protocols_of(args: argparse.Namespace) -> tuple[str, ...]:
    return PROTOCOLS if args.protocol == "both" else (args.protocol,)


# ----------------------------------------------------------------------------------------------
# Scores (mmseg's definitions).
# ----------------------------------------------------------------------------------------------
def confusion_matrix(truth: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``[C, C]`` counts, rows the true class, columns the predicted one, of pixels whose truth is a class
    (ignored pixels, ``truth == num_classes``, are left out). Any matching shapes."""
    keep = truth < num_classes
    pairs = truth[keep].long() * num_classes + prediction[keep].long()
    return torch.bincount(pairs.cpu(), minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, class_names: tuple[str, ...]) -> dict:
    """mIoU, pixel accuracy and mean class accuracy in percent, and the per-class table, from ``confusion``.

    A class's IoU is ``TP / (TP + FP + FN)``; the mean leaves out classes with no pixel in truth and prediction
    (IoU 0/0), as mmseg's ``nanmean`` does. Class accuracy is ``TP / truth pixels`` (None without any).
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    truth_pixels, predicted_pixels = confusion.sum(dim=1), confusion.sum(dim=0)
    union = truth_pixels + predicted_pixels - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    accuracy = torch.where(truth_pixels > 0, true_positive / truth_pixels.clamp(min=1),
                           torch.full_like(union, float("nan")))
    total = float(truth_pixels.sum())
    per_class = [{"class": name, "iou": _percent(iou[c]), "accuracy": _percent(accuracy[c]),
                  "pixels": int(truth_pixels[c])} for c, name in enumerate(class_names)]
    return {"mIoU": _percent(iou.nanmean()), "pixel_accuracy": 100.0 * float(true_positive.sum()) / total
            if total else None, "mean_accuracy": _percent(accuracy.nanmean()),
            "classes_scored": int((union > 0).sum()), "pixels": int(total), "per_class": per_class}


def _percent(value: torch.Tensor) -> float | None:
    return None if torch.isnan(value) else 100.0 * float(value)


# ----------------------------------------------------------------------------------------------
# Features.
# ----------------------------------------------------------------------------------------------
def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type holding the classes and the ignored label ``num_classes``."""
    return torch.uint8 if num_classes <= 255 else torch.int16 if num_classes < 2 ** 15 else torch.int32


def patch_token_function(model: vits.VisionTransformer, n_last_blocks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised images ``[B, 3, S, S]`` -> patch tokens of the last n blocks, concatenated, ``[B, N, n * D]``."""
    def tokens(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([block[:, 1:] for block in model.get_intermediate_layers(images, n_last_blocks)], dim=-1)

    return tokens


def checked_batches(dataset: sd.SegmentationSamples, batch_size: int, num_workers: int,
                    header: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``dataset``, with progress under ``header``; a file problem a worker reported
    is raised here, in the main process, by name (a worker's own exception would reach the user as a traceback)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=sd.collate,
                        pin_memory=torch.cuda.is_available())
    for images, labels, problems in utils.progress(loader, header):
        sd.raise_problems(problems)
        yield images, labels


@torch.no_grad()
def extract(dataset: sd.SegmentationSamples, feature_fn: Callable, args: argparse.Namespace, device: torch.device,
            header: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features [B, N, F] float32 on the CPU, labels [B, S, S] int64)`` of ``dataset``, batch by batch."""
    for images, labels in checked_batches(dataset, args.batch_size, args.num_workers, header):
        yield feature_fn(normalize(images.to(device, non_blocking=True))).float().cpu(), labels


def extract_all(dataset: sd.SegmentationSamples, feature_fn: Callable, args: argparse.Namespace,
                device: torch.device, num_classes: int, header: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[M, N, F]`` (float16, to halve the memory) and labels ``[M, S, S]`` of a whole split."""
    features, labels = [], []
    for batch_features, batch_labels in extract(dataset, feature_fn, args, device, header):
        features.append(batch_features.half())
        labels.append(batch_labels.to(label_dtype(num_classes)))
    return torch.cat(features), torch.cat(labels)


def check_all_labels(samples: list[sd.Sample], layout: sd.Layout, args: argparse.Namespace, what: str) -> None:
    """Read every mask of a split (values, sizes) before any model runs, so a bad file stops the run early."""
    dataset = sd.SegmentationSamples(samples, layout, args.size, labels_only=True)
    for _ in checked_batches(dataset, 64, args.num_workers, f"Checking {what} masks:"):
        pass


# ----------------------------------------------------------------------------------------------
# Linear probe.
# ----------------------------------------------------------------------------------------------
def patch_maps(values: torch.Tensor) -> torch.Tensor:
    """Per-patch values ``[B, N, F]`` (patches row-major on a square grid) -> maps ``[B, F, g, g]``."""
    batch, count, dim = values.shape
    grid = math.isqrt(count)
    return values.transpose(1, 2).reshape(batch, dim, grid, grid)


class LinearSegmentationHeads(nn.Module):
    """One BatchNorm + 1x1 linear layer per learning rate, all reading the same patch tokens."""

    def __init__(self, dim: int, num_classes: int, count: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, 1))
                                   for _ in range(count))
        for head in self.heads:
            nn.init.normal_(head[1].weight, mean=0.0, std=0.01)
            nn.init.zeros_(head[1].bias)

    def forward(self, tokens: torch.Tensor, size: int) -> list[torch.Tensor]:
        """Patch tokens ``[B, N, F]`` -> per head, logits upsampled bilinearly to ``[B, C, size, size]``."""
        maps = patch_maps(tokens)
        return [F.interpolate(head(maps), size=(size, size), mode="bilinear", align_corners=False)
                for head in self.heads]


def train_heads(features: torch.Tensor, labels: torch.Tensor, lrs: list[float], num_classes: int,
                args: argparse.Namespace, device: torch.device, header: str) -> LinearSegmentationHeads:
    """Heads (one per lr) trained on ``features [M, N, F]`` and ``labels [M, S, S]`` for ``--epochs``."""
    generator = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        heads = LinearSegmentationHeads(features.shape[-1], num_classes, len(lrs)).to(device)
    optimizers = [torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9) for head, lr in zip(heads.heads, lrs)]
    steps_per_epoch = math.ceil(len(features) / args.linear_batch_size)
    total, step = args.epochs * steps_per_epoch, 0
    epochs_done = utils.Progress(args.epochs)
    heads.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(features), generator=generator)
        losses = torch.zeros(len(lrs))
        for start in range(0, len(order), args.linear_batch_size):
            index = order[start:start + args.linear_batch_size]
            target = labels[index].to(device).long()
            logits = heads(features[index].to(device).float(), labels.shape[-1])
            # Summed, then divided by the labelled pixels: the mean, and 0 (not NaN) for a batch with none.
            labelled = (target < num_classes).sum().clamp(min=1)
            loss = torch.stack([F.cross_entropy(head_logits, target, ignore_index=num_classes, reduction="sum")
                                for head_logits in logits]) / labelled
            for optimizer, lr in zip(optimizers, lrs):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # the heads share no parameters: each gets its own loss's gradient
            for optimizer in optimizers:
                optimizer.step()
            losses += loss.detach().cpu()
            step += 1
        values = ", ".join(f"lr {lr:g}: {value:.4f}" for lr, value in zip(lrs, (losses / steps_per_epoch).tolist()))
        epochs_done.advance()
        print(f"{header} epoch {epoch + 1}/{args.epochs}: loss {values}  {epochs_done.times()}", flush=True)
    return heads.eval()


def linear_predictor(heads: LinearSegmentationHeads, head: int, size: int, device: torch.device) -> Callable:
    """Tokens ``[B, N, F]`` -> labels ``[B, size, size]`` by head number ``head``."""
    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        maps = patch_maps(tokens.to(device).float())
        logits = F.interpolate(heads.heads[head](maps), size=(size, size), mode="bilinear", align_corners=False)
        return logits.argmax(dim=1).cpu()

    return predict


def holdout_split(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, holdout)`` indices of a seeded split of ``count`` items; the holdout part has at least one."""
    if count < 2:
        raise ValueError(f"choosing among several --lrs needs at least 2 training images, got {count}; give one lr")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(utils.derived_seed(seed, 1)))
    held = min(count - 1, max(1, round(fraction * count)))
    return order[held:].sort().values, order[:held].sort().values


def run_linear(train: tuple[torch.Tensor, torch.Tensor], layout: sd.Layout, args: argparse.Namespace,
               device: torch.device) -> tuple[Callable, dict]:
    """Choose the learning rate on the holdout part, retrain on the whole split; returns the predictor and
    ``{"lr", "holdout_mIoU": {lr: mIoU}}``."""
    features, labels = train
    sweep = {}
    lr = args.lrs[0]
    if len(args.lrs) > 1:
        fit, held = holdout_split(len(features), args.holdout_fraction, args.seed)
        heads = train_heads(features[fit], labels[fit], args.lrs, layout.num_classes, args, device, "Linear sweep")
        for index, value in enumerate(args.lrs):
            confusion = score(linear_predictor(heads, index, args.size, device), features[held], labels[held],
                              layout.num_classes, args.linear_batch_size)
            sweep[f"{value:g}"] = segmentation_scores(confusion, layout.class_names)["mIoU"]
        best = max(sweep.values(), key=lambda v: -1 if v is None else v)
        lr = args.lrs[list(sweep.values()).index(best)]
        print(f"Linear: holdout mIoU by lr ({len(held)} of {len(features)} training images): "
              + ", ".join(f"{k}: {_fmt(v)}" for k, v in sweep.items()) + f"; chosen lr {lr:g}", flush=True)
    heads = train_heads(features, labels, [lr], layout.num_classes, args, device, "Linear")
    return linear_predictor(heads, 0, args.size, device), {"lr": lr, "holdout_mIoU": sweep}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------------------------
# Retrieval (Hummingbird).
# ----------------------------------------------------------------------------------------------
def retrieval_features(tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Concatenated tokens ``[..., n * D]`` -> each block's part L2-normalised, scaled by 1/sqrt(n): unit
    vectors whose inner product is the mean of the blocks' cosines."""
    parts = tokens.float().chunk(n_blocks, dim=-1)
    return torch.cat([F.normalize(part, dim=-1) for part in parts], dim=-1) / math.sqrt(n_blocks)


def patch_label_counts(labels: torch.Tensor, patch_size: int, num_classes: int) -> torch.Tensor:
    """Pixels of each class in each patch: labels ``[B, S, S]`` -> int64 ``[B, N, C]`` (patches row-major;
    ignored pixels not counted)."""
    batch, size, _ = labels.shape
    grid = size // patch_size
    patches = labels.long().reshape(batch, grid, patch_size, grid, patch_size).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(batch * grid * grid, patch_size * patch_size)
    offsets = torch.arange(batch * grid * grid)[:, None] * (num_classes + 1)
    counts = torch.bincount((patches + offsets).flatten(), minlength=batch * grid * grid * (num_classes + 1))
    return counts.reshape(batch, grid * grid, num_classes + 1)[..., :num_classes]


def rare_class_scores(counts: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """open-hummingbird-eval's sampling scores ``[B, N]`` (lowest first) from ``counts [B, N, C]``: a patch scores
    the sum, over the classes present in it, of the number of the image's patches holding that class, times
    uniform noise ``[B, N]``; patches without a labelled pixel score infinity (never sampled)."""
    present = (counts > 0).float()
    scores = torch.einsum("bnc,bc->bn", present, present.sum(dim=1)) * noise
    return scores.masked_fill(present.sum(dim=-1) == 0, float("inf"))


def sample_memory_patches(counts: torch.Tensor, per_image: int, seed: int, epoch: int,
                          first_index: int) -> torch.Tensor:
    """bool ``[B, N]``: the ``per_image`` lowest-scoring labelled patches of each image (fewer when it has
    fewer). The noise of image i is drawn from a generator seeded by ``(seed, epoch, i)``."""
    batch, count, _ = counts.shape
    noise = torch.stack([torch.rand(count, generator=torch.Generator().manual_seed(
        utils.derived_seed(seed, epoch, first_index + i, 2))) for i in range(batch)])
    scores = rare_class_scores(counts, noise)
    chosen = torch.zeros(batch, count, dtype=torch.bool)
    lowest = scores.topk(min(per_image, count), dim=1, largest=False)
    chosen.scatter_(1, lowest.indices, torch.isfinite(lowest.values))
    return chosen


def memory_plan(images: int, passes: int, patches: int, memory_size: int) -> int:
    """Patches to take per image and pass; says when ``memory_size`` exceeds what is available (then all)."""
    available = images * passes * patches
    if memory_size >= available:
        print(f"note: --memory_size {memory_size} is at least the {available} training patches available "
              f"({images} images x {passes} pass(es) x {patches} patches): the memory holds all labelled ones",
              flush=True)
        return patches
    return max(1, memory_size // (images * passes))


def build_memory(batches: Iterator[tuple[int, int, torch.Tensor, torch.Tensor]], per_image: int, layout: sd.Layout,
                 args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory bank from ``(pass, first image index, tokens [B, N, F], labels [B, S, S])`` batches:
    features ``[P, F]`` (unit vectors) and label distributions ``[P, C]`` (rows sum to 1)."""
    features, distributions = [], []
    for epoch, first, tokens, labels in batches:
        counts = patch_label_counts(labels, args.patch_size, layout.num_classes)
        chosen = sample_memory_patches(counts, per_image, args.seed, epoch, first)
        features.append(retrieval_features(tokens, args.n_last_blocks)[chosen])
        kept = counts[chosen].double()
        distributions.append((kept / kept.sum(dim=-1, keepdim=True)).float())
    return torch.cat(features), torch.cat(distributions)


def memory_batches(train_samples: list[sd.Sample], train: tuple[torch.Tensor, torch.Tensor] | None,
                   layout: sd.Layout, feature_fn: Callable, args: argparse.Namespace,
                   device: torch.device) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The training batches the memory is sampled from: stored features of the resized images when
    ``--augment_epochs`` is 0 (extracted here if ``train`` is None), else ``--augment_epochs`` passes of
    seeded crops and flips."""
    if args.augment_epochs == 0:
        if train is None:
            dataset = sd.SegmentationSamples(train_samples, layout, args.size)
            train = extract_all(dataset, feature_fn, args, device, layout.num_classes, "Memory features:")
        for start in range(0, len(train[0]), args.batch_size):
            yield 0, start, train[0][start:start + args.batch_size], train[1][start:start + args.batch_size]
        return
    for epoch in range(args.augment_epochs):
        dataset = sd.SegmentationSamples(train_samples, layout, args.size, augment_pass=epoch,
                                         scale=tuple(args.augment_scale), seed=args.seed)
        start = 0
        for tokens, labels in extract(dataset, feature_fn, args, device,
                                      f"Memory pass {epoch + 1}/{args.augment_epochs}:"):
            yield epoch, start, tokens, labels
            start += len(tokens)


class NearestNeighbours:
    """Exact top-k inner-product search over the memory features ``[P, F]`` (faiss, or torch on a device)."""

    def __init__(self, memory: torch.Tensor, backend: str, device: torch.device):
        self.backend, self.device = backend, device
        if backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatIP(memory.shape[1])
            self.index.add(memory.contiguous().numpy())
        else:
            self.memory = memory.to(device)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(similarities [Q, k] float32, indices [Q, k] int64)`` on the CPU, most similar first."""
        if self.backend == "faiss":
            similarities, indices = self.index.search(queries.contiguous().numpy(), k)
            return torch.from_numpy(similarities), torch.from_numpy(indices).long()
        similarities, indices = (queries.to(self.device) @ self.memory.T).topk(k, dim=1)
        return similarities.cpu(), indices.cpu()


def retrieval_predictor(memory: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
                        device: torch.device) -> Callable:
    """Tokens ``[B, N, F]`` -> labels ``[B, S, S]`` by soft label transfer from the memory's nearest patches."""
    features, distributions = memory
    search = NearestNeighbours(features, args.knn_backend, device)
    k = min(args.k, len(features))
    if k < args.k:
        print(f"note: --k {args.k} exceeds the {len(features)} memory patches; using k = {k}", flush=True)

    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        batch, count, _ = tokens.shape
        queries = retrieval_features(tokens, args.n_last_blocks).reshape(batch * count, -1)
        soft = torch.cat([transfer_labels(*search.search(chunk, k), distributions, args.temperature)
                          for chunk in queries.split(QUERY_CHUNK)])
        maps = patch_maps(soft.reshape(batch, count, -1))
        return F.interpolate(maps, size=(args.size, args.size), mode="bilinear", align_corners=False).argmax(dim=1)

    return predict


def transfer_labels(similarities: torch.Tensor, indices: torch.Tensor, distributions: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Soft labels ``[Q, C]``: the neighbours' distributions ``[P, C]`` (at ``indices [Q, k]``) weighted by
    ``softmax(similarities [Q, k] / temperature)``."""
    weights = torch.softmax(similarities / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, distributions[indices])


def run_retrieval(train_samples: list[sd.Sample], train: tuple[torch.Tensor, torch.Tensor] | None,
                  layout: sd.Layout, feature_fn: Callable, patches: int, args: argparse.Namespace,
                  device: torch.device) -> tuple[Callable, dict]:
    """Build the memory and its predictor; returns it with ``{"memory_patches", "per_image", ...}``."""
    passes = max(1, args.augment_epochs)
    per_image = memory_plan(len(train_samples), passes, patches, args.memory_size)
    memory = build_memory(memory_batches(train_samples, train, layout, feature_fn, args, device), per_image, layout,
                          args)
    if len(memory[0]) == 0:
        raise ValueError("the memory bank is empty: no training patch holds a labelled pixel")
    print(f"Retrieval memory: {len(memory[0])} patches ({per_image} per image and pass, {passes} pass(es))",
          flush=True)
    return retrieval_predictor(memory, args, device), {"memory_patches": len(memory[0]),
                                                       "per_image": per_image, "k": min(args.k, len(memory[0]))}


# ----------------------------------------------------------------------------------------------
# Scoring predictions, masks and figures.
# ----------------------------------------------------------------------------------------------
def score(predict: Callable, features: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int,
          on_batch: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The confusion matrix of ``predict`` (tokens -> labels) over stored ``features`` and ``labels``;
    ``on_batch(first index, predictions)`` sees every batch."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(features), batch_size):
        prediction = predict(features[start:start + batch_size].float())
        truth = labels[start:start + batch_size].long()
        confusion += confusion_matrix(truth, prediction, num_classes)
        if on_batch is not None:
            on_batch(start, prediction)
    return confusion


class PredictionSink:
    """Keeps what the figures need and writes ``--save_masks`` PNGs as predictions arrive."""

    def __init__(self, samples: list[sd.Sample], layout: sd.Layout, keep: list[int], mask_dir: Path | None):
        self.samples, self.layout, self.keep, self.mask_dir = samples, layout, set(keep), mask_dir
        self.kept: dict[str, dict[int, torch.Tensor]] = {}

    def for_protocol(self, protocol: str) -> Callable[[int, torch.Tensor], None]:
        folder = self.mask_dir / protocol if self.mask_dir else None
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
        kept = self.kept.setdefault(protocol, {})

        def receive(first: int, predictions: torch.Tensor) -> None:
            for offset, prediction in enumerate(predictions):
                index = first + offset
                if index in self.keep:
                    kept[index] = prediction.clone()
                if folder:
                    values = self.layout.to_value(prediction.numpy())
                    utils.write_indexed_png(folder / f"{self.samples[index].stem}.png", values)

        return receive


def colour_labels(labels: np.ndarray, num_classes: int) -> Image.Image:
    """Labels ``[S, S]`` as an RGB image in the VOC palette; ignored pixels in VOC's void colour (index 255)."""
    palette = utils.voc_palette()
    indices = np.where(labels == num_classes, 255, labels % 255)
    return Image.fromarray(palette[indices])


def render_segmentation(image: torch.Tensor, truth: torch.Tensor, predictions: dict[str, torch.Tensor],
                        num_classes: int, title: str) -> Image.Image:
    """Image, truth and each prediction side by side, upscaled (nearest), with captions.

    ``image`` uint8 ``[3, S, S]``; ``truth`` and predictions ``[S, S]`` internal labels.
    """
    side = image.shape[-1]
    zoom = max(1, math.ceil(MIN_PANEL_SIDE / side))
    panels = {"image": Image.fromarray(image.permute(1, 2, 0).numpy()),
              "truth": colour_labels(truth.numpy(), num_classes)}
    panels.update({name: colour_labels(prediction.numpy(), num_classes) for name, prediction in predictions.items()})
    margin, header, caption = 8, 24, 16
    width = side * zoom
    canvas = Image.new("RGB", (margin + len(panels) * (width + margin), header + caption + width + margin), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((margin, 5), title, fill="black", font=font)
    for number, (name, panel) in enumerate(panels.items()):
        x = margin + number * (width + margin)
        draw.text((x, header), name, fill="black", font=font)
        canvas.paste(panel.resize((width, width), Image.NEAREST), (x, header + caption))
    return canvas


def save_visualizations(sink: PredictionSink, samples: list[sd.Sample], layout: sd.Layout, chosen: list[int],
                        results: dict, args: argparse.Namespace, folder: Path) -> list[Path]:
    """``folder/segmentation_000.png`` ... for the ``chosen`` val images."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = sd.SegmentationSamples(samples, layout, args.size)
    paths = []
    for number, index in enumerate(chosen):
        image, truth = dataset.load(index)
        predictions = {}
        for protocol, kept in sink.kept.items():
            confusion = confusion_matrix(truth, kept[index], layout.num_classes)
            miou = segmentation_scores(confusion, layout.class_names)["mIoU"]
            predictions[f"{protocol} ({_fmt(miou)} mIoU)"] = kept[index]
        title = f"{samples[index].stem} (split mIoU: " + ", ".join(
            f"{name} {_fmt(result['mIoU'])}" for name, result in results.items()) + ")"
        paths.append(folder / f"segmentation_{number:03}.png")
        utils.save_image(render_segmentation(image, truth, predictions, layout.num_classes, title), paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def load_splits(args: argparse.Namespace) -> tuple[sd.Layout, list[sd.Sample], list[sd.Sample]]:
    """The layout and the samples of the training and val splits, every mask checked."""
    layout = sd.resolve_layout(args.data_path, args.dataset, args.num_classes, args.ignore_index)
    default_train, default_val = sd.DEFAULT_SPLITS[args.dataset]
    args.train_split, args.val_split = args.train_split or default_train, args.val_split or default_val
    train_samples, val_samples = sd.list_samples(layout, args.train_split), sd.list_samples(layout, args.val_split)
    if args.train_split == args.val_split:
        print(f"warning: --train_split and --val_split are both {args.val_split!r}: the scores are on the images the "
              "probe and the memory learned from", flush=True)
    check_all_labels(train_samples, layout, args, args.train_split)
    check_all_labels(val_samples, layout, args, args.val_split)
    print(f"Data: {args.dataset} at {layout.root}: {len(train_samples)} {args.train_split} and {len(val_samples)} "
          f"{args.val_split} images, {layout.num_classes} classes, resized to {args.size}x{args.size}", flush=True)
    return layout, train_samples, val_samples


def run_protocols(args: argparse.Namespace, layout: sd.Layout, train_samples: list[sd.Sample],
                  val_samples: list[sd.Sample], feature_fn: Callable, device: torch.device
                  ) -> tuple[dict, PredictionSink, list[int]]:
    """Extract, fit and score every protocol; returns the results per protocol, the sink and the figure indices."""
    val = extract_all(sd.SegmentationSamples(val_samples, layout, args.size), feature_fn, args, device,
                      layout.num_classes, "Val features:")
    train = None
    if "linear" in protocols_of(args) or args.augment_epochs == 0:
        train = extract_all(sd.SegmentationSamples(train_samples, layout, args.size), feature_fn, args, device,
                            layout.num_classes, "Train features:")
    request = utils.visualization_request(args.visualize)
    chosen = [] if request is None else torch.linspace(0, len(val_samples) - 1, min(request[0], len(val_samples))
                                                       ).round().long().unique().tolist()
    sink = PredictionSink(val_samples, layout, chosen, Path(args.save_masks) if args.save_masks else None)
    results = {}
    for protocol in protocols_of(args):
        if protocol == "linear":
            predict, details = run_linear(train, layout, args, device)
        else:
            predict, details = run_retrieval(train_samples, train, layout, feature_fn, val[0].shape[1], args, device)
        confusion = score(predict, *val, layout.num_classes, args.linear_batch_size, sink.for_protocol(protocol))
        results[protocol] = {**segmentation_scores(confusion, layout.class_names), **details}
    return results, sink, chosen


def settings_of(args: argparse.Namespace) -> dict:
    names = ("data_path", "dataset", "train_split", "val_split", "arch", "patch_size", "checkpoint_key", "size",
             "n_last_blocks", "seed", "epochs", "lrs", "holdout_fraction", "linear_batch_size", "memory_size",
             "augment_epochs", "augment_scale", "k", "temperature", "knn_backend")
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in ((name, getattr(args, name)) for name in names)}


def check_outputs(args: argparse.Namespace) -> None:
    """Stop before any work when ``--output_json``, ``--tensorboard``, ``--save_masks`` (with its protocol folders) or
    the folder of ``--visualize`` cannot be written: a file in the way, a read-only or full disk. Creates nothing."""
    if args.output_json:
        utils.check_output_file(args.output_json, "--output_json")
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    if args.save_masks:
        utils.check_output_dir(args.save_masks, "--save_masks")
        for protocol in protocols_of(args):
            utils.check_output_dir(Path(args.save_masks) / protocol, f"the {protocol} masks folder of --save_masks")
    request = utils.visualization_request(args.visualize)
    if request:
        utils.check_output_dir(request[1], "the folder of --visualize N DIR")


def format_summary(summary: dict) -> str:
    """The per-class IoU table and the headline scores of every protocol."""
    protocols = [name for name in PROTOCOLS if name in summary]
    lines = [f"Segmentation of {summary['weights']} on {summary['val_images']} {summary['settings']['val_split']} "
             f"images ({summary['settings']['size']} px, patch {summary['settings']['patch_size']}):",
             f"  {'class':<20}{'pixels':>10}" + "".join(f"{name + ' IoU':>16}" for name in protocols)]
    for c, name in enumerate(summary["class_names"]):
        cells = "".join(f"{_fmt(summary[p]['per_class'][c]['iou']):>16}" for p in protocols)
        lines.append(f"  {name[:19]:<20}{summary[protocols[0]]['per_class'][c]['pixels']:>10}{cells}")
    for key, label in (("mIoU", "mIoU"), ("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy")):
        lines.append(f"  {label:<30}" + "".join(f"{_fmt(summary[p][key]):>16}" for p in protocols))
    if "linear" in summary:
        lines.append(f"  linear: lr {summary['linear']['lr']:g}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; prints the table and a ``FINAL {json}`` line, returns the summary dict."""
    validate_args(args)
    check_outputs(args)
    layout, train_samples, val_samples = load_splits(args)
    if args.save_masks and layout.label_offset + layout.num_classes - 1 > 255:
        raise ValueError(f"--save_masks writes 8-bit palette PNGs, which cannot hold the {layout.num_classes} "
                         "classes of this dataset; leave --save_masks out")
    device = utils.resolve_device(args.device)
    model = vits.build_frozen_backbone(args, img_size=args.size).to(device)
    if args.n_last_blocks > len(model.blocks):
        raise ValueError(f"--n_last_blocks {args.n_last_blocks} exceeds the model's {len(model.blocks)} blocks")
    feature_fn = patch_token_function(model, args.n_last_blocks)
    results, sink, chosen = run_protocols(args, layout, train_samples, val_samples, feature_fn, device)
    summary = {"eval": "segmentation", "weights": args.pretrained_weights or "random_init",
               "settings": settings_of(args), "train_images": len(train_samples), "val_images": len(val_samples),
               "num_classes": layout.num_classes, "class_names": list(layout.class_names), **results}
    request = utils.visualization_request(args.visualize)
    if request:
        save_visualizations(sink, val_samples, layout, chosen, results, args, request[1])
    print(format_summary(summary))
    utils.report_final(summary, args.output_json, args.tensorboard)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
