"""Turn real datasets into the ImageFolder layout the scripts read.

    python prepare_data.py --dataset fashion_mnist --output_dir data/fashion_mnist --limit_per_class 200
    python prepare_data.py --dataset cifar10 --source ~/Downloads/cifar-10-python.tar.gz --output_dir data/cifar10

Writes ``<output_dir>/train/<class>/<index>.png`` and ``<output_dir>/val/<class>/<index>.png``
(the official test split becomes ``val``). ``--holdout N`` also moves the last N training images of
every class into ``<output_dir>/holdout/`` (a tuning split, disjoint from ``train``): choose settings
there, report on ``val``. A rerun rewrites the splits to exactly what it says. Sources:

* ``fashion_mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or any folder holding ``train-images-idx3-ubyte.gz`` etc.
* ``cifar10`` / ``cifar100``: the official python archives (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``) or their extracted folders.

Nothing is downloaded unless ``--download`` asks torchvision to fetch a missing source.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import pickle
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import utils

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot")
SPLITS = ("train", "holdout", "val")
MARKER = ".prepare_data.json"  # records what wrote the folder, so that a rerun may replace it
CIFAR_ARCHIVES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
                  "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}
# What gzip, tarfile and zlib raise on a truncated or foreign file.
DAMAGED_FILE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Prepare a dataset as train/<class>/*.png and val/<class>/*.png")
    parser.add_argument("--dataset", required=True, choices=["fashion_mnist", "cifar10", "cifar100"],
                        help="Which dataset to convert.")
    parser.add_argument("--output_dir", required=True, type=Path, help="Where train/ and val/ are written.")
    parser.add_argument("--source", default=None, type=Path,
                        help="Raw files: the Fashion-MNIST IDX folder (default: the Debian package's), or the "
                             "CIFAR python archive or its extracted folder (default: ./<archive name>).")
    parser.add_argument("--limit_per_class", default=None, type=int,
                        help="Keep at most this many images per class and split (quick subsets).")
    parser.add_argument("--holdout", default=0, type=int,
                        help="Move the last N training images of every class into a 'holdout' split, to tune "
                             "settings on (eval scripts: --val_split holdout) before reporting on 'val'. "
                             "They never appear in 'train'.")
    parser.add_argument("--download", action="store_true",
                        help="If the source is missing, let torchvision download it (needs the network).")
    return parser


# ----------------------------------------------------------------------------------------------
# Readers: each returns {split: (images [N, H, W] or [N, H, W, 3] uint8, labels [N])} and class names.
# ----------------------------------------------------------------------------------------------
def damaged_source(path: Path | str, problem: str) -> ValueError:
    """The error for a source file that cannot be read as what it should be, with the fix."""
    return ValueError(f"{path} {problem}: the file is truncated or corrupt (an interrupted download?) or not "
                      "the expected file; download it again, or point --source at an intact copy")


def read_gzip(path: Path) -> bytes:
    """The decompressed contents of a Fashion-MNIST file, or an error naming the file and the fix."""
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: --source {path.parent} must hold the four Fashion-MNIST "
                                "files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz") from None
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_source(path, f"is not a complete gzip file ({type(error).__name__}: {error})") from error


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An IDX file (gzip-compressed): 2051 for images ``[N, rows, cols]``, 2049 for labels ``[N]``."""
    data = read_gzip(path)
    header = 16 if expected_magic == 2051 else 8
    if len(data) < header:
        raise damaged_source(path, f"holds {len(data)} bytes, fewer than an IDX header")
    magic, count = np.frombuffer(data[:8], dtype=">i4")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {magic}, expected {expected_magic})")
    shape = (int(count), *map(int, np.frombuffer(data[8:header], dtype=">i4")))
    size = math.prod(shape)
    if min(shape) < 0 or len(data) < header + size:
        raise damaged_source(path, f"holds {len(data) - header} bytes of data where its header announces "
                                   f"{' x '.join(map(str, shape))}")
    return np.frombuffer(data[header:header + size], dtype=np.uint8).reshape(shape)


def read_fashion_mnist(source: Path):
    splits = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 2051)
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 2049)
        splits[split] = (images, labels.astype(np.int64))
    return splits, FASHION_MNIST_CLASSES


def read_cifar(source: Path, dataset: str):
    """Images ``[N, 32, 32, 3]`` from the python archive (``.tar.gz``) or its extracted folder."""
    members = {"cifar10": (["data_batch_%d" % i for i in range(1, 6)], ["test_batch"], "batches.meta",
                           b"labels", b"label_names"),
               "cifar100": (["train"], ["test"], "meta", b"fine_labels", b"fine_label_names")}[dataset]
    train_files, test_files, meta_file, label_key, names_key = members
    load = _archive_loader(source, CIFAR_ARCHIVES[dataset][1])
    splits = {}
    for split, files in (("train", train_files), ("val", test_files)):
        batches = [load(name) for name in files]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = (images, np.concatenate([b[label_key] for b in batches]).astype(np.int64))
    names = [name.decode() for name in load(meta_file)[names_key]]
    return splits, names


def _archive_loader(source: Path, folder_name: str):
    """A function ``member name -> unpickled dict`` reading from a tar.gz archive or a folder."""
    if source.is_dir():
        folder = source / folder_name if (source / folder_name).is_dir() else source
        return lambda name: _unpickle(_read_extracted(folder / name), folder / name)
    try:
        archive = tarfile.open(source, "r:gz")
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_source(source, f"is not a .tar.gz archive ({type(error).__name__}: {error})") from error
    return lambda name: _unpickle(_read_member(archive, source, f"{folder_name}/{name}"), f"{source}:{name}")


