"""Benchmarks of PW-Self: the training step, the data pipeline, the augmentation and the patch matching.

One command prints one table (and ``--json`` writes it). Parts (``--parts``):

* ``step``: the full training step (teacher and student forward, loss, backward, clipping, AdamW,
  EMA, center) of ``patch_wise_dino.Trainer`` on synthetic uint8 crops and geometries drawn like
  training views; warm-up steps, then the median of ``--steps`` device-synchronised steps, in
  images per second and peak memory (GPU: allocated; CPU: the process's high-water mark).
  ``--out_dim``, ``--patch_loss``, ``--fused_loss``, ``--precision``, ``--compile`` and
  ``--gpu_augment`` take several values: every combination is a row.
* ``data``: the training loader (``TrainingImages``: decode and per-sample seeding; multi-crop with
  geometry; collate; pinning) on a folder of photos with ``--num_workers`` processes.
* ``augment``: one process and one thread: our augmentation (with and without its photometric part,
  and with ``--patch_augment true`` also with the patch-level photometrics on ``--patch_size`` tiles)
  against DINO's recipe built from stock torchvision transforms, decode included, images (and views)
  per second.
* ``matching``: the batched patch matching of a batch (every view pair), as the step runs it.

On one H100, the issue's table:
    python bench.py --device cuda --arch vit_small --patch_size 16 --batch_size 64 --local_crops_number 8 \\
        --out_dim 65536 10000 --patch_loss true false --precision bf16 --num_workers 16 --json bench_h100.json
On the CPU, small:
    python bench.py --device cpu --arch vit_tiny --patch_size 8 --embed_dim 96 --depth 3 --num_heads 3 \\
        --out_dim 4096 --global_crops_size 64 --local_crops_size 32 --batch_size 16 --num_workers 2
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import utils
import vision_transformer as vits
from patch_wise_dino import PATCH_HEADS, TrainingImages, build_trainer, get_args_parser as training_parser
from pwself_loss import compute_matches, matched_pairs
from transforms_patch import (IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, RandomResizedCropWithGeometry,
                              collate_multicrop)

PARTS = ("step", "data", "augment", "matching")
FIXTURE_PHOTOS = Path(__file__).resolve().parent / "tests" / "fixtures" / "photos"


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, __doc__)
    parser.add_argument("--parts", default=list(PARTS), nargs="+", choices=PARTS, help="What to measure.")
    group = parser.add_argument_group("model and recipe (as in patch_wise_dino.py)")
    vits.add_backbone_args(group)
    group.add_argument("--head_hidden_dim", default=2048, type=int, help="Hidden width of the head's MLP.")
    group.add_argument("--head_bottleneck_dim", default=256, type=int, help="Width of the head's bottleneck.")
    group.add_argument("--loss_chunk_mib", default=512, type=int, help="Chunk of the fused loss (MiB of logits).")
    group.add_argument("--batch_size", default=64, type=int, help="Images per step (per GPU).")
    group.add_argument("--global_crops_size", default=224, type=int, help="Side of the 2 global views.")
    group.add_argument("--local_crops_size", default=96, type=int, help="Side of the local views.")
    group.add_argument("--local_crops_number", default=8, type=int, help="Local views per image.")
    group = parser.add_argument_group("step variants: every combination of these values is one row")
    group.add_argument("--out_dim", default=[65536], type=int, nargs="+", help="Prototypes K of the head.")
    group.add_argument("--patch_loss", default=[True], type=utils.bool_flag, nargs="+",
                       help="true: PW-Self; false: DINO's CLS loss only.")
    group.add_argument("--fused_loss", default=["auto"], type=utils.auto_or_bool, nargs="+",
                       help="true: the fused chunked loss; false: the straightforward reference; auto: the "
                            "training default (fused with the patch loss only).")
    group.add_argument("--patch_head", default=["shared"], nargs="+", choices=PATCH_HEADS,
                       help="One head for CLS and patch tokens, a separate patch head, or iBOT's layout (shared "
                            "MLP, a second last layer): the training script's --patch_head.")
    group.add_argument("--patch_augment", default=[False], type=utils.bool_flag, nargs="+",
                       help="Patch-level photometric augmentation (inside the timed step with --gpu_augment true).")
    group.add_argument("--precision", default=["auto"], nargs="+", choices=["auto", "fp32", "fp16", "bf16"],
                       help="Autocast precision (auto: bf16 on a GPU, fp32 on the CPU).")
    group.add_argument("--compile", default=[False], type=utils.bool_flag, nargs="+", help="torch.compile the models.")
    group.add_argument("--gpu_augment", default=[False], type=utils.bool_flag, nargs="+",
                       help="Photometric augmentation on the device, inside the timed step (the 'data' part "
                            "always measures both kinds of loader).")
    group = parser.add_argument_group("timing")
    group.add_argument("--warmup", default=5, type=int, help="Untimed steps (and data batches) first.")
    group.add_argument("--steps", default=20, type=int, help="Timed steps; the median is reported.")
    group.add_argument("--data_batches", default=10, type=int, help="Timed batches of the data loader.")
    group.add_argument("--num_workers", default=16, type=int, help="Data-loading processes.")
    group.add_argument("--augment_images", default=50, type=int, help="Images per augmentation timing.")
    group.add_argument("--repeats", default=3, type=int,
                       help="Rounds of the augmentation timings; the best round counts (robust to a shared machine).")
    group.add_argument("--photos", default=None, type=str,
                       help="Folder of photos for 'data' and 'augment'; default: --num_photos JPEGs of "
                            "--photo_size made from tests/fixtures/photos in a temporary folder.")
    group.add_argument("--num_photos", default=64, type=int, help="Photos to write when --photos is not given.")
    group.add_argument("--photo_size", default=(500, 375), type=int, nargs=2, help="Width and height of those photos.")
    utils.add_device_arg(group)
    group.add_argument("--json", default=None, type=str, help="Also write the rows to this JSON file.")
    return parser


# ----------------------------------------------------------------------------------------------
# Training step.
# ----------------------------------------------------------------------------------------------
def step_variants(args: argparse.Namespace) -> list[dict]:
    """Every combination of the step options that take several values."""
    names = ("out_dim", "patch_loss", "fused_loss", "patch_head", "patch_augment", "precision", "compile",
             "gpu_augment")
    return [dict(zip(names, values)) for values in itertools.product(*(getattr(args, name) for name in names))]


def training_args(args: argparse.Namespace, variant: dict) -> argparse.Namespace:
    """The training script's arguments for one variant (defaults for everything else)."""
    train = training_parser().parse_args(["--data_path", "."])
    shared = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "head_hidden_dim", "head_bottleneck_dim",
              "global_crops_size", "local_crops_size", "local_crops_number", "loss_chunk_mib", "device")
    for name in shared:
        setattr(train, name, getattr(args, name))
    for name, value in variant.items():
        setattr(train, name, value)
    train.batch_size_per_gpu, train.epochs, train.warmup_epochs = args.batch_size, 1, 0
    train.freeze_last_layer = 0  # time the last layer's update too
    return train


