"""Weighted k-NN classification on frozen CLS features (DINO's protocol).

    python eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/dataset
    torchrun --nproc_per_node=4 eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/dataset

``--data_path`` holds ``train/<class>/*`` and ``val/<class>/*``. Features are the teacher
backbone's CLS tokens, L2-normalised; each test image takes the ``k`` most cosine-similar training
images, which vote for their class with weight ``exp(similarity / T)``.

``--dump_features`` saves the L2-normalised features and the labels under DINO's file names, so that DINO's
``eval_knn.py --load_features`` reads them and scores the same, with a record of where they came from
(``FEATURE_SOURCE``: the weights, their digest, the data and crop); ``--load_features`` reads ours or DINO's
dumps and reports its result under the recorded weights. DINO's command lines parse: ``--use_cuda``,
``--dist_url`` and ``--local_rank`` (``utils.add_dino_launch_args``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import utils
import vision_transformer as vits
from transforms_patch import eval_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "k-NN evaluation on frozen features.")
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
                        help="Save the extracted features, L2-normalised, and the labels (int64) to this folder as "
                             "DINO does (trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth: DINO's "
                             "--load_features reads them and scores the same), with features_source.json recording "
                             "the weights, data and crop they came from.")
    parser.add_argument("--load_features", default="", type=str,
                        help="Evaluate the features saved in this folder by --dump_features (ours or DINO's) instead "
                             "of running a model. The result is labelled with the weights recorded there; "
                             "--pretrained_weights or --random_init, if also given, must be those weights (anything "
                             "else is refused, since it would not be what was evaluated). The model and data "
                             "arguments are unused.")
    parser.add_argument("--output_json", default="", type=str, help="Also write the results to this JSON file.")
    utils.add_tensorboard_arg(parser)
    utils.add_dino_launch_args(parser, use_cuda=True)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    utils.apply_dino_launch_args(args)
    if args.load_features:
        if args.dump_features:
            raise ValueError("--dump_features with --load_features would only copy the loaded features; drop one")
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
        evaluated = "val" if split == "train" else split
        raise FileNotFoundError(f"{folder} not found: the dataset must be laid out as "
                                f"{data_path}/train/<class>/* and {data_path}/{evaluated}/<class>/*{fix}")
    return dataset_class(str(folder), transform=transform, loader=utils.read_rgb_image)


def sequential_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Each process reads its own share of ``dataset`` in order (padded to equal shares)."""
    sampler = DistributedSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=False)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False)


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                     device: torch.device, header: str = "Features:") -> torch.Tensor:
    """Features ``[N, D]`` (float32, CPU) of every item of ``loader.dataset``, gathered over processes; progress
    with ETA is shown under ``header`` (``utils.progress``).

    ``loader`` yields ``(images, indices)``; ``feature_fn`` maps images ``[B, 3, H, W]`` to ``[B, D]``.
    """
    local_features, local_indices = [], []
    for images, indices in utils.progress(loader, header):
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
        train_features: ``[N, D]``; test_features: ``[M, D]`` (any M). Both are L2-normalised here, which leaves
            normalised ones (ours, DINO's dumps) as they are and makes raw ones (older dumps) score the same.
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
    """Train and val CLS features ``[N, D]``, L2-normalised as DINO's (its dumps hold these, and its k-NN takes
    their dot product as the cosine), labels ``[N]`` (int64), and the record of where they came from."""
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set = build_split(args.data_path, "train", transform, IndexedImageFolder)
    val_set = build_split(args.data_path, args.val_split, transform, IndexedImageFolder)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train and val classes differ: {train_set.classes} vs {val_set.classes}")
    print(f"Data: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes")
    model = vits.build_frozen_backbone(args, img_size=args.crop_size)
    source = {"weights": args.pretrained_weights or "random_init", "weights_path": weights_identity(args),
              "checkpoint_key": args.checkpoint_key if args.pretrained_weights else None,
              "weights_sha256": utils.tensors_digest(model.state_dict()),
              "data_path": str(Path(args.data_path).resolve()),
              "val_split": args.val_split, "resize_size": args.resize_size, "crop_size": args.crop_size,
              "l2_normalised": True}
    model = model.to(device)
    loaders = [sequential_loader(split, args.batch_size_per_gpu, args.num_workers) for split in (train_set, val_set)]
    features = [F.normalize(extract_features(model, loader, device, f"Features of {split}:"), dim=1)
                for loader, split in zip(loaders, ("train", args.val_split))]
    labels = [torch.tensor(split.targets, dtype=torch.long) for split in (train_set, val_set)]
    return (features[0], features[1], labels[0], labels[1]), source


def weights_identity(args: argparse.Namespace) -> str:
    """The weights of ``args`` whatever the working folder: a reference name, a file's absolute path, random_init."""
    if not args.pretrained_weights:
        return "random_init"
    if vits.reference_weights(args.pretrained_weights) is not None:
        return args.pretrained_weights
    return str(Path(args.pretrained_weights).resolve())


# Written beside the dumped tensors: where they came from, and each tensor's digest (which ties the files to it).
FEATURE_SOURCE = "features_source.json"


def dump_features(folder: Path, tensors, source: dict) -> None:
    """The four tensors as ``FEATURE_FILES`` in ``folder`` and ``source`` (with their digests) as ``FEATURE_SOURCE``.

    The record is written first: a dump killed midway leaves files that disagree with it, which loading names,
    rather than another dump's record beside these tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = {name: utils.tensors_digest({name: tensor}) for tensor, name in zip(tensors, FEATURE_FILES)}
    utils.write_text_atomic(json.dumps({**source, "files": digests}, indent=2) + "\n", folder / FEATURE_SOURCE)
    for tensor, name in zip(tensors, FEATURE_FILES):
        utils.write_atomic(folder / name, lambda handle, tensor=tensor: torch.save(tensor, handle))
    print(f"Dumped the features and labels to {folder}", flush=True)


def load_dumped_features(folder: Path, source: dict | None) -> list[torch.Tensor]:
    """The four tensors of a ``--dump_features`` folder, checked against each other and against the folder's
    ``FEATURE_SOURCE`` record ``source`` (None for a dump without one, e.g. DINO's). Errors name the file."""
    tensors = [load_feature_file(folder / name) for name in FEATURE_FILES]
    for tensor, name in zip(tensors, FEATURE_FILES):
        if source is not None and source.get("files", {}).get(name) != utils.tensors_digest({name: tensor}):
            raise RuntimeError(f"{folder / name} is not the tensor recorded in {folder / FEATURE_SOURCE} (a dump "
                               "killed midway, or files copied from another dump): dump the features again")
    train_features, test_features, train_labels, test_labels = tensors
    if (train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]
            or train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]):
        raise RuntimeError(f"the feature files in {folder} do not belong together: features "
                           f"{tuple(train_features.shape)} and {tuple(test_features.shape)}, labels "
                           f"{tuple(train_labels.shape)} and {tuple(test_labels.shape)}; dump the features again")
    return tensors


