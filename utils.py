"""Shared helpers: argument parsing, distributed set-up, schedules, optimisation, checkpoints, logging."""
from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension


# ----------------------------------------------------------------------------------------------
# Arguments.
# ----------------------------------------------------------------------------------------------
def bool_flag(value: str) -> bool:
    """argparse type for booleans written ``true``/``false`` (also on/off, yes/no, 1/0)."""
    lowered = str(value).lower()
    if lowered in {"true", "on", "yes", "1"}:
        return True
    if lowered in {"false", "off", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def consecutive_runs(keys: Sequence) -> list[list[int]]:
    """Indices of runs of equal consecutive keys: ``[224, 224, 96, 96, 224] -> [[0, 1], [2, 3], [4]]`` (views of
    one size go through a model or an augmentation as one batch)."""
    runs: list[list[int]] = []
    for index, key in enumerate(keys):
        if runs and keys[runs[-1][-1]] == key:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def auto_or_bool(value: str) -> str | bool:
    """argparse type for a boolean that may also be left to the program: ``auto``, ``true`` or ``false``."""
    if str(value).lower() == "auto":
        return "auto"
    try:
        return bool_flag(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}") from None


# Errors our own code raises on purpose to explain a problem and its fix (see ``run_script``).
EXPLAINED_ERROR_TYPES = (ValueError, OSError, RuntimeError, ArithmeticError)
PROJECT_DIR = Path(__file__).resolve().parent


def is_explained_error(error: BaseException) -> bool:
    """True for an error raised by this project's scripts (innermost frame in one of them) of a kind
    they raise to name a problem; false for anything a library raised, or a bug's ``TypeError``."""
    frame = error.__traceback__
    if frame is None or not isinstance(error, EXPLAINED_ERROR_TYPES):
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().parent == PROJECT_DIR


def run_script(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser) -> None:
    """A script's entry point: parse the command line and run ``main``.

    An explained error (``is_explained_error``) prints its message alone and exits with status 1;
    unexpected errors, and every error under ``--debug``, keep their full traceback. Ctrl-C exits
    with status 130 and one line.
    """
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback of every error (by default an error the script explains "
                             "prints its message alone).")
    args = parser.parse_args()
    try:
        main(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write("\ninterrupted (Ctrl-C)\n")
        sys.exit(130)
    except Exception as error:
        if args.debug or not is_explained_error(error):
            raise
        sys.stderr.write(f"error: {error}\n(rerun with --debug for the traceback)\n")
        sys.exit(1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's ``--help``: the description and epilog as written (line breaks kept), and each option's
    help followed by ``(default: X)``, unless its text states the default already or there is none to state
    (None, a suppressed default, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = shown_default(action)
        if shown is None or states_default(help_text, shown):
            return help_text
        return f"{help_text} (default: {shown.replace('%', '%%')})"  # help strings are %-formatted


def shown_default(action: argparse.Action) -> str | None:
    """An option's default as a user would type it (a list as its values, a bool as true/false, nothing as
    "none"), or None where there is nothing to show: no default, a suppressed one, a flag (store_true) that is off."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or (action.nargs == 0 and default is False):
        return None
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return str(default) or "none"


def states_default(help_text: str, shown: str) -> bool:
    """Whether an option's help already says its default: argparse's ``%(default)s``, or the word "default" and
    the value itself (e.g. "vit_small (default)", "Default: 16")."""
    return "%(default)" in help_text or (re.search(r"\bdefault", help_text, re.IGNORECASE) is not None
                                         and shown in help_text)


def script_parser(script: str, description: str, **options) -> argparse.ArgumentParser:
    """A script's argument parser: named by the script's file (``script``: its ``__file__``), as a shell user
    runs it, whatever imports it; ``description`` above the options; every default shown (``HelpFormatter``)."""
    return argparse.ArgumentParser(prog=Path(script).name, description=description, formatter_class=HelpFormatter,
                                   **options)


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_path(path: str) -> bool:
    """True for a file name with an image extension (``IMAGE_EXTENSIONS``, case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(folder: str | Path) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name, hidden ones (name starting with '.') left out.

    Hidden entries are editor, notebook and OS clutter (``.ipynb_checkpoints``, ``.DS_Store``), never data.
    An unreadable folder raises an error naming it: silently skipping it would drop its images.
    """
    try:
        with os.scandir(folder) as entries:
            return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda e: e.name)
    except OSError as error:
        fix = (f"; make it readable (e.g. chmod -R u+rX {folder}) or move it out of the data folder"
               if isinstance(error, PermissionError) else "")
        raise type(error)(f"cannot read folder {folder}: {error.strerror or error}{fix}") from error


class FolderWalk:
    """Lists the image files under folders, each real folder and file once, and warns about the rest.

    Directory symlinks are followed (a class folder may link to data elsewhere), except into a folder
    already listed or into the root or one of its parents: that would loop or read images twice. File
    symlinks to an image already listed are skipped too. ``warn`` reports every skipped path on stderr.
    """

    def __init__(self, root: str | Path, listed: Iterable[str | Path] = ()):
        self.given_root, self.root = str(root), os.path.realpath(root)
        self.seen_folders = {self.root, *(os.path.realpath(folder) for folder in listed)}
        self.seen_files: set[str] = set()
        self.skipped: list[str] = []

    def enter(self, folder: str) -> bool:
        """Whether to list ``folder``: a folder not seen before that does not hold the root."""
        real = os.path.realpath(folder)
        if real in self.seen_folders or self.root.startswith(real.rstrip(os.sep) + os.sep):
            self.skipped.append(folder)
            return False
        self.seen_folders.add(real)
        return True

    def files(self, folder: str, is_valid: Callable[[str], bool] = is_image_path,
              recursive: bool = True) -> list[str]:
        """The valid files in ``folder`` (and its sub-folders), ordered as ``sorted(os.walk(folder))`` would."""
        unique = []
        for _, path, real in sorted(self._collect(folder, os.path.realpath(folder), is_valid, recursive)):
            if real in self.seen_files:
                self.skipped.append(path)
            else:
                self.seen_files.add(real)
                unique.append(path)
        return unique

    def _collect(self, folder: str, real_folder: str, is_valid: Callable[[str], bool],
                 recursive: bool) -> list[tuple[str, str, str]]:
        """``(folder, path, real path)`` of every valid file; the folder leads the key to sort like ``os.walk``."""
        found = []
        for entry in scan_folder(folder):
            if entry.is_dir():
                if recursive and self.enter(entry.path):
                    found += self._collect(entry.path, os.path.realpath(entry.path), is_valid, recursive)
            elif entry.is_file() and is_valid(entry.path):
                # Only a file symlink can repeat a file (each real folder is listed once): resolve just those,
                # which keeps listing a million images fast.
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
                found.append((folder, entry.path, real))
        return found

    def warn(self) -> None:
        """One ``warning:`` line on stderr naming what was skipped, if anything."""
        if self.skipped:
            shown = 10
            examples = ", ".join(os.path.relpath(path, self.given_root) for path in self.skipped[:shown])
            more = f" and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
            sys.stderr.write(f"warning: skipped {len(self.skipped)} path(s) under {self.given_root} that lead to "
                             f"folders or images already listed (symlink loops or duplicate links): "
                             f"{examples}{more}\n")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, case-insensitive; hidden files ignored), sorted
    by name, each real file once."""
    walk = FolderWalk(folder)
    files = walk.files(str(folder), recursive=False)
    walk.warn()
    return [Path(path) for path in files]


def find_class_folders(root: str | Path, warn: bool = True) -> list[str]:
    """The names of the class folders of an ImageFolder at ``root``: its visible sub-folders, sorted, less
    those that lead back to the root or to a class folder already listed (see ``FolderWalk``)."""
    walk = FolderWalk(root)
    names = [entry.name for entry in scan_folder(root) if entry.is_dir() and walk.enter(entry.path)]
    if warn:
        walk.warn()
    return names


class ImageFolderDataset(ImageFolder):
    """torchvision's ``ImageFolder`` with the project's listing rule, used wherever class folders are read.

    Hidden files and folders are ignored; symlinks are followed without loops or repeats (``FolderWalk``);
    an unreadable folder is an error naming it; image files directly in the root beside class folders with
    images are an error (the two layouts mixed), rather than silently left out.
    """

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """``find_class_folders``, numbered in order; no class folder at all is an error."""
        classes = find_class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}: expected {directory}/<class>/<images>")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image, in torchvision's order, listed by ``FolderWalk``."""
        is_valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions or IMAGE_EXTENSIONS))
        folders = {name: os.path.join(directory, name) for name in sorted(class_to_idx)}
        walk = FolderWalk(directory, folders.values())  # a link from one class into another is a repeat
        samples, empty = [], []
        for name, folder in folders.items():
            files = walk.files(folder, is_valid)
            samples += [(path, class_to_idx[name]) for path in files]
            empty += [] if files else [name]
        walk.warn()
        if empty and not allow_empty:
            raise FileNotFoundError(f"no image files in the class folder(s) {', '.join(empty)} of {directory} "
                                    f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})")
        check_single_layout(directory, samples, len(class_to_idx) - len(empty))
        return samples


def check_single_layout(root: str | Path, samples: list[tuple[str, int]], classes_with_images: int) -> None:
    """Refuse image files directly in ``root`` beside class folders holding images: one layout would be dropped."""
    loose = list_images(root)
    if loose and samples:
        raise ValueError(
            f"{root} mixes two layouts: {len(loose)} image file(s) directly inside it (e.g. "
            f"{', '.join(p.name for p in loose[:3])}) and {len(samples)} image(s) in {classes_with_images} "
            f"class sub-folder(s) (e.g. {Path(samples[0][0]).parent.name}/). Move the loose images into a class "
            "folder, or the sub-folders out, so that one layout remains (names starting with '.' are ignored)")


def list_image_files(data_path: str | Path) -> list[Path]:
    """The image files of an ImageFolder (class sub-folders) or, failing that, directly inside ``data_path``.

    Files are recognised by extension (``IMAGE_EXTENSIONS``); anything else, and any hidden file or folder,
    is ignored. The listing rule is ``ImageFolderDataset``'s: no loops, no repeats, loud on unreadable
    folders and on the two layouts mixed.
    """
    root = Path(data_path)
    files = []
    if find_class_folders(root, warn=False):  # the dataset warns
        files = [Path(path) for path, _ in ImageFolderDataset(str(root), allow_empty=True).samples]
    files = files or list_images(root)
    if not files:
        raise ValueError(f"no images found in {root}: expected class sub-folders of images (ImageFolder "
                         f"layout) or image files ({', '.join(IMAGE_EXTENSIONS)}) directly inside it")
    return files


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, or not an image)."""


def read_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB, or raise ``UnreadableImageError`` naming it.

    Grayscale, RGBA, palette and CMYK images are converted; 16-bit, 32-bit integer and 32-bit float
    images are scaled to 8 bits by ``to_rgb``'s rule (a plain PIL ``convert`` would clip them).
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later inside a transform
            return to_rgb(image)
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...) for bad files
        raise UnreadableImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. Grayscale deeper than 8 bits is scaled, never clipped:

    * integers (``I;16*``, ``I``): values within [0, 65535] are taken as 16-bit and scaled by 255 / 65535
      (16-bit PNGs and TIFFs open as ``I;16`` or ``I``); a 32-bit image with values outside that range has
      its own [min, max] stretched to [0, 255];
    * floats (``F``): values within [0, 1] are scaled by 255; otherwise [min, max] is stretched to [0, 255].

    NaNs and infinities count as 0; a constant image outside those ranges becomes black.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_deep_grayscale_to_8_bits(image))
    if image.mode == "P":
        image = image.convert("RGBA")  # palettes with transparency convert cleanly only through RGBA
    return image.convert("RGB")


def _deep_grayscale_to_8_bits(image: Image.Image) -> np.ndarray:
    """``uint8`` pixels of an ``I*`` or ``F`` image, by ``to_rgb``'s rule."""
    pixels = np.asarray(image, dtype=np.float64)
    pixels = np.where(np.isfinite(pixels), pixels, 0.0)
    full_scale = 1.0 if image.mode == "F" else 65535.0
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if 0 <= low and high <= full_scale:
        scaled = pixels * (255.0 / full_scale)
    else:
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return scaled.round().clip(0, 255).astype(np.uint8)


