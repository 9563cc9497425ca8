"""Linear probing of frozen features (DINO's protocol), with a learning-rate sweep in one run.

    python eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/dataset --output_dir lin
    torchrun --nproc_per_node=4 eval_linear.py --pretrained_weights out/checkpoint.pth --data_path ... --output_dir lin

Features: the CLS tokens of the last ``--n_last_blocks`` blocks, concatenated, followed by the
average of the last block's patch tokens with ``--avgpool_patchtokens true``. One linear head per
learning rate of ``--lrs`` trains on the same features side by side (SGD, momentum 0.9, cosine
schedule); the best is reported. Restarting the same command resumes from
``<output_dir>/linear_checkpoint.pth``; ``--evaluate`` only evaluates the saved heads. The checkpoint records
what its heads and result depend on (``TRAINING_SETTINGS``: the weights' tensors, the features, the data and
the schedule): a checkpoint written with other settings is refused, with every difference named, rather
than resumed or evaluated and reported under this run's label. DINO's command lines parse: ``--num_labels`` (checked
against the classes found), ``--dist_url`` and ``--local_rank`` (``utils.add_dino_launch_args``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from functools import partial
from pathlib import Path
from typing import Callable

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import utils
import vision_transformer as vits
from eval_knn import IndexedImageFolder, build_split, extract_features, sequential_loader
from transforms_patch import IMAGENET_MEAN, IMAGENET_STD, eval_transform

CHECKPOINT_NAME = "linear_checkpoint.pth"


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Linear evaluation on frozen features.")
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="Concatenate the CLS tokens of this many last blocks: 4 for ViT-S, 1 for ViT-B.")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="Append the mean of the last block's patch tokens (true for ViT-B in DINO).")
    parser.add_argument("--epochs", default=100, type=int, help="Training epochs of the linear heads.")
    parser.add_argument("--lr", default=0.001, type=float,
                        help="Learning rate for a total batch of 256 (scaled linearly with the batch).")
    parser.add_argument("--lrs", default=None, type=float, nargs="+",
                        help="Sweep: train one head per learning rate side by side and report the best "
                             "(e.g. --lrs 0.001 0.01 0.1). Overrides --lr.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and step.")
    parser.add_argument("--data_path", default="", type=str,
                        help="Dataset root with train/<class>/* and val/<class>/* images.")
    parser.add_argument("--val_split", default="val", type=str,
                        help="Folder under --data_path to evaluate on: val (report), or holdout to tune settings "
                             "(prepare_data.py --holdout) without looking at val.")
    parser.add_argument("--resize_size", default=256, type=int, help="Evaluation resize of the shorter side.")
    parser.add_argument("--crop_size", default=224, type=int,
                        help="Training random-resized-crop and evaluation centre-crop side; use the "
                             "pretraining resolution. A multiple of the patch size.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data-loading processes per GPU.")
    parser.add_argument("--val_freq", default=1, type=int, help="Validate every this many epochs (and at the end).")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="Where the heads (linear_checkpoint.pth), log and results go. A checkpoint there is "
                             "resumed only if it was written with the same weights (compared by their tensors), "
                             "features, data, split and schedule; otherwise the run stops naming each difference: "
                             "use another --output_dir for another evaluation.")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only evaluate the saved heads on --val_split; they must have been trained on the "
                             "features of these weights and feature settings.")
    parser.add_argument("--head_weights", default="", type=str,
                        help="Heads to evaluate with --evaluate (default: <output_dir>/linear_checkpoint.pth).")
    parser.add_argument("--seed", default=0, type=int, help="Seed of head initialisation and data order.")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="DINO's flag: the number of classes of the heads. Here the class folders of "
                             "<data_path>/train decide it; if given, it must be their number (e.g. 1000 for ImageNet).")
    utils.add_device_arg(parser)
    utils.add_tensorboard_arg(parser)
    utils.add_dino_launch_args(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    utils.apply_dino_launch_args(args)
    vits.validate_backbone_args(args)
    if not args.data_path:
        raise ValueError("--data_path is required")
    if args.crop_size % args.patch_size:
        raise ValueError(f"--crop_size {args.crop_size} is not a multiple of --patch_size {args.patch_size}")
    if args.epochs <= 0 or args.n_last_blocks <= 0 or args.val_freq <= 0 or args.batch_size_per_gpu <= 0:
        raise ValueError("--epochs, --n_last_blocks, --val_freq and --batch_size_per_gpu must be positive")
    if args.lrs is None:
        args.lrs = [args.lr]
    if any(lr <= 0 for lr in args.lrs):
        raise ValueError("learning rates must be positive")


# ----------------------------------------------------------------------------------------------
# Features and heads.
# ----------------------------------------------------------------------------------------------
def frozen_features(model: vits.VisionTransformer, images: torch.Tensor, n_last_blocks: int,
                    avgpool_patchtokens: bool) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, n * D]`` (CLS of the last n blocks), plus ``D`` with patch averaging."""
    with torch.no_grad():
        blocks = model.get_intermediate_layers(images, n_last_blocks)
        parts = [tokens[:, 0] for tokens in blocks]
        if avgpool_patchtokens:
            parts.append(blocks[-1][:, 1:].mean(dim=1))
        return torch.cat(parts, dim=-1)


