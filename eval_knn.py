"""Weighted k-NN classification on frozen CLS features (DINO's protocol).

    python eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/dataset
    torchrun --nproc_per_node=4 eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/dataset

``--data_path`` holds ``train/<class>/*`` and ``val/<class>/*``. Features are the teacher
backbone's CLS tokens, L2-normalised; each test image takes the ``k`` most cosine-similar training
images, which vote for their class with weight ``exp(similarity / T)``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import utils
import vision_transformer as vits
from transforms_patch import eval_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("k-NN evaluation on frozen features")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--data_path", default="", type=str,
                        help="Dataset root with train/<class>/* and val/<class>/* images.")
    parser.add_argument("--val_split", default="val", type=str,
                        help="Folder under --data_path to evaluate on: val (report), or holdout to tune settings "
                             "(prepare_data.py --holdout) without looking at val.")
    parser.add_argument("--resize_size", default=256, type=int,
                        help="Shorter side after resizing, before the centre crop.")
    parser.add_argument("--crop_size", default=224, type=int,
                        help="Side of the centre crop fed to the model; use the training resolution "
                             "(e.g. 32 for CIFAR-sized models). A multiple of the patch size.")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Numbers of neighbours to evaluate (each gives one result). A k above the number "
                             "of training images N is evaluated as N (every image votes), with a warning, and "
                             "reported under N: the printed lines and the FINAL json name the k actually used.")
    parser.add_argument("--temperature", default=0.07, type=float, help="T in the vote weight exp(sim / T).")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and forward pass.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data-loading processes per GPU.")
    utils.add_device_arg(parser)
    parser.add_argument("--use_faiss", action="store_true",
                        help="Search neighbours with faiss (exact inner product) instead of a torch matrix "
                             "product; same answers, less memory for large training sets.")
    parser.add_argument("--dump_features", default="", type=str,
                        help="Save the extracted features and labels to this folder.")
    parser.add_argument("--load_features", default="", type=str,
                        help="Load features saved by --dump_features instead of running a model.")
    parser.add_argument("--output_json", default="", type=str, help="Also write the results to this JSON file.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    if args.load_features:
        return
    vits.validate_backbone_args(args)
    if not args.data_path:
        raise ValueError("--data_path is required unless --load_features is given")
    if args.crop_size % args.patch_size:
        raise ValueError(f"--crop_size {args.crop_size} is not a multiple of --patch_size {args.patch_size}")
    if any(k <= 0 for k in args.nb_knn) or args.temperature <= 0:
        raise ValueError("--nb_knn values and --temperature must be positive")


# ----------------------------------------------------------------------------------------------
# Data and features (shared by the other evaluation scripts).
# ----------------------------------------------------------------------------------------------
class IndexedImageFolder(utils.ImageFolderDataset):
    """ImageFolder yielding ``(image, index)`` so that features gathered across processes land in place."""

    def __getitem__(self, index: int):
        image, _ = super().__getitem__(index)
        return image, index


def build_split(data_path: str | Path, split: str, transform,
                dataset_class=utils.ImageFolderDataset) -> utils.ImageFolderDataset:
    """``<data_path>/<split>/<class>/*`` as an ImageFolder, with an error that names the layout; files are
    listed by ``utils.ImageFolderDataset``'s rule (hidden ones ignored, symlinks once, unreadable folders
    named) and read by ``utils.read_rgb_image`` (16-bit and palette images converted, unreadable ones named)."""
    folder = Path(data_path) / split
    if not folder.is_dir():
        fix = " (a holdout split is written by prepare_data.py --holdout N)" if split == "holdout" else ""
        raise FileNotFoundError(f"{folder} not found: the dataset must be laid out as "
                                f"{data_path}/train/<class>/* and {data_path}/{split}/<class>/*{fix}")
    return dataset_class(str(folder), transform=transform, loader=utils.read_rgb_image)


def sequential_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Each process reads its own share of ``dataset`` in order (padded to equal shares)."""
    sampler = DistributedSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=False)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False)


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                     device: torch.device) -> torch.Tensor:
    """Features ``[N, D]`` (float32, CPU) of every item of ``loader.dataset``, gathered over processes.

    ``loader`` yields ``(images, indices)``; ``feature_fn`` maps images ``[B, 3, H, W]`` to ``[B, D]``.
    """
    logger = utils.MetricLogger()
    local_features, local_indices = [], []
    for images, indices in logger.log_every(loader, 20, "Features:"):
        local_features.append(feature_fn(images.to(device, non_blocking=True)).float())
        local_indices.append(indices.to(device))
    features, indices = torch.cat(local_features), torch.cat(local_indices)
    if utils.is_distributed():
        features, indices = _all_gather_cat(features), _all_gather_cat(indices)
    gathered = torch.zeros(len(loader.dataset), features.shape[1])
    gathered[indices.cpu()] = features.cpu()
    return gathered


def _all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(utils.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# The classifier.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int, use_faiss: bool = False,
                   chunk_size: int = 1024) -> tuple[float, float]:
    """Weighted k-NN: top-1 and top-5 accuracy in percent.

    Args:
        train_features: ``[N, D]``; test_features: ``[M, D]`` (any M, normalised here).
        train_labels: ``[N]``; test_labels: ``[M]`` (int64 class indices).
        k: neighbours (at most N are used); T: vote temperature; num_classes: number of classes.
        use_faiss: exact inner-product search with faiss instead of torch.
    """
    train, test = F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    search = _faiss_search(train, k) if use_faiss else (lambda queries: (queries @ train.T).topk(k, dim=1))
    train_labels = train_labels.to(train.device)
    top1 = top5 = 0
    for start in range(0, len(test), chunk_size):
        queries, targets = test[start:start + chunk_size], test_labels[start:start + chunk_size].to(train.device)
        similarities, neighbours = search(queries)
        votes = torch.zeros(len(queries), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarities / T).exp())
        top_votes, predictions = votes.topk(min(5, num_classes), dim=1)
        correct = (predictions == targets[:, None]) & (top_votes > 0)  # classes without votes are no guess
        top1 += correct[:, 0].sum().item()
        top5 += correct.any(dim=1).sum().item()
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def _faiss_search(train: torch.Tensor, k: int):
    """A function ``queries -> (similarities, indices)`` of the top ``k``, over an exact faiss inner-product index."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("--use_faiss needs the faiss-cpu package: pip install faiss-cpu") from error
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.cpu().numpy())

    def search(queries: torch.Tensor):
        similarities, indices = index.search(queries.cpu().numpy(), k)
        return torch.from_numpy(similarities).to(train.device), torch.from_numpy(indices).to(train.device)

    return search


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def compute_features(args: argparse.Namespace, device: torch.device):
    """Train and val CLS features and labels of the frozen backbone."""
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set = build_split(args.data_path, "train", transform, IndexedImageFolder)
    val_set = build_split(args.data_path, args.val_split, transform, IndexedImageFolder)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train and val classes differ: {train_set.classes} vs {val_set.classes}")
    print(f"Data: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes")
    model = vits.build_frozen_backbone(args, img_size=args.crop_size).to(device)
    features = [extract_features(model, sequential_loader(split, args.batch_size_per_gpu, args.num_workers), device)
                for split in (train_set, val_set)]
    labels = [torch.tensor(split.targets, dtype=torch.long) for split in (train_set, val_set)]
    return features[0], features[1], labels[0], labels[1]


def neighbour_counts(requested: list[int], num_train: int) -> list[int]:
    """The ``k`` values to evaluate: each requested one, capped at the ``num_train`` training images (with a
    warning: a "200-NN" result computed from 12 neighbours would be mislabelled), without repeats."""
    used = []
    for k in requested:
        if k > num_train:
            print(f"warning: --nb_knn {k} is more than the {num_train} training images; evaluating and reporting "
                  f"it as {num_train}-NN (every training image votes)", flush=True)
        if min(k, num_train) not in used:
            used.append(min(k, num_train))
    return used


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns ``{k: {"top1": ..., "top5": ...}}`` (on every process), ``k`` as used
    (``--nb_knn`` values above the number of training images become that number)."""
    validate_args(args)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    if args.load_features:
        tensors = [torch.load(Path(args.load_features) / name, weights_only=True) for name in FEATURE_FILES]
    else:
        tensors = compute_features(args, device)
        if args.dump_features and utils.is_main_process():
            Path(args.dump_features).mkdir(parents=True, exist_ok=True)
            for tensor, name in zip(tensors, FEATURE_FILES):
                torch.save(tensor, Path(args.dump_features) / name)
    train_features, test_features, train_labels, test_labels = tensors
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    knn_device = device if device.type == "cuda" else torch.device("cpu")
    results = {}
    for k in neighbour_counts(args.nb_knn, len(train_features)):
        top1, top5 = knn_classifier(train_features.to(knn_device), train_labels, test_features.to(knn_device),
                                    test_labels, k, args.temperature, num_classes, use_faiss=args.use_faiss)
        results[k] = {"top1": top1, "top5": top5}
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    summary = {"eval": "knn", "weights": args.pretrained_weights or args.load_features or "random_init",
               "results": results}
    utils.report_final(summary, args.output_json)
    return results


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