def load_feature_file(path: Path) -> torch.Tensor:
    """One tensor saved by ``--dump_features``, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a --load_features folder holds {', '.join(FEATURE_FILES)} "
                                "written by --dump_features")
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        raise RuntimeError(f"cannot read {path}: {type(error).__name__}: {error}. The file is truncated or not "
                           "a tensor saved by --dump_features; dump the features again") from error
    if not torch.is_tensor(tensor):
        raise RuntimeError(f"{path} holds a {type(tensor).__name__}, not a tensor saved by --dump_features")
    return tensor


def read_feature_source(folder: Path) -> dict | None:
    """The ``FEATURE_SOURCE`` record of a ``--load_features`` folder; None for a dump without one."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--load_features {folder} is not a folder; give the folder written by "
                                f"--dump_features (it holds {', '.join(FEATURE_FILES)})")
    path = folder / FEATURE_SOURCE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RuntimeError(f"cannot read {path}: {error}; dump the features again") from error
    if not isinstance(source, dict) or "weights_path" not in source:
        raise RuntimeError(f"{path} is not a record written by --dump_features; dump the features again")
    return source


def loaded_features_label(args: argparse.Namespace, folder: Path, source: dict | None) -> str:
    """The weights loaded features came from, for the result; refuses weights given on the command line that
    are not those (the result would be labelled with weights it never used)."""
    recorded = source["weights_path"] if source else f"not recorded (features of {folder.resolve()})"
    given = weights_identity(args) if args.pretrained_weights or args.random_init else None
    if given is not None and given != recorded:
        where = (f"recorded in {folder / FEATURE_SOURCE}" if source else
                 f"{folder} holds no {FEATURE_SOURCE} saying which weights they came from")
        raise ValueError(f"--load_features {folder} evaluates features of the weights {recorded} ({where}), not "
                         f"{given}: drop --pretrained_weights / --random_init (the result is labelled with the "
                         "features' own weights), or dump the features of those weights first")
    return recorded


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
    if args.output_json:
        utils.check_output_file(args.output_json, "--output_json")
    if args.dump_features:
        utils.check_output_dir(args.dump_features, "--dump_features")
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    if args.load_features:
        folder = Path(args.load_features)
        source = read_feature_source(folder)
        weights = loaded_features_label(args, folder, source)  # before reading the (large) tensors
        tensors = load_dumped_features(folder, source)
    else:
        tensors, source = compute_features(args, device)
        weights = source["weights"]
        if args.dump_features and utils.is_main_process():
            dump_features(Path(args.dump_features), tensors, source)
    train_features, test_features, train_labels, test_labels = tensors
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    knn_device = device if device.type == "cuda" else torch.device("cpu")
    results = {}
    for k in neighbour_counts(args.nb_knn, len(train_features)):
        top1, top5 = knn_classifier(train_features.to(knn_device), train_labels, test_features.to(knn_device),
                                    test_labels, k, args.temperature, num_classes, use_faiss=args.use_faiss)
        results[k] = {"top1": top1, "top5": top5}
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    summary = {"eval": "knn", "weights": weights, "results": results}
    if args.load_features:
        summary["features"] = str(Path(args.load_features).resolve())
    utils.report_final(summary, args.output_json, args.tensorboard)
    return results


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
