"""Turn real datasets into the ImageFolder layout the scripts read, or make a multi-object scene set.

    python prepare_data.py --dataset fashion_mnist --output_dir data/fashion_mnist --limit_per_class 200
    python prepare_data.py --dataset cifar10 --source ~/Downloads/cifar-10-python.tar.gz --output_dir data/cifar10
    python prepare_data.py --dataset fashion_mnist_scenes --output_dir data/fashion_mnist_scenes

Writes ``<output_dir>/train/<class>/<index>.png`` and ``<output_dir>/val/<class>/<index>.png``
(the official test split becomes ``val``). ``--holdout N`` also moves the last N training images of
every class into ``<output_dir>/holdout/`` (a tuning split, disjoint from ``train``): choose settings
there, report on ``val``. A rerun rewrites the splits to exactly what it says. ``<output_dir>/.prepare_data.json``
records what wrote the folder and, written last, ``"complete": true`` with the counts: a folder left by an
interrupted run says ``"complete": false``, and a rerun writes it again. Sources:

* ``fashion_mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or any folder holding ``train-images-idx3-ubyte.gz`` etc.
* ``cifar10`` / ``cifar100``: the official python archives (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``) or their extracted folders.

``fashion_mnist_scenes`` writes square canvases holding several Fashion-MNIST garments at random sizes and
positions (``render_scene``) in the Pascal VOC layout that ``eval_segmentation.py --dataset voc`` reads, with
palette masks, and the same canvases as flat ``train/``, ``holdout/`` and ``val/`` folders for training and
``eval_correspondence.py``.

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

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
from PIL import Image

import utils

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot")
SPLITS = ("train", "holdout", "val")
SCENE_FOLDER = "VOC2012"  # the scene set's VOC-layout folder, written beside the flat split folders
# A garment pixel darker than this (0-255) cannot be told from the black canvas in the image: the fringe that
# resizing and Fashion-MNIST's own anti-aliasing leave, and the near-black parts of dark garments. Its label is
# ignored (255), as VOC ignores its uncertain object borders; brighter pixels carry the garment's class.
VISIBLE_LEVEL = 16
IGNORE_LABEL = 255
HOLDOUT_GARMENTS = 10000  # scene holdout canvases take garments from the last 10,000 training images, train the rest
MARKER = ".prepare_data.json"  # what wrote the folder (so that a rerun may replace it), and whether it finished
CIFAR_ARCHIVES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
                  "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}
# What gzip, tarfile and zlib raise on a truncated or foreign file.
DAMAGED_FILE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Prepare a dataset as train/<class>/*.png and val/<class>/*.png.")
    parser.add_argument("--dataset", required=True, choices=["fashion_mnist", "cifar10", "cifar100",
                                                             "fashion_mnist_scenes"],
                        help="Which dataset to convert; fashion_mnist_scenes makes multi-garment canvases with masks.")
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
    group = parser.add_argument_group("fashion_mnist_scenes")
    group.add_argument("--scenes", default=(2000, 500, 1000), type=int, nargs=3, metavar=("TRAIN", "HOLDOUT", "VAL"),
                       help="Canvases per split: train and holdout from Fashion-MNIST's training images (disjoint "
                            f"garments: holdout uses the last {HOLDOUT_GARMENTS}), val from its test images.")
    group.add_argument("--canvas_size", default=64, type=int, help="Side of the square canvases in pixels.")
    group.add_argument("--garments", default=(2, 4), type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="Garments per canvas, uniform between MIN and MAX.")
    group.add_argument("--garment_size", default=(20, 40), type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="Side of a pasted garment (resized from 28 px), uniform between MIN and MAX pixels.")
    group.add_argument("--seed", default=0, type=int, help="Seed of every choice of the scene set.")
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
    if args.dataset in ("fashion_mnist", "fashion_mnist_scenes"):
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

    if dataset in ("fashion_mnist", "fashion_mnist_scenes"):
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


def check_output_dir(output_dir: Path) -> None:
    """Before reading anything: refuse an ``--output_dir`` that cannot be written, one holding splits this script
    did not write, or split entries that are not plain folders (a symlink would be written through, a file
    could not be replaced)."""
    utils.check_output_dir(output_dir, "--output_dir")
    present = [output_dir / split for split in (*SPLITS, SCENE_FOLDER)
               if (output_dir / split).exists() or (output_dir / split).is_symlink()]
    if present and not (output_dir / MARKER).is_file():
        raise FileExistsError(f"{output_dir} already holds {', '.join(path.name for path in present)} not written "
                              "by prepare_data.py: choose an empty or new --output_dir (nothing was changed)")
    odd = [f"{path} is a symbolic link to {path.readlink()}" if path.is_symlink() else f"{path} is a file"
           for path in present if path.is_symlink() or not path.is_dir()]
    if odd:
        raise FileExistsError(f"{'; '.join(odd)}: prepare_data.py rewrites its splits as plain folders inside "
                              f"--output_dir, and would write through a link into the folder it points to. Remove "
                              f"{'them' if len(odd) > 1 else 'it'} (rm, which leaves a link's target alone), or "
                              "choose another --output_dir; nothing was changed")


def prepare_output_dir(output_dir: Path, record: dict) -> None:
    """Clear the splits an earlier run of this script wrote (``check_output_dir`` came first), and mark the
    folder as being written: ``complete`` false until ``finish_output_dir``."""
    marker = output_dir / MARKER
    if marker.is_file() and not is_complete(marker):
        print(f"{output_dir} was left incomplete by an interrupted prepare_data.py run; writing it again")
    for split in (*SPLITS, SCENE_FOLDER):
        shutil.rmtree(output_dir / split, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    utils.write_text_atomic(json.dumps({**record, "complete": False}, indent=2) + "\n", marker)


def is_complete(marker: Path) -> bool:
    """Whether a folder's record says it was written to the end (records from before it was kept say nothing)."""
    try:
        return json.loads(marker.read_text()).get("complete", True)
    except ValueError:  # torn by a kill while an older version wrote it non-atomically
        return False