def synthetic_batch(args: argparse.Namespace, pin: bool):
    """uint8 views ``V x [B, 3, S, S]`` and geometry ``[B, V, 6]``, crops drawn like training views of a 500x375 photo.

    Random draws come from torch's global generator (``main`` seeds it).
    """
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    scales = [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * args.local_crops_number
    rows = []
    for size, scale in zip(sizes, scales):
        crop = RandomResizedCropWithGeometry(size, scale)
        rows.extend([*crop.draw_box(375, 500), float(torch.rand(1) < 0.5), size] for _ in range(args.batch_size))
    geometry = torch.tensor(rows, dtype=torch.float64).view(len(sizes), args.batch_size, 6).transpose(0, 1)
    images = [torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8) for s in sizes]
    return ([image.pin_memory() for image in images] if pin else images), geometry.contiguous()


def time_step(args: argparse.Namespace, variant: dict, device: torch.device) -> dict:
    """Median time of full training steps for one variant."""
    schedule = DataLoader(range(args.batch_size * (args.warmup + args.steps)), batch_size=args.batch_size)
    trainer = build_trainer(training_args(args, variant), device, schedule)  # the loader sets the schedules' length
    batches = [synthetic_batch(args, pin=device.type == "cuda") for _ in range(2)]
    reset_peak_memory(device)
    times = []
    for iteration in range(args.warmup + args.steps):
        images, geometry = batches[iteration % 2]
        start = time.perf_counter()
        trainer.step(images, geometry, 0, iteration, iteration)
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[args.warmup:])
    return {"img_per_s": args.batch_size / median, "ms": 1000 * median, "peak_gib": peak_memory_gib(device)}