def visualization_request(visualize: list[str] | None) -> tuple[int, Path] | None:
    """``(count, folder)`` from an evaluation's ``--visualize N DIR``, or None when no figures are asked for."""
    if visualize is None:
        return None
    count, folder = visualize
    if not count.isdigit() or int(count) <= 0:
        raise ValueError(f"--visualize N DIR needs a positive number of figures N, got {count!r}")
    return int(count), Path(folder)


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map ``[256, 3]`` uint8 (DAVIS uses it too): the bits of the index are dealt to
    red, green and blue in turn, from the most significant colour bit down (index 255 is VOC's void colour)."""
    indices = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (indices >> (3 * shift + channel)) & 1
            palette[:, channel] |= bit << (7 - shift)
    return palette.astype(np.uint8)


def write_indexed_png(path: str | Path, labels: np.ndarray) -> None:
    """Labels ``[H, W]`` (0..255) as an indexed PNG with the VOC palette (``voc_palette``)."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"an indexed PNG holds values 0..255; {path} would need {labels.min()}..{labels.max()}")
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette(voc_palette().ravel().tolist())
    save_image(image, path)


def save_image(image: Image.Image, path: str | Path, **options) -> None:
    """``image.save(path, **options)`` atomically, the format from the extension (``write_atomic``): a failed
    write leaves no partial file and raises an ``OSError`` naming ``path`` and the free space there."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot tell an image format from the extension of {path}; end it in .png or .jpg")
    write_atomic(path, lambda handle: image.save(handle, format=image_format, **options))


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun (env://) or a single process.
# ----------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def add_device_arg(parser) -> None:
    """``--device {auto,cuda,cpu}``, shared by every script."""
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: this process's GPU when CUDA is available, else the CPU.")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is present, else the CPU."""
    if name not in {"auto", "cuda", "cpu"}:
        raise ValueError(f"unknown device {name!r}; choose auto, cuda or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on the CPU); no-op in a single process."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warn_if_restarts_share_a_store()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            device_id=device if device.type == "cuda" else None)
    dist.barrier()
    silence_non_main_processes()


def warn_if_restarts_share_a_store() -> None:
    """Rank 0 warns when ``torchrun --max_restarts`` keeps one rendezvous store across restarts: restarted
    processes can then read the dead ones' addresses and fail to connect (PyTorch issue #135712)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0":
        print("warning: torchrun --max_restarts with a shared rendezvous store may fail to reconnect after a "
              "restart (PyTorch issue #135712); launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
              flush=True)


def silence_non_main_processes() -> None:
    """Only rank 0 prints, unless a call passes ``force=True`` (as in DINO)."""
    builtin_print = builtins.print
    is_main = dist.get_rank() == 0

    def print_on_main(*args, force: bool = False, **kwargs):
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_on_main


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes (nothing to do in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the GPU under nccl, else the CPU."""
    return torch.device("cuda") if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")


def run_on_main_process(action: Callable[[], object]) -> None:
    """Run ``action`` on rank 0 only. If it raises, every process raises (rank 0 the error itself, the others
    one pointing to it) rather than waiting at its next collective for a rank 0 that has stopped.

    One collective when distributed; none in a single process.
    """
    error = None
    if is_main_process():
        try:
            action()
        except Exception as caught:
            error = caught
    if is_distributed():
        failed = all_reduce_sum(torch.tensor([float(error is not None)], device=collective_device()))
        if failed.item() and error is None:
            raise RuntimeError("rank 0 stopped at the start (its error is printed above); this process stops too")
    if error is not None:
        raise error


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for (seed, epoch, rank, ...) combinations that never collide in practice."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU generator is seeded with ``seed``; afterwards it is as before.

    (``torch.random.fork_rng`` plus ``torch.manual_seed`` does the same ~50x slower, too slow per sample.)
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


# ----------------------------------------------------------------------------------------------
# Schedules and optimisation.
# ----------------------------------------------------------------------------------------------
def cosine_scheduler(base_value: float, final_value: float, epochs: int, iters_per_epoch: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up to ``base_value``, then cosine decay to ``final_value``.

    Returns an array of ``epochs * iters_per_epoch`` values.
    """
    warmup_iters = min(warmup_epochs * iters_per_epoch, epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False) if warmup_iters else np.array([])
    decay_iters = epochs * iters_per_epoch - warmup_iters
    steps = np.arange(decay_iters)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(decay_iters, 1)))
    return np.concatenate([warmup, decay])


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: matrices get weight decay; biases and norm parameters (1-D) get none."""
    regularized, not_regularized = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or parameter.ndim == 1 else regularized).append(parameter)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling; 1-D parameters skip decay and scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    param_norm, update_norm = parameter.norm(), update.norm()
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                buffer = self.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, SGD (momentum 0.9) or LARS; learning rate and weight decay are set every iteration."""
    if name == "adamw":
        return torch.optim.AdamW(params_groups, fused=True)  # one kernel for all parameters (CPU and CUDA)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(params_groups)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or lars")


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient so that its own norm is at most ``clip`` (DINO's rule).

    Multi-tensor kernels (``torch._foreach_*``): a handful of launches for all parameters, no host sync.
    Returns the norms before clipping, ``[number of parameters with a gradient]``.
    """
    grads = [parameter.grad.detach() for parameter in model.parameters() if parameter.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0).to(grads[0].dtype)
    torch._foreach_mul_(grads, list(factors.unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, parameter in model.named_parameters():
        if "last_layer" in name:
            parameter.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def strip_prefixes(state_dict: dict, prefixes: Iterable[str] = ("module.",)) -> dict:
    """Remove wrapper prefixes (``module.`` from DDP, ``backbone.``, ...) from state-dict keys."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    return stripped


# ----------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------
def save_atomic(state: dict, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically: a crash at any moment leaves the previous file or the new one.

    A killed process may leave its temporary behind (``remove_stale_temporaries`` clears it). A failed
    write removes the temporary and raises an ``OSError`` that names the file (see ``write_atomic``).
    """
    write_atomic(path, lambda handle: torch.save(state, handle))


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write a text file atomically (never a half-written file)."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` a hidden temporary beside ``path``, flush it to disk, then rename it over ``path``.

    Any failed write (``OSError``, or the ``RuntimeError`` torch's writer raises on a full disk) removes the
    temporary and raises an ``OSError`` naming ``path`` and saying that the previous file is intact.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write (a full disk) as RuntimeError
        raise OSError(f"could not write {path}: {error}. The previous {path.name} (if any) is intact; free disk "
                      f"space{_free_space(path.parent)} or fix the folder, then rerun the same command to resume "
                      "from it.") from error
    finally:
        temporary.unlink(missing_ok=True)


def _is_dead_writers_temporary(name: str) -> bool:
    """Whether ``name`` is a ``write_atomic`` temporary whose writing process has ended."""
    match = TEMPORARY_PATTERN.fullmatch(name)
    if match is None:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return True  # this process is not writing it now: a temporary of a process that had our pid before
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Stop before any work when ``path`` cannot be written as a file; returns it as a ``Path``.

    Refused: ``path`` is a folder, a part of it is a file (``out.json/x.json``), or its nearest existing folder
    is read-only or full (a small probe file is written there and removed). The folders it needs are not
    created here, so a run that stops at a later check leaves nothing behind.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_output_dir(path.parent, f"the folder of {what} {path}")
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Stop before any work when folder ``path`` cannot be created or written into; returns it as a ``Path``.

    Refused with the path named: ``path`` (or a part of it) is a file, or the nearest existing folder is
    read-only or has no room for a small probe file (its free space is given). Nothing is created.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path} cannot be a folder: {existing} is a file. Choose another path, or "
                                 "move the file away.")
    _probe_write(existing, f"{what} {path}")
    return path


@contextlib.contextmanager
def created_output_dir(path: str | Path) -> Iterator[Path]:
    """Create folder ``path`` (and its missing parents) for the block. When the block fails (any exception, Ctrl-C
    included), the folders created here are removed again if no file was written into them: a start that fails
    leaves no empty output folder behind.

    Nothing else is ever removed: a folder that existed before stays, and so does one holding any file (a
    checkpoint, a log, another run's lock). Folders go one by one with ``os.rmdir``, which refuses a folder that
    is not empty.
    """
    path = Path(path)
    created = []  # deepest first
    for folder in (path, *path.parents):
        if folder.exists():
            break
        created.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        _remove_folders_without_files(created)
        raise


def _remove_folders_without_files(created: list[Path]) -> None:
    """Remove ``created`` (deepest first) if the deepest holds no file at any depth: its empty sub-folders bottom-up,
    then each folder in turn, stopping at the first that cannot go."""
    if not created:
        return
    tree = list(os.walk(created[0], topdown=False))  # sub-folders before their parents, created[0] last
    if any(files for _, _, files in tree):
        return
    for folder in [Path(root) for root, _, _ in tree] + created[1:]:
        try:
            folder.rmdir()
        except OSError:
            return


def _probe_write(folder: Path, what: str) -> None:
    """Write and remove a 4 KiB hidden file in ``folder``; a failure names ``what``, the folder and its free space."""
    probe = folder / f".write_probe.tmp.{os.getpid()}"
    try:
        with open(probe, "xb") as handle:
            try:
                handle.write(bytes(4096))
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write {what}: {folder} refuses a 4 KiB test file: {error.strerror or error}"
                      f"{_free_space(folder)}. Free space or fix the permissions, or choose another path; "
                      "nothing was computed yet.") from None


def _free_space(folder: Path) -> str:
    """`` (N MiB free there)`` for the file system of ``folder``, or nothing when it cannot be read."""
    try:
        return f" ({shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free there)"
    except OSError:
        return ""


# ``write_atomic``'s temporaries: ``.<name>.tmp.<pid>``. Nothing else in a folder is ever taken for one.
TEMPORARY_PATTERN = re.compile(r"\.(?P<name>.+)\.tmp\.(?P<pid>[0-9]+)")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete (and report) the temporaries of ``write_atomic`` calls killed mid-write in ``folder``; returns them.

    A temporary is a file named ``.<name>.tmp.<pid>`` whose writer (``pid`` on this host) is no longer alive;
    any other file, a user's ``.notes.tmp.old`` included, is left alone. Only the holder of ``folder``'s
    ``folder_lock`` may call it.
    """
    stale = sorted(path for path in Path(folder).glob(".*.tmp.*")
                   if path.is_file() and _is_dead_writers_temporary(path.name))
    for path in stale:
        path.unlink(missing_ok=True)
        print(f"Removed {path}, left by a process killed while writing it", flush=True)
    return stale


# Besides tensors, containers, numbers and strings, the one type a checkpoint may hold: DINO's main_dino.py
# saves its arguments as an ``argparse.Namespace`` under ``args``. Nothing else is ever unpickled.
# Beyond tensors, containers, numbers and strings, what DINO's main_dino.py writes: its arguments as an
# argparse.Namespace, and numpy.float64 learning rates and weight decays (its schedules are numpy arrays) in the
# optimizer's param_groups. A numpy scalar is rebuilt from its dtype and bytes, under numpy 2's module name or
# numpy 1's (``numpy.core``); only the float64 dtype is allowed, the one those schedules hold.
NUMPY_SCALAR = np._core.multiarray.scalar
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace, np.dtype, np.dtypes.Float64DType, NUMPY_SCALAR,
                           (NUMPY_SCALAR, "numpy.core.multiarray.scalar"))


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """Load a checkpoint (or state) dict on the CPU, or stop with an error that names the file and the fix.

    Reading is safe (``weights_only``): only tensors, containers, numbers, strings and the
    ``SAFE_CHECKPOINT_GLOBALS`` are rebuilt; a file needing any other Python object is refused. An
    ``argparse.Namespace`` under ``args`` (DINO's checkpoints) is returned as a plain dict, as ours store it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        # Types the unpickler met only while rebuilding an allowed one (e.g. another numpy dtype) are named in
        # torch's error, not in the archive's list of globals.
        refused = unsafe_objects_in(path) + re.findall(r"but got <class '([\w.]+)'>", str(error))
        if refused:
            raise RuntimeError(
                f"{what} {path} holds Python objects of type {', '.join(refused)}; they are not loaded, because "
                "unpickling them could run arbitrary code (only tensors, containers, numbers, strings, "
                "argparse.Namespace and numpy float64 scalars are read). Re-save the weights as plain state "
                "dicts from a copy you trust, e.g. torch.save({'teacher': model.state_dict()}, path).") from error
        raise RuntimeError(f"cannot read {what} {path}: {type(error).__name__}: {error}. The file is "
                           "corrupt, truncated or not a PyTorch checkpoint; move it away to start afresh, or "
                           "point to a good one.") from error
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"{path} holds a {type(checkpoint).__name__}, not a {what} dict")
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return plain_numbers(checkpoint)


def plain_numbers(value):
    """``value`` with every numpy scalar outside tensors turned into the Python number it equals (DINO's
    ``numpy.float64`` learning rates), so that what is read is written back, and printed, like our own."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((key, plain_numbers(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(item) for item in value)
    return value


def unsafe_objects_in(path: str | Path) -> list[str]:
    """The Python types (``module.Name``) a ``torch.save`` file needs beyond what ``load_checkpoint`` reads
    safely, found without unpickling anything; empty when there are none or the file is no such archive."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive written by torch.save: nothing to name
        return []
    allowed = {kind[1] if isinstance(kind, tuple) else f"{kind.__module__}.{kind.__qualname__}"
               for kind in SAFE_CHECKPOINT_GLOBALS}
    return [name for name in names if name not in allowed]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the names, dtypes, shapes and bytes of ``tensors``: the identity of the weights (or
    features) a result came from, whatever file, key or seed produced them."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def first_non_finite(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor in ``state_dict`` holding a NaN or an infinity, else None."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def require_keys(checkpoint: dict, keys: Iterable[str], path: str | Path, what: str, fix: str) -> None:
    """Stop with a clear error when ``checkpoint`` (read from ``path``) lacks any of ``keys``."""
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise RuntimeError(f"{path} is not a {what} (no {', '.join(missing)}; it holds "
                           f"{', '.join(map(str, list(checkpoint)[:8])) or 'nothing'}); {fix}")


def load_state_strict(module: nn.Module, state_dict: dict, what: str, path: str | Path) -> None:
    """``load_state_dict(strict=True)``, turning any mismatch into one readable error."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"the {what} in {path} does not fit the model built from the current arguments "
                           f"(another --arch, --patch_size, --out_dim or head setting?):\n{error}") from error


# ----------------------------------------------------------------------------------------------
# A run's lifecycle: one process per output folder; stopping cleanly on a signal.
# ----------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the block, or raise ``FileExistsError`` naming the live
    process that holds it (pid, host, start time, command line).

    The lock is ``fcntl.flock`` on ``<folder>/.lock``, which names its holder: the OS releases it when the
    holder dies, so a killed run never blocks its restart. On a file system without locks it warns and
    goes on unlocked. The file is removed on release.
    """
    path = Path(folder) / LOCK_NAME
    handle = _locked_file(path)
    _register_fork_hook()
    _HELD_LOCKS.add(handle)
    try:
        yield path
    finally:
        _HELD_LOCKS.discard(handle)
        path.unlink(missing_ok=True)  # still locked: a process that opened it before retries on a new file
        handle.close()


# Lock files this process holds open. A forked child (a DataLoader worker) inherits their descriptors, and
# an flock stays held while any copy is open: orphaned workers of a killed run would block its restart for
# seconds. Children close their copies at once (the parent's lock is unaffected).
_HELD_LOCKS: set = set()
_FORK_HOOK_REGISTERED = False


def _register_fork_hook() -> None:
    global _FORK_HOOK_REGISTERED
    if not _FORK_HOOK_REGISTERED:
        os.register_at_fork(after_in_child=_close_inherited_locks)
        _FORK_HOOK_REGISTERED = True


def _close_inherited_locks() -> None:
    for handle in list(_HELD_LOCKS):
        handle.close()
    _HELD_LOCKS.clear()


def _locked_file(path: Path):
    """``path`` opened and locked by this process, with this process described in it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "it has not written its details yet"
            handle.close()
            raise FileExistsError(f"{path.parent} is in use by another run ({holder}); two runs in one folder "
                                  "would mix their logs and checkpoints. Wait for it to end (or stop it), or "
                                  f"choose another output folder. Its lock, {path}, is released by the OS when "
                                  "that process ends.") from None
        except OSError as error:  # ENOLCK, ENOSYS, ...: a network file system mounted without locks
            sys.stderr.write(f"warning: cannot lock {path} ({error.strerror}): a second run in this folder "
                             "would not be detected\n")
            break
        if _is_same_file(handle, path):
            break
        handle.close()  # its holder removed it between our open and our lock: lock the new file
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                 f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}: {' '.join(sys.argv)}\n")
    handle.flush()
    return handle


def _is_same_file(handle, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``handle``."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


class StopSignals:
    """Within ``with``, SIGTERM, SIGUSR1 (SLURM's ``--signal``) and SIGINT (Ctrl-C) are recorded instead of
    ending the process, so that a loop can stop at a clean point; ``received`` names the first one.

    A second Ctrl-C quits at once (``KeyboardInterrupt``) in a single process, but not under torchrun,
    which forwards the terminal's Ctrl-C to its workers: each sees it twice. Handlers can only be set
    from the main thread; elsewhere nothing is caught. The previous handlers come back on exit.
    """

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._record) for number in self.signals}
        return self

    def __exit__(self, *exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _record(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            again = " (Ctrl-C again quits at once)" if self._second_ctrl_c_quits(number) else ""
            # os.write, not print: the handler may have interrupted a print to the same stream
            os.write(2, f"\n{self.received} received: stopping after the current step{again}\n".encode())
        elif self._second_ctrl_c_quits(number):
            raise KeyboardInterrupt

    @staticmethod
    def _second_ctrl_c_quits(number: int) -> bool:
        return number == signal.SIGINT and not launched_by_torchrun()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A ``DataLoader`` ``worker_init_fn``: workers ignore ``StopSignals.signals``, which SLURM and a
    terminal send to every process. The main process decides when to stop and then ends its workers; a
    worker killed by the signal (torch's own worker handler dies of a SIGTERM from any process but its
    parent) would make the main process raise in the middle of its step."""
    for number in StopSignals.signals:
        signal.signal(number, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Logging.
# ----------------------------------------------------------------------------------------------
def report_final(summary: dict, output_json: str | Path = "", tensorboard: str | Path = "") -> None:
    """An evaluation's last words: ``summary`` written to ``output_json`` (if given, by the main process), its
    numbers to event files in ``tensorboard`` (if given, see ``write_final_scalars``), and printed as one
    ``FINAL {json}`` line that scripts can parse."""
    if output_json and is_main_process():
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(summary, indent=2) + "\n", output_json)
    if tensorboard and is_main_process():
        write_final_scalars(summary, tensorboard)
    print("FINAL " + json.dumps(summary), flush=True)


def add_tensorboard_arg(parser) -> None:
    """An evaluation's ``--tensorboard DIR``: its final figures as TensorBoard scalars (``write_final_scalars``)."""
    parser.add_argument("--tensorboard", default="", type=str, metavar="DIR",
                        help="Also write the final figures as TensorBoard scalars to event files in this folder "
                             "(tags <eval>/<figure>, e.g. knn/results/20/top1, at step 0; view them with tensorboard "
                             "--logdir DIR). Needs the tensorboard package.")


def require_tensorboard() -> None:
    """Stop before any work when the tensorboard package that ``--tensorboard`` writes with is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install -r requirements.txt (or pip "
                           "install tensorboard), or leave out --tensorboard")


def check_tensorboard_dir(path: str | Path) -> Path:
    """Stop before any work when an evaluation's ``--tensorboard`` folder cannot be written, or tensorboard is not
    installed."""
    require_tensorboard()
    return check_output_dir(path, "--tensorboard")


def tensorboard_writer(log_dir: str | Path, purge_step: int | None = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing event files to ``log_dir`` (created). ``purge_step``:
    where a resumed run continues; TensorBoard hides the points an earlier run logged from that step on."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter  # here: importing it takes seconds

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def final_scalars(summary: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of an evaluation's summary by path, ``{"results/20/top1": 71.2, ...}``: nested dicts are walked;
    text, lists, booleans and the record of the ``settings`` are left out."""
    scalars = {}
    for key, value in summary.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict) and key != "settings":
            scalars.update(final_scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[tag] = float(value)
    return scalars


def write_final_scalars(summary: dict, log_dir: str | Path) -> None:
    """Every number of ``summary`` (``final_scalars``) as the scalar ``<summary["eval"]>/<path>`` at step 0 of new
    event files in ``log_dir``."""
    writer = tensorboard_writer(log_dir)
    try:
        for tag, value in final_scalars(summary).items():
            writer.add_scalar(f"{summary['eval']}/{tag}", value, 0)
    finally:
        writer.close()
    print(f"Wrote the final figures as TensorBoard scalars to {log_dir}", flush=True)


def trim_epoch_log(log_path: str | Path, next_epoch: int) -> None:
    """Drop the JSON lines of ``log_path`` for epochs >= ``next_epoch``, and torn lines.

    Scripts log an epoch before writing its checkpoint (the commit point): a process killed in between
    leaves a line the checkpoint does not cover, as does a run continued from an older checkpoint
    (``--resume_from``); those epochs are about to be redone.
    """
    log_path = Path(log_path)
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_epoch(line) < next_epoch]
    if len(kept) < len(lines):
        write_text_atomic("".join(kept), log_path)
        print(f"Dropped {len(lines) - len(kept)} line(s) of {log_path} that the checkpoint does not cover", flush=True)


def _logged_epoch(line: str) -> float:
    """The ``epoch`` of one JSON log line; infinity for a line torn by a kill mid-write."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# Off a terminal (a log file, a pipe) a progress line is printed at each tenth of a loop and at least once a
# minute, plus one at the end: a loop over a million images logs a few dozen lines. On a terminal one line is
# rewritten in place, at most every TERMINAL_REFRESH_S seconds.
PROGRESS_FRACTIONS = 10
PROGRESS_INTERVAL_S = 60.0
TERMINAL_REFRESH_S = 0.5


def format_duration(seconds: float | None) -> str:
    """``seconds`` as ``H:MM:SS`` (``N days, H:MM:SS`` from a day on); ``?`` when not known (None, infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def stdout_is_terminal() -> bool:
    """Whether ``sys.stdout`` (as it is now: tests and compare.py replace it) is a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # an object without isatty, or a closed file
        return False


class Progress:
    """The progress of a loop over ``total`` items: elapsed time, ETA, and a progress line shown at a bounded
    rate (``PROGRESS_FRACTIONS``; never a carriage return off a terminal).

    ``done``: items already done before this process started (a resumed run). The ETA extrapolates from the items
    timed here, which exclude those and the ones ``skip`` counts (done without work, e.g. reused results).
    """

    def __init__(self, total: int, header: str = "", done: int = 0):
        self.total, self.header, self.done = total, header, done
        self.start = self._last_shown = time.time()
        self._untimed = done
        self._shown_fraction = self._fraction()
        self._line_open = False  # on a terminal: a line is being rewritten in place

    def _fraction(self) -> int:
        return self.done * PROGRESS_FRACTIONS // self.total if self.total else PROGRESS_FRACTIONS

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before the first timed item."""
        timed = self.done - self._untimed
        return self.elapsed / timed * max(self.total - self.done, 0) if timed > 0 else None

    def times(self) -> str:
        return f"elapsed: {format_duration(self.elapsed)}  eta: {format_duration(self.eta)}"

    def line(self, detail: str = "") -> str:
        """``<header> [done/total] percent  elapsed: H:MM:SS  eta: H:MM:SS  <detail>``."""
        percent = 100 * self.done // self.total if self.total else 100
        text = f"{self.header} [{self.done:>{len(str(self.total))}}/{self.total}] {percent:>3}%  {self.times()}"
        return f"{text}  {detail}" if detail else text

    def advance(self, count: int = 1) -> None:
        """Count ``count`` more items done, showing nothing."""
        self.done += count

    def skip(self, count: int = 1) -> None:
        """Count ``count`` items done without work: they do not shorten the ETA's time per item."""
        self.done += count
        self._untimed += count

    def step(self, count: int = 1, detail: Callable[[], str] | None = None) -> None:
        """``advance``, then show the line (with ``detail()`` after the times) if one is due."""
        self.advance(count)
        if self._due():
            self.show(detail() if detail else "")

    def _due(self) -> bool:
        since = time.time() - self._last_shown
        if stdout_is_terminal():
            return since >= TERMINAL_REFRESH_S
        return self.done < self.total and (self._fraction() > self._shown_fraction or since >= PROGRESS_INTERVAL_S)

    def show(self, detail: str = "") -> None:
        """Print the line now: in place on a terminal, as a whole line elsewhere."""
        self._last_shown, self._shown_fraction = time.time(), self._fraction()
        if stdout_is_terminal():
            print("\r\x1b[K" + self.line(detail), end="", flush=True)
            self._line_open = True
        else:
            print(self.line(detail), flush=True)

    def finish(self, detail: str = "") -> None:
        """The closing line: items done, total time and time per item (on a terminal, in place of the last line)."""
        timed = max(self.done - self._untimed, 1)
        text = (f"{self.header} {self.done} done in {format_duration(self.elapsed)} "
                f"({self.elapsed / timed:.4g} s each)" + (f"  {detail}" if detail else ""))
        print(("\r\x1b[K" if self._line_open else "") + text, flush=True)
        self._line_open = False


def progress(iterable: Iterable, header: str, total: int | None = None,
             detail: Callable[[], str] | None = None) -> Iterator:
    """Yield from ``iterable`` (of ``total`` items, by default ``len(iterable)``) showing a ``Progress``; its
    closing line once the loop is through. ``detail()`` adds text to each line (e.g. running metrics)."""
    tracker = Progress(len(iterable) if total is None else total, header)
    for item in iterable:
        yield item
        tracker.step(detail=detail)
    tracker.finish(detail() if detail else "")


class SmoothedValue:
    """A running series: the median and mean of a recent window, and the global mean."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4g} ({global_avg:.4g})"):
        self.window: deque[float] = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg)


class MetricLogger:
    """Collects named series and prints a progress line with ETA, step time and data time."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def synchronize_between_processes(self) -> None:
        """Make every ``global_avg`` the mean over all processes, in one collective (windows stay local)."""
        if not is_distributed():
            return
        for name, (total, count) in self.global_totals().items():
            self.meters[name].total, self.meters[name].count = total, int(count)

    def global_averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def global_totals(self) -> dict[str, list[float]]:
        """``{name: [total, count]}`` summed over all processes (every process must call it)."""
        names = list(self.meters)  # the same order on every process (and in the epoch log)
        sums = torch.tensor([[self.meters[name].total, self.meters[name].count] for name in names],
                            dtype=torch.float64, device=collective_device())
        all_reduce_sum(sums)
        return {name: row for name, row in zip(names, sums.tolist())}

    def add_totals(self, totals: dict[str, list[float]]) -> None:
        """Continue the global means from ``global_totals`` of an interrupted run (the windows start empty)."""
        for name, (total, count) in totals.items():
            self.meters[name].total += total
            self.meters[name].count += int(count)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = "", run: Progress | None = None) -> Iterator:
        """Yield from ``iterable``, printing a line every ``print_freq`` items and at the end (DINO's format, whole
        lines): position, elapsed time and ETA of this loop, with ``run`` (a ``Progress`` of the whole run,
        advanced here) the run's ETA too, then the meters, step and data time."""
        total = len(iterable)
        loop = Progress(total, header)
        step_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        end = time.time()
        width = len(str(total))
        for index, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            step_time.update(time.time() - end)
            loop.advance()
            if run is not None:
                run.advance()
            if index % print_freq == 0 or index == total - 1:
                whole_run = f"  run eta: {format_duration(run.eta)}" if run is not None else ""
                memory = (f"  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB"
                          if torch.cuda.is_available() else "")
                print(f"{header} [{index:>{width}}/{total}]  {loop.times()}{whole_run}  {self}  "
                      f"time: {step_time}  data: {data_time}{memory}", flush=True)
            end = time.time()
        print(f"{header} total time: {format_duration(loop.elapsed)} ({loop.elapsed / max(total, 1):.4f} s / it)",
              flush=True)


# ----------------------------------------------------------------------------------------------
# DINO's launcher flags, so that DINO's command lines run here unchanged.
# ----------------------------------------------------------------------------------------------
def add_dino_launch_args(parser, use_cuda: bool = False) -> None:
    """DINO's ``--local_rank`` and ``--dist_url`` (and, with ``use_cuda``, its ``--use_cuda``), acted on by
    ``apply_dino_launch_args``. ``python -m torch.distributed.launch`` without ``--use_env`` passes
    ``--local-rank=N`` (dashed since PyTorch 2.0, underscored before): both spellings are accepted."""
    parser.add_argument("--local_rank", "--local-rank", default=None, type=int,
                        help="DINO's flag, passed by python -m torch.distributed.launch without --use_env: this "
                             "process's GPU on its node. Becomes LOCAL_RANK where the launcher left that unset, and "
                             "must agree with it otherwise. Not needed with torchrun.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="DINO's flag: how the processes meet. Only env:// (DINO's default) is supported: the "
                             "address and ranks that torchrun or torch.distributed.launch put in the environment.")
    if use_cuda:
        parser.add_argument("--use_cuda", default=None, type=bool_flag,
                            help="DINO's flag (true/false: keep the features on the GPU), accepted and ignored: "
                                 "--device decides where the model and the features go.")