def finish_output_dir(output_dir: Path, record: dict, counts: dict[str, int]) -> None:
    """The last write: the record saying that every split is complete, with its counts (atomically)."""
    utils.write_text_atomic(json.dumps({**record, "complete": True, "written": counts}, indent=2) + "\n",
                            output_dir / MARKER)


# ----------------------------------------------------------------------------------------------
# Multi-object scenes from Fashion-MNIST garments.
# ----------------------------------------------------------------------------------------------
def resized_garment(garment: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 garment resized to ``side`` square (bilinear), uint8."""
    return np.asarray(Image.fromarray(garment).resize((side, side), Image.BILINEAR))


def render_scene(garments: list[tuple[np.ndarray, int, int, int, int]], canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``(garment 28x28 uint8, class, side, top, left)`` in order on a black canvas; returns the canvas
    and its labels, uint8 ``[canvas, canvas]`` each.

    Every pixel a garment covers (non-zero after resizing) takes its value, the later garment on top. Its label
    is the garment's class + 1 where that value is at least ``VISIBLE_LEVEL``, ``IGNORE_LABEL`` where it is
    darker (not visible against the black background); uncovered pixels are background (0).
    """
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    labels = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    for garment, label, side, top, left in garments:
        pixels = resized_garment(garment, side)
        covered = pixels > 0
        region = (slice(top, top + side), slice(left, left + side))
        canvas[region][covered] = pixels[covered]
        labels[region][covered] = np.where(pixels[covered] >= VISIBLE_LEVEL, label + 1, IGNORE_LABEL)
    return canvas, labels


def draw_scenes(count: int, pool: np.ndarray, rng: np.random.Generator, args: argparse.Namespace) -> list[list]:
    """``count`` scenes, each a list of ``(garment index into pool, side, top, left)``; garments are taken in a
    random order without repeats until the pool is used up (then a new order)."""
    order, position, scenes = rng.permutation(pool), 0, []
    for _ in range(count):
        scene = []
        for _ in range(int(rng.integers(args.garments[0], args.garments[1] + 1))):
            if position == len(order):
                order, position = rng.permutation(pool), 0
            side = int(rng.integers(args.garment_size[0], args.garment_size[1] + 1))
            top, left = (int(value) for value in rng.integers(0, args.canvas_size - side + 1, size=2))
            scene.append((int(order[position]), side, top, left))
            position += 1
        scenes.append(scene)
    return scenes


def scene_pools(splits: dict, holdout: int) -> dict[str, tuple[str, np.ndarray]]:
    """``{split: (source split, garment indices)}``: holdout garments are the last ``HOLDOUT_GARMENTS`` training
    images (when there is a holdout split), train garments the rest, val garments the test images."""
    train_count = len(splits["train"][1])
    reserved = min(HOLDOUT_GARMENTS, train_count // 2) if holdout else 0
    pools = {"train": ("train", np.arange(train_count - reserved))}
    if holdout:
        pools["holdout"] = ("train", np.arange(train_count - reserved, train_count))
    pools["val"] = ("val", np.arange(len(splits["val"][1])))  # last: its list file says the set is complete
    return pools


def write_scenes(splits: dict, args: argparse.Namespace) -> dict[str, int]:
    """Write the scene set (VOC layout plus flat split folders); returns the canvases per split."""
    counts = dict(zip(SPLITS, args.scenes))
    root = args.output_dir / SCENE_FOLDER
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("\n".join(("background",) + FASHION_MNIST_CLASSES) + "\n")
    rng = np.random.default_rng(args.seed)
    written = {}
    for split, (source, pool) in scene_pools(splits, counts["holdout"]).items():
        images, labels = splits[source]
        (args.output_dir / split).mkdir(parents=True, exist_ok=True)
        stems = []
        for number, scene in enumerate(draw_scenes(counts[split], pool, rng, args)):
            canvas, mask = render_scene([(images[i], int(labels[i]), *place) for i, *place in scene], args.canvas_size)
            stems.append(f"{split}_{number:05d}")
            Image.fromarray(canvas).save(root / "JPEGImages" / f"{stems[-1]}.png")
            Image.fromarray(canvas).save(args.output_dir / split / f"{stems[-1]}.png")
            utils.write_indexed_png(root / "SegmentationClass" / f"{stems[-1]}.png", mask)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in stems))
        written[split] = len(stems)
    return written