def step_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for variant in step_variants(args):
        options = " ".join(f"{name}={value}" for name, value in variant.items())
        setting = (f"{args.arch}/{args.patch_size} B={args.batch_size} 2x{args.global_crops_size}+"
                   f"{args.local_crops_number}x{args.local_crops_size} {options}")
        try:
            rows.append({"part": "step", "setting": setting, **time_step(args, variant, device)})
        except torch.OutOfMemoryError:
            rows.append({"part": "step", "setting": setting, "note": "out of memory"})
        except Exception as error:  # one failing variant (e.g. a compiler error) must not lose the others
            traceback.print_exc()
            rows.append({"part": "step", "setting": setting, "note": f"failed: {type(error).__name__}: {error}"[:200]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated memory since the last reset. CPU: the process's resident-set high-water mark
    (it never resets: compare CPU variants run in separate invocations)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


# ----------------------------------------------------------------------------------------------
# Data pipeline and augmentation.
# ----------------------------------------------------------------------------------------------
def make_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` JPEGs (quality 95) of ``size`` resized from the test fixture photos, with film grain
    (sigma 8) so that they decode about as slowly as camera photos of that size rather than as smooth upscales."""
    sources = sorted(FIXTURE_PHOTOS.glob("*.jpg"))
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        with Image.open(sources[index % len(sources)]) as photo:
            pixels = torch.from_numpy(np.array(photo.convert("RGB").resize(size, Image.BICUBIC))).float()
        grain = 8 * torch.randn(pixels.shape, generator=generator)
        Image.fromarray((pixels + grain).clamp(0, 255).byte().numpy()).save(folder / f"{index:04}.jpg", quality=95)
    return folder


def describe_photos(photos: Path) -> str:
    files = utils.list_image_files(photos)
    with Image.open(files[0]) as first:
        width, height = first.size
    kilobytes = sum(f.stat().st_size for f in files) / len(files) / 1000
    return f"{len(files)} photos like {width}x{height}, {kilobytes:.0f} kB"


def multicrop(args: argparse.Namespace, photometric: bool, patch_augment_p: float = 0.0) -> MultiCropAugmentation:
    return MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), args.local_crops_number, args.global_crops_size,
                                 args.local_crops_size, photometric=photometric, patch_augment_p=patch_augment_p,
                                 patch_size=args.patch_size)


def time_data(args: argparse.Namespace, photos: Path, gpu_augment: bool) -> dict:
    """Images per second out of the training DataLoader (workers, collate, pinning) after a warm-up."""
    dataset = TrainingImages(utils.list_image_files(photos), multicrop(args, photometric=not gpu_augment))
    items = [(index % len(dataset), index) for index in range((args.warmup + args.data_batches) * args.batch_size)]
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=items, num_workers=args.num_workers,
                        collate_fn=collate_multicrop, pin_memory=torch.cuda.is_available(), drop_last=True)
    iterator = iter(loader)
    for _ in range(args.warmup):  # worker start-up and the first prefetches
        next(iterator)
    start = time.perf_counter()
    timed = sum(1 for _ in iterator)
    elapsed = time.perf_counter() - start
    return {"img_per_s": timed * args.batch_size / elapsed, "ms": 1000 * elapsed / timed}


def stock_dino_recipe(args: argparse.Namespace) -> Callable:
    """DINO's multi-crop recipe from stock torchvision transforms (no geometry): the baseline.

    Blur: torchvision's GaussianBlur with a 13-tap kernel (3 sigma at the largest sigma, 2.0).
    """
    def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(13, sigma=(0.1, 2.0))], p=blur_p),
            transforms.RandomSolarize(128, p=solarize_p),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    first = view(args.global_crops_size, (0.4, 1.0), 1.0, 0.0)
    second = view(args.global_crops_size, (0.4, 1.0), 0.1, 0.2)
    local = view(args.local_crops_size, (0.05, 0.4), 0.5, 0.0)
    return lambda image: [first(image), second(image)] + [local(image) for _ in range(args.local_crops_number)]


def time_augment(transform: Callable, photos: Path, count: int) -> float:
    """Seconds to decode and augment ``count`` photos in this process with one thread."""
    dataset = TrainingImages(utils.list_image_files(photos), transform)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset[0, 0]
    start = time.perf_counter()
    for index in range(count):
        dataset[index % len(dataset), index]
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return elapsed


def data_rows(args: argparse.Namespace, photos: Path) -> list[dict]:
    """The loader with the whole recipe in the workers, and with only crop and flip there (``--gpu_augment``)."""
    recipes = {False: "full recipe", True: "crop+flip (photometrics on the device)"}
    return [{"part": "data", "setting": f"{args.num_workers} workers, {recipe}, {describe_photos(photos)}",
             **time_data(args, photos, gpu_augment)} for gpu_augment, recipe in recipes.items()]


def augment_rows(args: argparse.Namespace, photos: Path) -> list[dict]:
    """Images (and views) per second per core of each augmentation: the best of ``--repeats`` interleaved rounds."""
    candidates = {"ours: full recipe with geometry": multicrop(args, photometric=True)}
    if True in args.patch_augment:  # every view patch-augmented (p=1), on tiles of --patch_size
        candidates[f"ours: full recipe + patch photometrics on {args.patch_size}px tiles"] = (
            multicrop(args, photometric=True, patch_augment_p=1.0))
    candidates.update({"ours: crop+flip with geometry (--gpu_augment)": multicrop(args, photometric=False),
                       "stock torchvision DINO recipe": stock_dino_recipe(args)})
    best = {name: float("inf") for name in candidates}
    for _ in range(args.repeats):  # interleaved, so that a busy spell on a shared machine hits all alike
        for name, transform in candidates.items():
            best[name] = min(best[name], time_augment(transform, photos, args.augment_images))
    views = 2 + args.local_crops_number
    sizes = f"2x{args.global_crops_size}+{args.local_crops_number}x{args.local_crops_size}px"
    return [{"part": "augment", "setting": f"{name}, {sizes}, 1 core, {describe_photos(photos)}",
             "img_per_s": args.augment_images / seconds, "ms": 1000 * seconds / args.augment_images,
             "views_per_s": views * args.augment_images / seconds,
             "note": f"{views * args.augment_images / seconds:.0f} views/s"} for name, seconds in best.items()]


# ----------------------------------------------------------------------------------------------
# Matching.
# ----------------------------------------------------------------------------------------------
def matching_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Matches and flat pair tables of one batch (every view pair), on the device, as in the step."""
    _, geometry = synthetic_batch(args, pin=False)
    geometry = geometry.to(device)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        matched_pairs(compute_matches(geometry, args.patch_size, "upstream", True), None)
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[args.warmup:])
    pairs = 2 * (1 + args.local_crops_number)
    return [{"part": "matching", "setting": f"B={args.batch_size}, {pairs} view pairs, upstream, {device.type}",
             "img_per_s": args.batch_size / median, "ms": 1000 * median}]


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------
def format_table(rows: list[dict], device: torch.device) -> str:
    """A Markdown table of the rows."""
    lines = [f"device: {describe_device(device)}; torch {torch.__version__}",
             "| part | setting | img/s | ms per step/batch/image | peak memory (GiB) | note |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        speed = f"{row['img_per_s']:.1f}" if "img_per_s" in row else "-"
        ms = f"{row['ms']:.2f}" if "ms" in row else "-"
        memory = f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "-"
        lines.append(f"| {row['part']} | {row['setting']} | {speed} | {ms} | {memory} | {row.get('note', '')} |")
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main(args: argparse.Namespace) -> list[dict]:
    device = utils.resolve_device(args.device)
    args.device = device.type
    torch.manual_seed(0)
    temporary = None if args.photos else Path(tempfile.mkdtemp(prefix="pwself_bench_"))
    photos = Path(args.photos) if args.photos else make_photos(temporary, args.num_photos, tuple(args.photo_size))
    try:
        measures = {"step": lambda: step_rows(args, device), "data": lambda: data_rows(args, photos),
                    "augment": lambda: augment_rows(args, photos), "matching": lambda: matching_rows(args, device)}
        rows = [row for part in PARTS if part in args.parts for row in measures[part]()]
    finally:
        if temporary is not None:
            shutil.rmtree(temporary)
    print(format_table(rows, device), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": describe_device(device), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