def _read_extracted(path: Path) -> bytes:
    """A file of an extracted CIFAR folder, or an error naming the missing file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the extracted CIFAR folder is incomplete; point --source at "
                                "the complete folder or at the .tar.gz archive")
    return path.read_bytes()


def _read_member(archive: tarfile.TarFile, source: Path, member: str) -> bytes:
    """A member of a CIFAR archive, or an error naming the archive, the problem and the fix."""
    try:
        return archive.extractfile(member).read()
    except KeyError:
        raise damaged_source(source, f"has no {member} (an archive cut short, or the archive of another "
                                     "--dataset?)") from None
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_source(source, f"cannot be read to the end of {member} ({type(error).__name__}: "
                                     f"{error})") from error


def _unpickle(data: bytes, where: Path | str) -> dict:
    """A CIFAR batch (a pickled dict), or an error naming where the bytes came from."""
    try:
        batch = pickle.loads(data, encoding="bytes")
    except Exception as error:  # unpickling damaged bytes raises many kinds
        raise damaged_source(where, f"is not a CIFAR python batch ({type(error).__name__}: {error})") from error
    if not isinstance(batch, dict):
        raise damaged_source(where, f"holds a {type(batch).__name__}, not a CIFAR python batch")
    return batch


# ----------------------------------------------------------------------------------------------
# Sources, and writing.
# ----------------------------------------------------------------------------------------------
def resolve_source(args: argparse.Namespace) -> Path:
    """The raw data's location, downloaded first with ``--download``, or a clear error naming the fix."""
    if args.dataset == "fashion_mnist":
        source = args.source or FASHION_MNIST_DEBIAN
        present = (source / "train-images-idx3-ubyte.gz").is_file()
        fix = ("install the Debian package: sudo apt-get install dataset-fashion-mnist (or pass --source DIR "
               "with the four *-ubyte.gz files, or --download)")
    else:
        source = args.source or Path(CIFAR_ARCHIVES[args.dataset][0])
        present = source.exists()
        fix = (f"download {CIFAR_ARCHIVES[args.dataset][0]} from the CIFAR page and pass --source PATH "
               "(or --download to let torchvision fetch it)")
    if present:
        return source
    if args.download:
        return download(args.dataset, args.output_dir / "raw")
    raise FileNotFoundError(f"{args.dataset} source {source} not found: {fix}")


def download(dataset: str, root: Path) -> Path:
    """Fetch the raw files with torchvision (network needed); returns the source to read."""
    from torchvision import datasets

    if dataset == "fashion_mnist":
        datasets.FashionMNIST(str(root), train=True, download=True)
        return root / "FashionMNIST" / "raw"
    getattr(datasets, {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[dataset])(str(root), download=True)
    return root


def write_split(images: np.ndarray, labels: np.ndarray, class_names, folder: Path,
                indices_per_class) -> int:
    """PNG files ``folder/<class>/<index>.png`` for the chosen indices; returns how many were written.

    ``indices_per_class`` maps a class's indices (sorted, into ``images``) to the ones to write.
    """
    written = 0
    for label, name in enumerate(class_names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        indices = indices_per_class(np.flatnonzero(labels == label))
        for index in indices:
            Image.fromarray(images[index]).save(folder / name / f"{index:05d}.png")
        written += len(indices)
    return written


def split_selections(splits: dict, limit: int | None, holdout: int) -> dict:
    """``{output split: (source split, indices of a class -> chosen indices)}``.

    ``holdout`` takes the last ``holdout`` training images of each class; ``train`` the first ``limit``
    of the rest, so the training images do not depend on ``--holdout``.
    """
    smallest = int(np.bincount(splits["train"][1]).min())
    if holdout >= smallest:
        raise ValueError(f"--holdout {holdout} leaves no training images: the smallest class has {smallest}")
    selections = {"train": ("train", lambda idx: idx[:len(idx) - holdout][:limit]),
                  "val": ("val", lambda idx: idx[:limit])}
    if holdout:
        selections["holdout"] = ("train", lambda idx: idx[len(idx) - holdout:])
    return selections


def prepare_output_dir(output_dir: Path, record: dict) -> None:
    """Clear the splits an earlier run of this script wrote; refuse a non-empty folder it did not write."""
    marker = output_dir / MARKER
    if output_dir.is_dir() and any(output_dir.iterdir()) and not marker.is_file():
        present = [split for split in SPLITS if (output_dir / split).exists()]
        if present:
            raise FileExistsError(f"{output_dir} already holds {', '.join(present)} not written by prepare_data.py: "
                                  "choose an empty or new --output_dir (nothing was changed)")
    for split in SPLITS:
        shutil.rmtree(output_dir / split, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2) + "\n")


def main(args: argparse.Namespace) -> dict[str, int]:
    """Convert; returns the number of images written per split."""
    if args.limit_per_class is not None and args.limit_per_class <= 0:
        raise ValueError(f"--limit_per_class must be positive, got {args.limit_per_class}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    source = resolve_source(args)
    if args.dataset == "fashion_mnist":
        splits, class_names = read_fashion_mnist(source)
    else:
        splits, class_names = read_cifar(source, args.dataset)
    selections = split_selections(splits, args.limit_per_class, args.holdout)
    prepare_output_dir(args.output_dir, {"dataset": args.dataset, "limit_per_class": args.limit_per_class,
                                         "holdout": args.holdout})
    counts = {split: write_split(*splits[source_split], class_names, args.output_dir / split, choose)
              for split, (source_split, choose) in selections.items()}
    written = ", ".join(f"{count} {split}" for split, count in counts.items())
    print(f"{args.dataset}: wrote {written} images in {len(class_names)} classes to {args.output_dir}")
    return counts


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