def validate_scene_args(args: argparse.Namespace) -> None:
    """Stop early on a scene set that cannot be drawn."""
    low, high = args.garment_size
    if not 1 <= low <= high <= args.canvas_size:
        raise ValueError(f"--garment_size {low} {high} must satisfy 1 <= MIN <= MAX <= --canvas_size {args.canvas_size}")
    if not 1 <= args.garments[0] <= args.garments[1]:
        raise ValueError(f"--garments {args.garments[0]} {args.garments[1]} must satisfy 1 <= MIN <= MAX")
    if args.scenes[0] <= 0 or args.scenes[2] <= 0 or args.scenes[1] < 0:
        raise ValueError(f"--scenes {' '.join(map(str, args.scenes))}: train and val need at least one canvas, "
                         "holdout 0 or more")
    if args.limit_per_class is not None or args.holdout:
        raise ValueError("--limit_per_class and --holdout apply to the classification datasets; for scenes give "
                         "--scenes TRAIN HOLDOUT VAL")


def main(args: argparse.Namespace) -> dict[str, int]:
    """Convert (or draw scenes); returns the number of images written per split."""
    if args.limit_per_class is not None and args.limit_per_class <= 0:
        raise ValueError(f"--limit_per_class must be positive, got {args.limit_per_class}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    scenes = args.dataset == "fashion_mnist_scenes"
    if scenes:
        validate_scene_args(args)
    check_output_dir(args.output_dir)
    source = resolve_source(args)
    if args.dataset in ("fashion_mnist", "fashion_mnist_scenes"):
        splits, class_names = read_fashion_mnist(source)
    else:
        splits, class_names = read_cifar(source, args.dataset)
    record = {"dataset": args.dataset, "limit_per_class": args.limit_per_class, "holdout": args.holdout}
    if scenes:
        record.update(scenes=list(args.scenes), canvas_size=args.canvas_size, garments=list(args.garments),
                      garment_size=list(args.garment_size), seed=args.seed)
    else:
        selections = split_selections(splits, args.limit_per_class, args.holdout)
    prepare_output_dir(args.output_dir, record)
    if scenes:
        counts = write_scenes(splits, args)
    else:
        counts = {split: write_split(*splits[source_split], class_names, args.output_dir / split, choose)
                  for split, (source_split, choose) in selections.items()}
    finish_output_dir(args.output_dir, record, counts)
    written = ", ".join(f"{count} {split}" for split, count in counts.items())
    kind = f"canvases ({args.canvas_size} px) with masks" if scenes else f"images in {len(class_names)} classes"
    print(f"{args.dataset}: wrote {written} {kind} to {args.output_dir}")
    return counts


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