class LinearHeads(nn.Module):
    """One linear classifier per learning rate, all reading the same features."""

    def __init__(self, dim: int, num_labels: int, count: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_labels) for _ in range(count))
        for head in self.heads:
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` -> logits ``[heads, B, num_labels]``."""
        return torch.stack([head(features) for head in self.heads])


class Probe:
    """Linear heads with their optimisers and cosine schedules (one per learning rate)."""

    def __init__(self, dim: int, num_labels: int, lrs: list[float], epochs: int, total_batch: int,
                 device: torch.device):
        self.lrs = lrs
        self.heads = LinearHeads(dim, num_labels, len(lrs)).to(device)
        self.module = DistributedDataParallel(self.heads) if utils.is_distributed() else self.heads
        self.optimizers = [torch.optim.SGD(head.parameters(), lr=lr * total_batch / 256.0, momentum=0.9,
                                           weight_decay=0.0) for head, lr in zip(self.heads.heads, lrs)]
        self.schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.0)
                           for opt in self.optimizers]

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "lrs": self.lrs,
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "schedulers": [sched.state_dict() for sched in self.schedulers]}

    def load_state_dict(self, state: dict, path: Path, heads_only: bool = False) -> None:
        if [float(lr) for lr in state["lrs"]] != [float(lr) for lr in self.lrs]:
            raise ValueError(f"{path} holds heads for learning rates {state['lrs']}, not {self.lrs}: "
                             "pass the same --lrs, or another --output_dir")
        utils.load_state_strict(self.heads, state["heads"], "linear heads", path)
        if not heads_only:
            for optimizer, saved in zip(self.optimizers, state["optimizers"]):
                optimizer.load_state_dict(saved)
            for scheduler, saved in zip(self.schedulers, state["schedulers"]):
                scheduler.load_state_dict(saved)


def train_one_epoch(probe: Probe, loader: DataLoader, feature_fn: Callable, device: torch.device,
                    epoch: int) -> list[float]:
    """One epoch of every head; returns each head's mean training loss."""
    logger = utils.MetricLogger()
    totals = torch.zeros(len(probe.lrs))
    for inputs, labels in utils.progress(loader, f"Epoch: [{epoch}]", detail=lambda: f"lowest {logger}"):
        features = feature_fn(inputs.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        logits = probe.module(features)
        losses = torch.stack([F.cross_entropy(head_logits, labels) for head_logits in logits])
        for optimizer in probe.optimizers:
            optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # heads share no parameters: each gets its own loss's gradient
        for optimizer in probe.optimizers:
            optimizer.step()
        totals += losses.detach().cpu()
        logger.update(loss=losses.min().item())
    for scheduler in probe.schedulers:
        scheduler.step()
    return (totals / len(loader)).tolist()


@torch.no_grad()
def evaluate(probe: Probe, loader: DataLoader, feature_fn: Callable, labels: torch.Tensor,
             device: torch.device) -> list[dict]:
    """Top-1 / top-5 (percent) of every head on the whole split, counted exactly across processes.

    ``loader`` yields ``(inputs, indices)`` over a dataset whose labels are ``labels`` ``[N]``.
    """
    probe.heads.eval()
    logits = extract_features(lambda inputs: probe.heads(feature_fn(inputs)).permute(1, 0, 2).flatten(1),
                              loader, device, "Validation:")
    probe.heads.train()
    logits = logits.view(len(labels), len(probe.lrs), -1)  # [N, heads, classes]
    k = min(5, logits.shape[-1])
    correct = logits.topk(k, dim=-1).indices == labels[:, None, None]
    return [{"lr": lr, "top1": 100.0 * correct[:, h, 0].float().mean().item(),
             "top5": 100.0 * correct[:, h].any(-1).float().mean().item()} for h, lr in enumerate(probe.lrs)]


# ----------------------------------------------------------------------------------------------
# What a checkpoint's heads belong to.
# ----------------------------------------------------------------------------------------------
# The features the heads read: the same tensors (whatever file or key they came from), the same layers, crop.
FEATURE_SETTINGS = ("weights_sha256", "n_last_blocks", "avgpool_patchtokens", "crop_size")
# And how they were trained and validated: a resume continues only the very same run.
TRAINING_SETTINGS = FEATURE_SETTINGS + ("data_path", "val_split", "resize_size", "epochs", "lrs", "total_batch_size",
                                        "seed")


def run_settings(args: argparse.Namespace, model: vits.VisionTransformer) -> dict:
    """The ``TRAINING_SETTINGS`` of this run, plus ``weights``, the label that names the weights in messages."""
    weights = (f"{args.pretrained_weights} (--checkpoint_key {args.checkpoint_key})" if args.pretrained_weights
               else "random_init")
    return {"weights": weights, "weights_sha256": utils.tensors_digest(model.state_dict()),
            "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens,
            "crop_size": args.crop_size, "data_path": str(Path(args.data_path).resolve()), "val_split": args.val_split,
            "resize_size": args.resize_size, "epochs": args.epochs, "lrs": [float(lr) for lr in args.lrs],
            "total_batch_size": args.batch_size_per_gpu * utils.get_world_size(), "seed": args.seed}


def describe_difference(name: str, saved: dict, current: dict) -> str:
    if name == "weights_sha256":
        return f"weights {saved.get('weights')} there, {current['weights']} now (other tensors)"
    if name == "total_batch_size":
        return f"total batch (--batch_size_per_gpu x processes) {saved.get(name)} there, {current[name]} now"
    return f"--{name} {saved.get(name)} there, {current[name]} now"


def matching_checkpoint(path: Path, settings: dict, keys: tuple[str, ...], required: bool) -> dict | None:
    """The linear checkpoint at ``path`` if its recorded settings equal ``settings`` on ``keys``; None when it does
    not exist and is not ``required``. Anything else stops, before any data is read, naming every difference."""
    if not required and not path.exists():
        return None
    checkpoint = load_probe_checkpoint(path)
    saved = checkpoint.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not record the weights and settings its heads were trained with (written by an "
                         "older eval_linear.py): its result cannot be told to belong to this run. Use another "
                         f"--output_dir, or move {path} away to start afresh.")
    differences = [describe_difference(name, saved, settings) for name in keys if saved.get(name) != settings[name]]
    if differences:
        raise ValueError(f"{path} holds heads of another linear evaluation ({'; '.join(differences)}); resuming or "
                         "evaluating them would report their result under this run's label. Use another "
                         f"--output_dir, move {path} away to start afresh, or rerun with its settings.")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def linear_train_transform(crop_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_data(args: argparse.Namespace):
    train_set = build_split(args.data_path, "train", linear_train_transform(args.crop_size))
    val_set = build_split(args.data_path, args.val_split, eval_transform(args.resize_size, args.crop_size),
                          IndexedImageFolder)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train and val classes differ: {train_set.classes} vs {val_set.classes}")
    if args.num_labels is not None and args.num_labels != len(train_set.classes):
        raise ValueError(f"--num_labels {args.num_labels}, but {Path(args.data_path) / 'train'} holds "
                         f"{len(train_set.classes)} classes, which decide the heads' outputs here: leave out "
                         f"--num_labels (or set it to {len(train_set.classes)}), or give the --data_path you meant")
    sampler = DistributedSampler(train_set, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                                 shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                              num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False)
    val_loader = sequential_loader(val_set, args.batch_size_per_gpu, args.num_workers)
    print(f"Data: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes")
    return train_loader, val_loader, torch.tensor(val_set.targets, dtype=torch.long), len(train_set.classes)


def report(results: list[dict], epoch: int | None = None) -> dict:
    best = max(results, key=lambda result: result["top1"])
    prefix = f"Epoch {epoch}: " if epoch is not None else ""
    for result in results:
        print(f"{prefix}lr {result['lr']:g}: top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f}")
    print(f"{prefix}best lr {best['lr']:g}: top-1 {best['top1']:.2f}, top-5 {best['top5']:.2f}")
    return best


def main(args: argparse.Namespace) -> dict:
    """Train (or resume, or only evaluate) the heads; returns the best head's result."""
    validate_args(args)
    output_dir = Path(args.output_dir)
    if not args.evaluate:  # --evaluate writes nothing
        utils.check_output_dir(output_dir, "--output_dir")
    if args.tensorboard:
        utils.check_tensorboard_dir(args.tensorboard)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    torch.manual_seed(args.seed)
    model = vits.build_frozen_backbone(args, img_size=args.crop_size)
    settings = run_settings(args, model)
    checkpoint_path = Path(args.head_weights) if args.evaluate and args.head_weights else output_dir / CHECKPOINT_NAME
    checkpoint = matching_checkpoint(checkpoint_path, settings, FEATURE_SETTINGS if args.evaluate else TRAINING_SETTINGS,
                                     required=args.evaluate)
    model = model.to(device)
    writes_output = utils.is_main_process() and not args.evaluate
    with utils.created_output_dir(output_dir) if writes_output else contextlib.nullcontext():
        best = train_or_evaluate(args, model, (checkpoint_path, checkpoint), settings, device)
    utils.report_final({"eval": "linear", "weights": args.pretrained_weights or "random_init", "best": best},
                       tensorboard=args.tensorboard)
    return best


def train_or_evaluate(args: argparse.Namespace, model: vits.VisionTransformer, source: tuple[Path, dict | None],
                      settings: dict, device: torch.device) -> dict:
    """Train the heads on ``model``'s features (continuing ``source``, the checkpoint and its path) or, with
    ``--evaluate``, evaluate its heads; returns the best head's result."""
    checkpoint_path, checkpoint = source
    train_loader, val_loader, val_labels, num_labels = build_data(args)
    feature_fn = partial(frozen_features, model, n_last_blocks=args.n_last_blocks,
                         avgpool_patchtokens=args.avgpool_patchtokens)
    dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    probe = Probe(dim, num_labels, args.lrs, args.epochs, args.batch_size_per_gpu * utils.get_world_size(), device)
    if args.evaluate:
        probe.load_state_dict(checkpoint["probe"], checkpoint_path, heads_only=True)
        return report(evaluate(probe, val_loader, feature_fn, val_labels, device))
    return train(args, probe, checkpoint, settings, (train_loader, val_loader, val_labels), feature_fn, device,
                 Path(args.output_dir))


def load_probe_checkpoint(path: Path) -> dict:
    """A linear-probe checkpoint (``probe``, ``epoch``, ``best``), or an error naming the file and the fix."""
    checkpoint = utils.load_checkpoint(path)
    utils.require_keys(checkpoint, ("probe", "epoch", "best"), path, "linear-probe checkpoint of eval_linear.py",
                       "pass a linear_checkpoint.pth written by eval_linear.py, or move the file away")
    return checkpoint


def train(args, probe: Probe, checkpoint: dict | None, settings: dict, data, feature_fn, device,
          output_dir: Path) -> dict:
    """Train the heads from where ``checkpoint`` (of ``<output_dir>/linear_checkpoint.pth``, or None) left off;
    ``data`` is ``(train_loader, val_loader, val_labels)``. Returns the best result."""
    train_loader, val_loader, val_labels = data
    checkpoint_path, log_path = output_dir / CHECKPOINT_NAME, output_dir / "log.txt"
    start_epoch, best = resume(probe, checkpoint, checkpoint_path, log_path)
    epochs = utils.Progress(args.epochs, "Linear probe epochs", done=start_epoch)
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_losses = train_one_epoch(probe, train_loader, feature_fn, device, epoch)
        record = {"epoch": epoch, "train_loss": dict(zip(map(str, probe.lrs), train_losses))}
        if (epoch + 1) % args.val_freq == 0 or epoch == args.epochs - 1:
            results = evaluate(probe, val_loader, feature_fn, val_labels, device)
            epoch_best = report(results, epoch)
            best = epoch_best if best is None or epoch_best["top1"] > best["top1"] else best
            record.update(val=results, best=best)
        if utils.is_main_process():
            # The log line first, the checkpoint last: the checkpoint is the commit point a restart trusts,
            # and the restart drops log lines it does not cover (a kill in between loses nothing).
            append_log_line(log_path, record)
            utils.save_atomic({"probe": probe.state_dict(), "epoch": epoch + 1, "best": best, "args": vars(args),
                               "settings": settings}, checkpoint_path)
        epochs.advance()
        print(epochs.line(), flush=True)  # an epoch is long: each ends with a line
    print(f"Best over training: lr {best['lr']:g}, top-1 {best['top1']:.2f}, top-5 {best['top5']:.2f}")
    return best


def append_log_line(log_path: Path, record: dict) -> None:
    """Add one JSON line to the log by rewriting it atomically (a few KiB): a failed write names the file and the
    free space, and never leaves a torn line."""
    previous = log_path.read_text() if log_path.exists() else ""
    utils.write_text_atomic(previous + json.dumps(record) + "\n", log_path)


def resume(probe: Probe, checkpoint: dict | None, checkpoint_path: Path, log_path: Path) -> tuple[int, dict | None]:
    """Load the heads from ``checkpoint`` (read from ``checkpoint_path``) if any; returns ``(next epoch, best so far)``.

    The main process also clears what a killed run left behind: a checkpoint temporary, and log lines
    of epochs the checkpoint does not cover (they are redone).
    """
    start_epoch, best = 0, None
    if checkpoint is not None:
        probe.load_state_dict(checkpoint["probe"], checkpoint_path)
        start_epoch, best = checkpoint["epoch"], checkpoint["best"]
        print(f"Resumed linear heads from {checkpoint_path} at epoch {start_epoch}")
    if utils.is_main_process():
        utils.remove_stale_temporaries(checkpoint_path.parent)
        utils.trim_epoch_log(log_path, start_epoch)
    return start_epoch, best


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