def apply_dino_launch_args(args: argparse.Namespace) -> None:
    """Act on ``add_dino_launch_args``'s flags, before the device is chosen: ``--local_rank`` is set as LOCAL_RANK
    (what ``resolve_device`` and ``init_distributed`` read) when unset, and refused when it disagrees; a
    ``--dist_url`` other than env:// is refused; ``--use_cuda`` is noted as ignored (once, on rank 0)."""
    if args.local_rank is not None:
        launcher_value = os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        if int(launcher_value) != args.local_rank:
            raise ValueError(f"--local_rank {args.local_rank} disagrees with LOCAL_RANK={launcher_value} set by the "
                             "launcher; leave out --local_rank (torchrun and torch.distributed.launch set LOCAL_RANK)")
    if args.dist_url != "env://":
        raise ValueError(f"--dist_url {args.dist_url} is not supported: processes meet only through the environment "
                         "(env://, DINO's default) that the launcher sets; give the address to the launcher instead "
                         "(torchrun --nnodes N --node_rank R --master_addr HOST --master_port PORT ...) and leave out "
                         "--dist_url")
    if getattr(args, "use_cuda", None) is not None and os.environ.get("RANK", "0") == "0":
        print(f"note: --use_cuda {str(args.use_cuda).lower()} (DINO's flag) is ignored: --device {args.device} "
              "decides where the model and the features go", flush=True)
