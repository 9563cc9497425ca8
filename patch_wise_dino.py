"""PW-Self training: DINO self-distillation plus a loss on geometrically matched patch tokens.

Single process (CPU or one GPU):
    python patch_wise_dino.py --data_path /path/to/train --output_dir out
Several GPUs or nodes:
    torchrun --nproc_per_node=4 patch_wise_dino.py --data_path /path/to/train --output_dir out

Restarting the same command (also after ``kill -9``, or under ``torchrun --max_restarts``) resumes from
``<output_dir>/checkpoint.pth``, at the next iteration when ``--save_every_iters`` wrote it mid-epoch, and
ends with the weights an uninterrupted run would have: every random draw is a function of (seed, epoch,
rank, position in the epoch), never of the process history. Going back to an earlier checkpoint with other
arguments (``--resume_from`` with ``--allow_args_change``) starts a new lineage: ``args_history.jsonl``
records each one, and later periodic checkpoints of another lineage are moved into ``superseded_<time>/``,
never overwritten.

One run per output folder: rank 0 holds ``<output_dir>/.lock`` for the whole run, and a second process
started there is refused, naming the first. SIGTERM, SIGUSR1 (SLURM's ``--signal``) or Ctrl-C stop
training after the current step (every process after the same one), with checkpoint.pth written at that
exact iteration; the script then exits with ``STOPPED_EXIT_STATUS`` (3): stopped, not finished, resumable.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import initialisation
import utils
import vision_transformer as vits
from patch_matching import MATCHING_MODES
from device_augment import PATCH_BLURS, DevicePhotometric, normalize, same_size_runs
from pwself_loss import (NUM_GLOBAL_VIEWS, MatchedPairs, PatchWiseDINOLoss, compute_matches, logits_per_view,
                         matched_pairs, tokens_per_view)
from transforms_patch import MultiCropAugmentation, collate_multicrop
from vision_transformer import DINOHead

SAMPLE_SEED, STEP_SEED = 0, 1  # tags that keep the two kinds of derived seeds apart
PATCH_HEADS = ("shared", "separate", "ibot")  # --patch_head's values (build_student_teacher)
STOPPED_EXIT_STATUS = 3  # the command line's status when a signal stopped training: checkpoint saved, not finished
TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files, in --output_dir


# Options left unset (None) in a run from random weights take DINO's values; in a run started from weights
# (--init_weights) they take initialisation.continued_defaults (chosen on the holdout split). apply_defaults.
FROM_SCRATCH_DEFAULTS = {"lr": 0.0005, "warmup_epochs": 10, "momentum_teacher": 0.996, "freeze_backbone_epochs": 0}


def default_text(name: str) -> str:
    """The help text's account of an option's two defaults (from random weights, from --init_weights)."""
    scratch = FROM_SCRATCH_DEFAULTS[name]
    if name == "freeze_backbone_epochs":
        continued = (f"{initialisation.HEAD_WARMUP_EPOCHS} where the heads start fresh (the file holds none that fit, "
                     "or --init_heads false), else 0")
    else:
        continued = f'{initialisation.continued_defaults(FROM_SCRATCH_DEFAULTS["lr"])[name]:g}'
    return f"{scratch} from random weights; with --init_weights {continued} (chosen on holdout)"


def apply_defaults(args: argparse.Namespace, defaults: dict) -> None:
    """Give the options of ``defaults`` that are unset (None) its value; ``args.defaulted`` keeps every option
    so filled, so that a resume can fill them again the way the run it continues did."""
    unset = [name for name, value in defaults.items() if getattr(args, name) is None]
    for name in unset:
        setattr(args, name, defaults[name])
    args.defaulted = sorted(set(getattr(args, "defaulted", None) or ()) | set(unset))


def run_defaults(args: argparse.Namespace, init_record: dict | None = None) -> dict:
    """The defaults of this run: DINO's from random weights, ``initialisation.continued_defaults`` with
    ``--init_weights`` or when continuing an initialised run (``init_record``: its head warm-up too)."""
    if args.init_weights is None and init_record is None:
        return FROM_SCRATCH_DEFAULTS
    return initialisation.continued_defaults(FROM_SCRATCH_DEFAULTS["lr"], init_record)


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(
        __file__, "PW-Self training: DINO with a patch-level loss on matched tokens.", add_help=False,
        epilog=f"Exit status: 0 finished, 1 an error (its message names the fix), 2 bad arguments, "
               f"{STOPPED_EXIT_STATUS} stopped by SIGTERM, SIGUSR1 or Ctrl-C with checkpoint.pth saved (rerun the same "
               "command to continue), 130 a second Ctrl-C.")

    group = parser.add_argument_group("model")
    vits.add_backbone_args(group)
    group.add_argument("--out_dim", default=65536, type=int,
                       help="Number of prototypes K of the DINO head. Large K (65536) suits ImageNet; "
                            "smaller data sets do well with a few thousand.")
    group.add_argument("--head_hidden_dim", default=2048, type=int, help="Hidden width of the head's MLP.")
    group.add_argument("--head_bottleneck_dim", default=256, type=int, help="Width of the head's L2-normalised output.")
    group.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                       help="Freeze the scale of the head's weight-normalised last layer (true/false). "
                            "true is more stable; false often gives better features for ViT-S but may diverge.")
    group.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                       help="Batch norm in the head's MLP (true/false). Off for ViTs.")
    group.add_argument("--momentum_teacher", default=None, type=float,
                       help="Start of the teacher's EMA momentum; it rises to 1 on a cosine over training. "
                            "Use ~0.9995 for batches of 256 or less. Default: "
                            f"{default_text('momentum_teacher')}.")
    group.add_argument("--drop_path_rate", default=0.1, type=float, help="Stochastic depth of the student.")

    group = parser.add_argument_group("PW-Self loss")
    group.add_argument("--patch_loss", default=True, type=utils.bool_flag,
                       help="Add the loss on matched patch tokens (true/false). false trains exactly "
                            "DINO's CLS objective: the baseline.")
    group.add_argument("--cls_weight", default=None, type=float,
                       help="Weight lambda of the CLS term per view pair: lambda * CE_cls + (1 - lambda) * "
                            "mean CE_patches. Unset: every matched token (CLS included) counts the same, "
                            "as the authors' code does.")
    group.add_argument("--patch_head", default="shared", choices=PATCH_HEADS,
                       help="Which head the patch tokens go through. 'shared': CLS's DINO head and its "
                            "per-position center (the authors' default). 'separate': a second full DINO head "
                            "(own MLP and last layer, --patch_out_dim prototypes) with its own per-position center "
                            "and the CLS teacher-temperature schedule. 'ibot': the MLP shared with CLS and a second "
                            "last layer (--patch_out_dim prototypes), one patch center for all positions and the "
                            "patch temperature schedule (--teacher_patch_temp), as iBOT's iBOTHead with "
                            "shared_head=False (iBOT's released runs share the last layer too). With 'separate' "
                            "and 'ibot' CLS keeps DINO's head and center; both need --patch_loss true.")
    group.add_argument("--patch_out_dim", default=None, type=int,
                       help="Prototypes of the patch tokens' own last layer with --patch_head separate or ibot "
                            "(default: --out_dim); refused with the shared head, which has no such layer.")
    group.add_argument("--matching", default="upstream", choices=MATCHING_MODES,
                       help="Patch matching rule: 'upstream' (the authors', one-to-one) or 'centre' "
                            "(the teacher patch containing each student patch's centre).")

    group.add_argument("--fused_loss", default="auto", type=utils.auto_or_bool,
                       help="Compute the loss fused with the head's last layer, in chunks of tokens, with the "
                            "student head on matched tokens only (true), or from every token's [K] logits (false: "
                            "the straightforward computation). Same loss and gradients; the fused path's memory "
                            "does not grow with batch x tokens x K. auto: fused with the patch loss, plain for "
                            "DINO's CLS-only loss, whose logits are small enough that the fused path's extra "
                            "passes cost more than they save (measured: docs/performance.md).")
    group.add_argument("--loss_chunk_mib", default=512, type=int,
                       help="Size of one chunk of float32 logits in the fused loss, in MiB: its transient "
                            "memory is a few chunks; larger chunks mean fewer, larger kernels.")

    group.add_argument("--compile", default=False, type=utils.bool_flag,
                       help="torch.compile the student, the teacher and the fused loss's softmax kernels "
                            "(true/false): faster steps on a GPU after a few minutes of compilation at the start.")

    group = parser.add_argument_group("temperatures")
    group.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                       help="Teacher temperature at the start of training; lower it if the loss does not fall.")
    group.add_argument("--teacher_temp", default=0.04, type=float,
                       help="Teacher temperature after warm-up. Above 0.07 training tends to be unstable.")
    group.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                       help="Epochs of linear warm-up of the teacher temperature (and of --teacher_patch_temp; "
                            "iBOT warms both up over 30).")
    group.add_argument("--warmup_teacher_patch_temp", default=0.04, type=float,
                       help="With --patch_head ibot: the patch tokens' teacher temperature at the start (iBOT's "
                            "default). Refused with the other heads, whose patches follow --warmup_teacher_temp.")
    group.add_argument("--teacher_patch_temp", default=0.07, type=float,
                       help="With --patch_head ibot: the patch tokens' teacher temperature after warm-up (iBOT's "
                            "default). Refused with the other heads, whose patches follow --teacher_temp.")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="Mixed precision of the forward passes. auto: bf16 on a GPU that supports "
                            "it, else fp32. fp16 uses a gradient scaler and needs CUDA.")
    group.add_argument("--use_fp16", default=None, type=utils.bool_flag,
                       help="DINO's flag: true is --precision fp16, false --precision fp32 (refused next to a "
                            "--precision it contradicts).")
    group.add_argument("--weight_decay", default=0.04, type=float, help="Weight decay at the start (cosine schedule).")
    group.add_argument("--weight_decay_end", default=0.4, type=float, help="Weight decay at the end of training.")
    group.add_argument("--clip_grad", default=3.0, type=float,
                       help="Largest gradient norm of each parameter, clipped on its own; 0 disables clipping.")
    group.add_argument("--batch_size_per_gpu", default=64, type=int, help="Images per process and step.")
    group.add_argument("--epochs", default=100, type=int, help="Training epochs.")
    group.add_argument("--freeze_last_layer", default=1, type=int,
                       help="Epochs during which the head's last layer is not updated; helps early training.")
    group.add_argument("--lr", default=None, type=float,
                       help="Peak learning rate for a total batch of 256; it scales linearly with the total batch. "
                            f"Default: {default_text('lr')}.")
    group.add_argument("--warmup_epochs", default=None, type=int,
                       help=f"Epochs of linear learning-rate warm-up. Default: {default_text('warmup_epochs')}.")
    group.add_argument("--min_lr", default=1e-6, type=float, help="Learning rate at the end of the cosine decay.")
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"],
                       help="adamw for ViTs; sgd or lars mostly for convnets.")

    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                       help="Area range of the two global crops relative to the image.")
    group.add_argument("--global_crops_size", default=224, type=int,
                       help="Side of the global views in pixels; also the backbone's native size.")
    group.add_argument("--local_crops_number", default=8, type=int,
                       help="Number of local views (0: global views only).")
    group.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                       help="Area range of the local crops relative to the image.")
    group.add_argument("--local_crops_size", default=96, type=int, help="Side of the local views in pixels.")
    group.add_argument("--patch_augment", default=False, type=utils.bool_flag,
                       help="Patch-level photometric augmentation, the 2024 paper's (true/false): after a view's "
                            "usual augmentation, every patch-size tile gets its own small colour jitter "
                            "(brightness 0.1, hue 0.1), Gaussian blur (sigma 0.1-2; by default vertical over 5 "
                            "taps, see --patch_blur), sharpening (factor 2, p=0.5) and posterization (3 bits, "
                            "p=0.5), in a random order per tile. Geometry is unchanged.")
    group.add_argument("--patch_augment_p", default=1.0, type=float,
                       help="Probability that a view (global or local) is patch-augmented, with --patch_augment "
                            "true (refused without it).")
    group.add_argument("--patch_blur", default="authors", choices=list(PATCH_BLURS),
                       help="Kernel of the tile blur, with --patch_augment true (refused without it). authors: "
                            "their image_to_patches.py GaussianBlur kernel_size (1, 5), in torchvision's (width, "
                            "height) order, so vertical only over 5 taps; isotropic: a square kernel up to 13x13 "
                            "taps (3 sigma), about twice the change per pixel (runs from before this option).")
    group.add_argument("--gpu_augment", default=False, type=utils.bool_flag,
                       help="Run the photometric part of the augmentation (colour jitter, grayscale, blur, "
                            "solarization) on the training device, batched with per-sample random parameters "
                            "(true/false); the data workers then only decode, crop and flip.")

    group = parser.add_argument_group("run")
    group.add_argument("--data_path", required=True, type=str,
                       help="Training images: an ImageFolder (class sub-folders) or a flat folder of images.")
    group.add_argument("--output_dir", default=".", type=str,
                       help="Where logs and checkpoints are written, by one run at a time: a second run started "
                            "there is refused, naming the first.")
    group.add_argument("--saveckp_freq", default=20, type=int,
                       help="Keep checkpoint{epoch:04}.pth every this many epochs (0: never).")
    group.add_argument("--save_every_iters", default=0, type=int,
                       help="Also write checkpoint.pth every this many iterations within an epoch (0: only at "
                            "epoch ends). A restart continues at the next iteration, exactly as if uninterrupted.")
    group.add_argument("--resume_from", default=None, type=str,
                       help="Continue from this training checkpoint (e.g. a periodic checkpoint0099.pth) when "
                            "<output_dir>/checkpoint.pth does not exist; the file is only read. Training goes on "
                            "exactly as it did from there (log lines after it are redone) and writes checkpoint.pth, "
                            "which a rerun of the same command then continues from. Refused when checkpoint.pth "
                            "exists but was not written by a run resumed from this file. Later periodic checkpoints "
                            "in --output_dir that another lineage wrote (e.g. before a continuation with "
                            "--allow_args_change) are never overwritten: they are moved into a superseded_<time> "
                            "sub-folder, with copies of log.txt and args.json.")
    group.add_argument("--init_weights", default=None, type=str,
                       help="Continued pre-training: start student and teacher from these weights instead of random "
                            "ones: a file (DINO's released backbone, a DINO or pwself training checkpoint, a timm or "
                            "DINO state dict) or a released name (dino_vits16, ...: downloaded once). Their heads are "
                            "loaded too where the file holds heads of this run's shapes, else fresh. Not a resume: "
                            "epochs and schedules start at zero. What was loaded is printed and recorded "
                            "(init_record in args.json, init in log.txt); a restart resumes checkpoint.pth and "
                            "never loads the file again. The file must be of --arch/--patch_size's ViT.")
    group.add_argument("--init_checkpoint_key", default="teacher", type=str,
                       help="With --init_weights: the entry of a training checkpoint to start from (teacher or "
                            "student), backbone and head.")
    group.add_argument("--init_heads", default=True, type=utils.bool_flag,
                       help="With --init_weights: load the file's heads where they fit this run's (true), or start "
                            "fresh heads on its backbone (false).")
    group.add_argument("--freeze_backbone_epochs", default=None, type=int,
                       help="Train only the heads for this many first epochs: the backbone's weights stay bitwise "
                            "as loaded (no gradient step, no EMA), so that fresh heads on trained weights do not "
                            "send large random gradients into them. 0: off. Default: "
                            f"{default_text('freeze_backbone_epochs')}.")
    group.add_argument("--init_knn_data", default=None, type=str,
                       help="A folder with train/ and val/ class folders: the teacher's 20-NN top-1 there is printed "
                            "and recorded (knn_top1 in init_record) before the first step, the starting point of a run "
                            "initialised from weights.")
    group.add_argument("--allow_args_change", action="store_true",
                       help="Resume even though arguments that decide the result (RESUME_CRITICAL_ARGS: model, "
                            "loss, schedules, crops, batch size, seed, epochs) or the number of images or "
                            "processes differ from the checkpoint's; the run is then no longer an exact "
                            "continuation but a new lineage, recorded in <output_dir>/args_history.jsonl (start epoch, "
                            "time, each changed setting's old and new value, the arguments). Without it such a resume "
                            "stops and lists the differences.")
    group.add_argument("--strict_images", action="store_true",
                       help="Stop at the first unreadable (corrupt, truncated) image. By default it is reported "
                            "with its path, replaced by another image and counted (skipped_images in log.txt).")
    group.add_argument("--seed", default=0, type=int, help="Seed of initialisation, data order and augmentation.")
    group.add_argument("--num_workers", default=10, type=int, help="Data-loading processes per GPU.")
    utils.add_device_arg(group)
    utils.add_dino_launch_args(group)
    group.add_argument("--print_freq", default=10, type=int, help="Print a progress line every this many iterations.")
    group.add_argument("--tensorboard", default=False, type=utils.bool_flag,
                       help="Also write the training curves (train/loss, train/loss_cls, train/loss_patch, train/lr, "
                            "train/wd, train/teacher_temp, train/teacher_momentum, ...) at every iteration to "
                            "<output_dir>/tensorboard, for tensorboard --logdir <output_dir>/tensorboard (rank 0; "
                            "needs the tensorboard package). A resumed run continues the same curves.")
    parser.add_argument("-h", "--help", action="help", help="Show this message and exit.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Stop early, listing every argument that cannot work, with the fix named."""
    utils.apply_dino_launch_args(args)
    apply_use_fp16(args)
    apply_defaults(args, run_defaults(args))
    problems = (vits.check_backbone_args(args) + _count_problems(args) + _crop_problems(args)
                + _optimisation_problems(args) + _ineffective_option_problems(args) + _initialisation_problems(args)
                + _path_problems(args))
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))
    if args.tensorboard:
        utils.require_tensorboard()


def apply_use_fp16(args: argparse.Namespace) -> None:
    """DINO's ``--use_fp16 true/false`` as ``--precision fp16/fp32``; refused next to a ``--precision`` other than
    auto (the default) that it contradicts."""
    if args.use_fp16 is None:
        return
    implied = "fp16" if args.use_fp16 else "fp32"
    if args.precision not in ("auto", implied):
        raise ValueError(f"--use_fp16 {str(args.use_fp16).lower()} (DINO's flag for --precision {implied}) "
                         f"contradicts --precision {args.precision}: give only one of them")
    args.precision = implied


def _count_problems(args: argparse.Namespace) -> list[str]:
    """Sizes and counts that must be positive, or at least 0."""
    problems = [f"--{name} must be positive, got {getattr(args, name)}"
                for name in ("out_dim", "batch_size_per_gpu", "epochs", "print_freq", "global_crops_size",
                             "local_crops_size", "head_hidden_dim", "head_bottleneck_dim", "loss_chunk_mib")
                if getattr(args, name) <= 0]
    problems += [f"--{name} must be >= 0, got {getattr(args, name)}"
                 for name in ("local_crops_number", "num_workers", "saveckp_freq", "save_every_iters",
                              "warmup_epochs", "freeze_last_layer", "warmup_teacher_temp_epochs", "seed")
                 if getattr(args, name) < 0]
    return problems


def _crop_problems(args: argparse.Namespace) -> list[str]:
    """Crop sides that do not tile into patches, and crop scales outside (0, 1]."""
    problems = []
    sides = {"global_crops_size": True, "local_crops_size": args.local_crops_number > 0}
    if args.patch_size > 0:  # a non-positive patch is reported with the backbone's arguments
        problems += [f"--{name} {getattr(args, name)} is not a multiple of --patch_size {args.patch_size}"
                     for name, used in sides.items() if used and getattr(args, name) % args.patch_size]
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            problems.append(f"--{name} must satisfy 0 < min <= max <= 1, got {low} {high}")
    return problems


def _optimisation_problems(args: argparse.Namespace) -> list[str]:
    """Optimisation, regularisation and loss settings outside the range where they mean something."""
    # A negative learning rate is gradient ascent, a negative clip an inverted gradient: never intended.
    problems = [f"--{name} must be a number >= 0, got {getattr(args, name)}"
                for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad")
                if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0)]
    if not 0 <= args.drop_path_rate < 1:  # a rate of 1 drops every block: a division by zero in timm
        problems.append(f"--drop_path_rate must lie in [0, 1), got {args.drop_path_rate}")
    if not 0 <= args.momentum_teacher <= 1:
        problems.append(f"--momentum_teacher must lie in [0, 1], got {args.momentum_teacher}")
    if not 0 <= args.patch_augment_p <= 1:
        problems.append(f"--patch_augment_p must lie in [0, 1], got {args.patch_augment_p}")
    if args.patch_head != "shared" and not args.patch_loss:
        problems.append(f"--patch_head {args.patch_head} needs --patch_loss true (without the patch loss there are "
                        "no patch tokens for it): set --patch_loss true, or --patch_head shared for DINO's loss")
    if args.patch_out_dim is not None and args.patch_out_dim <= 0:
        problems.append(f"--patch_out_dim must be positive, got {args.patch_out_dim}")
    if args.cls_weight is not None and not 0 <= args.cls_weight <= 1:
        problems.append(f"--cls_weight must lie in [0, 1], got {args.cls_weight}")
    temperatures = ("warmup_teacher_temp", "teacher_temp", "warmup_teacher_patch_temp", "teacher_patch_temp")
    if not all(getattr(args, name) > 0 for name in temperatures):
        problems.append("teacher temperatures must be positive: " + ", ".join(
            f"--{name} {getattr(args, name)}" for name in temperatures if not getattr(args, name) > 0))
    if args.warmup_teacher_temp_epochs > args.epochs:
        problems.append("--warmup_teacher_temp_epochs cannot exceed --epochs")
    return problems


def _ineffective_option_problems(args: argparse.Namespace) -> list[str]:
    """Options set away from their default in a run where they would do nothing, each with what it needs: a
    silently ignored option makes a run look like what it is not. Default values are never refused."""
    no_warmup = args.warmup_teacher_temp_epochs == 0
    needs = [  # (option, whether it acts in this run, what it needs to act)
        ("patch_out_dim", args.patch_head != "shared",
         "--patch_head separate or ibot (the shared head gives patch tokens the CLS head's --out_dim prototypes)"),
        ("patch_augment_p", args.patch_augment, "--patch_augment true"),
        ("patch_blur", args.patch_augment, "--patch_augment true"),
        ("warmup_teacher_patch_temp", args.patch_head == "ibot",
         "--patch_head ibot (the other heads' patch tokens follow --warmup_teacher_temp)"),
        ("teacher_patch_temp", args.patch_head == "ibot",
         "--patch_head ibot (the other heads' patch tokens follow --teacher_temp)"),
        ("cls_weight", args.patch_loss, "--patch_loss true (without patch tokens CLS is the whole loss)"),
        ("init_checkpoint_key", args.init_weights is not None, "--init_weights"),
        ("init_heads", args.init_weights is not None, "--init_weights"),
        ("matching", args.patch_loss, "--patch_loss true (without patch tokens nothing is matched)"),
        ("loss_chunk_mib", uses_fused_loss(args),
         "the fused loss (--fused_loss true, or auto with --patch_loss true)"),
        # Without a warm-up the start value is never used; equal to the end value it changes nothing either way.
        ("warmup_teacher_temp", not no_warmup or args.warmup_teacher_temp == args.teacher_temp,
         f"--warmup_teacher_temp_epochs above 0 (without a warm-up training starts at --teacher_temp "
         f"{args.teacher_temp})"),
        ("warmup_teacher_patch_temp", args.patch_head != "ibot" or not no_warmup
         or args.warmup_teacher_patch_temp == args.teacher_patch_temp,
         f"--warmup_teacher_temp_epochs above 0 (without a warm-up the patch tokens start at --teacher_patch_temp "
         f"{args.teacher_patch_temp})"),
    ]
    defaults = get_args_parser()
    return [f"--{name} {getattr(args, name)} has no effect in this run: it needs {need}; set that, or leave "
            f"--{name} out" for name, acts, need in needs
            if not acts and getattr(args, name) != defaults.get_default(name)]


def _initialisation_problems(args: argparse.Namespace) -> list[str]:
    """``--init_weights`` and its companions: a file that does not exist, a resume asked at the same time,
    a frozen backbone beyond the run, a k-NN folder that is not one."""
    problems = []
    if args.init_weights is not None:
        if vits.reference_weights(args.init_weights) is None and not Path(args.init_weights).is_file():
            problems.append(f"--init_weights {args.init_weights} is neither a file nor a released name "
                            f"({', '.join(vits.REFERENCE_WEIGHTS)})")
        if args.resume_from is not None:
            problems.append("--init_weights starts a new run and --resume_from continues one: give one of them")
    if args.freeze_backbone_epochs is not None and not 0 <= args.freeze_backbone_epochs <= args.epochs:
        problems.append(f"--freeze_backbone_epochs {args.freeze_backbone_epochs} must lie in [0, --epochs "
                        f"{args.epochs}]")

    if args.init_knn_data is not None and not all((Path(args.init_knn_data) / split).is_dir()
                                                  for split in ("train", "val")):
        problems.append(f"--init_knn_data {args.init_knn_data} must hold train/ and val/ class folders")
    return problems


def _path_problems(args: argparse.Namespace) -> list[str]:
    """A missing data folder, or an output folder that cannot be created because a file is in the way."""
    problems = [] if Path(args.data_path).is_dir() else [f"--data_path {args.data_path} is not a folder"]
    output_dir = Path(args.output_dir)
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    if not existing.is_dir():
        problems.append(f"--output_dir {args.output_dir} cannot be a folder: {existing} is a file; "
                        "choose another --output_dir")
    return problems


# ----------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------
class TrainingImages(Dataset):
    """Augmented training images addressed by ``(index, seed)``: a sample is a function of those alone.

    The augmentation draws from torch's generator seeded with ``seed`` (the caller's generator is left as
    it was), so the views of a sample do not depend on which process or worker makes them. An unreadable
    image is reported on stderr with its path and replaced by another one drawn from the same seed; with
    ``strict`` it raises ``utils.UnreadableImageError`` instead.

    Returns ``((views, geometry), replaced)``: the augmentation's output and how many unreadable images
    were skipped to make this sample.
    """

    max_attempts = 10  # unreadable images in a row before training stops

    def __init__(self, files: list[Path], transform, strict: bool = False):
        self.files, self.transform, self.strict = files, transform, strict

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with utils.seeded_cpu_rng(seed):
            image, replaced = self._read_or_replace(index)
            return self.transform(image), replaced

    def _read_or_replace(self, index: int) -> tuple[Image.Image, int]:
        """The image at ``index`` or, if unreadable, at seeded random indices; and the number skipped."""
        for attempt in range(self.max_attempts):
            tried = self.files[index]
            try:
                return utils.read_rgb_image(tried), attempt
            except utils.UnreadableImageError as error:
                if self.strict:
                    raise utils.UnreadableImageError(f"{error} (--strict_images: fix or remove the file, or "
                                                     "drop --strict_images to skip unreadable images)") from None
                sys.stderr.write(f"warning: {error}; skipped, replaced by another image\n")
                index = int(torch.randint(len(self.files), ()))
        raise RuntimeError(f"{self.max_attempts} unreadable images in a row (the last {tried}); "
                           "check --data_path")


class ResumableSampler(DistributedSampler):
    """This process's share of a seeded shuffle of the dataset (``DistributedSampler``), as
    ``(index, sample seed)`` items, from any position of the epoch.

    ``set_epoch(epoch, start)`` skips the first ``start`` items of the epoch's order without reading them.
    The seed of the item at position ``p`` is derived from ``(seed, epoch, rank, p)``: a resumed epoch
    gives every remaining sample exactly the views the uninterrupted epoch gives it.
    """

    def __init__(self, dataset: Dataset, seed: int):
        super().__init__(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=True,
                         seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            yield indices[position], utils.derived_seed(self.seed, self.epoch, self.rank, SAMPLE_SEED, position)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


# ----------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------
class MultiCropWrapper(nn.Module):
    """Backbone + head(s) over a list of views; consecutive views of one size share a backbone pass.

    Tokens are numbered in one flat layout: view by view, sample by sample, token by token, with
    ``T_v = 1 + N_v`` tokens per view when ``patch_tokens`` is set and ``T_v = 1`` (CLS only) when not.
    The output is the heads' embeddings (their last layers' input) and the last layers' weights, so that
    the loss can apply those linear layers itself, chunk by chunk, to the tokens it needs. The layouts of
    ``--patch_head``: every token through ``head`` (shared); CLS through ``head`` and patches through a second
    full head ``patch_head`` (separate, keys ``patch_head.*``); every token through ``head``'s MLP, CLS through its
    ``last_layer`` and patches through its ``last_layer2`` (ibot, keys ``head.last_layer2.*``). The other keys,
    ``backbone.*`` and ``head.*``, stay DINO's.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_tokens: bool, patch_head: DINOHead | None = None):
        super().__init__()
        if patch_head is not None and head.last_layer2 is not None:
            raise ValueError("patch tokens get either a separate patch head or the head's last_layer2, not both")
        self.backbone, self.head, self.patch_head, self.patch_tokens = backbone, head, patch_head, patch_tokens

    @property
    def heads(self) -> list[DINOHead]:
        """The heads whose MLPs embed tokens: ``[head]``, or ``[head, patch_head]`` (CLS, then the patches)."""
        return [self.head] + ([self.patch_head] if self.patch_head is not None else [])

    @property
    def last_layers(self) -> list[vits.WeightNormLinear]:
        """The last layers in ``pwself_loss.head_positions`` order: ``head.last_layer``, then the patches' own
        (``patch_head.last_layer`` or ``head.last_layer2``) when there is one."""
        patch_layer = self.head.last_layer2 if self.patch_head is None else self.patch_head.last_layer
        return [self.head.last_layer] + ([patch_layer] if patch_layer is not None else [])

    def forward(self, views: list[torch.Tensor],
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Views ``V x [B, 3, S_v, S_v]`` -> embeddings ``[R, d]`` and the weight ``[K_h, d]`` of each last layer.

        ``rows`` (int64 ``[R]``) picks tokens of the flat layout before the heads, which then run on
        those alone; ``None`` keeps all ``sum_v B * T_v``. A head with batch norm always sees every
        token it serves (its statistics must not depend on the selection).
        """
        outputs = [self._tokens(torch.cat([views[v] for v in run])) for run in same_size_runs(views)]
        tokens = torch.cat([output.flatten(0, 1) for output in outputs])
        is_cls = _cls_flags(outputs) if len(self.heads) > 1 else None
        if rows is not None and not any(isinstance(m, nn.BatchNorm1d) for h in self.heads for m in h.mlp.modules()):
            is_cls = None if is_cls is None else is_cls[rows]
            tokens, rows = tokens[rows], None  # the heads run on the selected tokens only
        embeddings = self._embed(tokens, is_cls)
        return (embeddings if rows is None else embeddings[rows]), tuple(layer.weight for layer in self.last_layers)

    def _embed(self, tokens: torch.Tensor, is_cls: torch.Tensor) -> torch.Tensor:
        """Tokens ``[R, D]`` -> embeddings ``[R, d]``: all through ``head``, or CLS (``is_cls [R]``) through ``head``
        and the others through ``patch_head``."""
        if len(self.heads) == 1:
            return self.head.embed(tokens)
        cls_part, patch_part = self.head.embed(tokens[is_cls]), self.patch_head.embed(tokens[~is_cls])
        embeddings = cls_part.new_empty(len(tokens), cls_part.shape[-1])
        embeddings[is_cls], embeddings[~is_cls] = cls_part, patch_part
        return embeddings

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone output ``[n, T, D]``: every token, or only CLS (``T = 1``)."""
        return self.backbone.forward_features(images) if self.patch_tokens else self.backbone(images)[:, None]


def _cls_flags(outputs: list[torch.Tensor]) -> torch.Tensor:
    """bool ``[sum n * T]`` for backbone outputs ``[n, T, D]``: whether each token of the flat layout is a CLS token."""
    return torch.cat([(torch.arange(output.shape[1], device=output.device) == 0).repeat(output.shape[0])
                      for output in outputs])


def build_student_teacher(args: argparse.Namespace, native_patches: int | None = None,
                          ) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop-path) and teacher (a frozen copy of the student's weights), both with the heads of
    ``--patch_head`` (``MultiCropWrapper``)."""
    def head(width: int, out_dim: int, second_out_dim: int | None = None) -> DINOHead:
        return DINOHead(width, out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer,
                        hidden_dim=args.head_hidden_dim, bottleneck_dim=args.head_bottleneck_dim,
                        patch_out_dim=second_out_dim)

    def wrap(backbone: nn.Module) -> MultiCropWrapper:
        width, patch_dim = backbone.embed_dim, patch_out_dim(args)
        cls_head = head(width, args.out_dim, patch_dim if args.patch_head == "ibot" else None)
        patch_head = head(width, patch_dim) if args.patch_head == "separate" else None
        return MultiCropWrapper(backbone, cls_head, args.patch_loss, patch_head)

    student_backbone = vits.build_backbone(args, args.global_crops_size, args.drop_path_rate)
    teacher_backbone = vits.build_backbone(args, args.global_crops_size)
    if native_patches is not None and native_patches != student_backbone.pos_embed.shape[1] - 1:
        for backbone in (student_backbone, teacher_backbone):  # before the optimizer and DDP see the parameter
            backbone.set_native_grid(native_patches)
        print(student_backbone.native_grid_note(), flush=True)
    student, teacher = wrap(student_backbone), wrap(teacher_backbone)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return student, teacher


# ----------------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------------
def teacher_temperature_schedule(args: argparse.Namespace) -> np.ndarray:
    """Per-epoch teacher temperature (of CLS, and of every token but with ``--patch_head ibot``): linear warm-up
    from ``--warmup_teacher_temp`` to ``--teacher_temp`` over ``--warmup_teacher_temp_epochs``, then constant."""
    return _warmup_then_constant(args.warmup_teacher_temp, args.teacher_temp, args)


def patch_teacher_temperature_schedule(args: argparse.Namespace) -> np.ndarray | None:
    """Per-epoch teacher temperature of the patch tokens with ``--patch_head ibot`` (iBOT's ``teacher_temp2``):
    ``--warmup_teacher_patch_temp`` to ``--teacher_patch_temp`` over the same warm-up epochs, then constant.
    None with the other heads: their patch tokens follow ``teacher_temperature_schedule``."""
    if args.patch_head != "ibot":
        return None
    return _warmup_then_constant(args.warmup_teacher_patch_temp, args.teacher_patch_temp, args)


def _warmup_then_constant(start: float, end: float, args: argparse.Namespace) -> np.ndarray:
    """``[epochs]``: linear from ``start`` to ``end`` over ``--warmup_teacher_temp_epochs``, then ``end``."""
    warmup = np.linspace(start, end, args.warmup_teacher_temp_epochs)
    return np.concatenate([warmup, np.full(args.epochs - args.warmup_teacher_temp_epochs, end)])


def build_loss(args: argparse.Namespace) -> PatchWiseDINOLoss:
    num_positions = 1 + (args.global_crops_size // args.patch_size) ** 2 if args.patch_loss else 1
    return PatchWiseDINOLoss(args.out_dim, num_positions, teacher_temperature_schedule(args),
                             cls_weight=args.cls_weight, chunk_elements=args.loss_chunk_mib * 2 ** 18,
                             compile=args.compile, patch_out_dim=patch_out_dim(args),
                             one_patch_center=args.patch_head == "ibot",
                             patch_teacher_temps=patch_teacher_temperature_schedule(args))


def patch_out_dim(args: argparse.Namespace) -> int | None:
    """Prototypes of the patch tokens' own last layer (``--patch_head separate`` or ``ibot``): ``--patch_out_dim``,
    by default ``--out_dim``; None with the shared head."""
    if args.patch_head == "shared":
        return None
    return args.out_dim if args.patch_out_dim is None else args.patch_out_dim


def patch_augment_probability(args: argparse.Namespace) -> float:
    """Probability that a view is patch-augmented: ``--patch_augment_p`` with ``--patch_augment``, else 0
    (then no random number is drawn for it: runs without it are as before)."""
    return args.patch_augment_p if args.patch_augment else 0.0


def uses_fused_loss(args: argparse.Namespace) -> bool:
    """``--fused_loss``, with ``auto`` resolved: fused when patch tokens are in the loss. With CLS tokens only,
    the logits (``B x views x K``) are small and the plain computation measured faster on CPU."""
    return args.patch_loss if args.fused_loss == "auto" else args.fused_loss


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------
def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--precision`` (None: full fp32)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class Schedules:
    """Per-iteration learning rate, weight decay and teacher momentum over the whole run."""

    def __init__(self, args: argparse.Namespace, iters_per_epoch: int):
        self.iters_per_epoch = iters_per_epoch
        total_batch = args.batch_size_per_gpu * utils.get_world_size()
        self.lr = utils.cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs, iters_per_epoch,
                                         warmup_epochs=args.warmup_epochs)
        self.wd = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
        self.momentum = utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = float(self.lr[iteration])
            if index == 0:  # only the regularised group decays
                group["weight_decay"] = float(self.wd[iteration])


class TrainingStopped(RuntimeError):
    """Training stopped on a signal after writing checkpoint.pth; the command line exits with
    ``STOPPED_EXIT_STATUS``."""

    def __init__(self, signal_name: str | None, point: ResumePoint, output_dir: Path):
        super().__init__(f"stopped on {signal_name or 'a signal received by another process'}: "
                         f"{output_dir / 'checkpoint.pth'} is saved to continue at epoch {point.epoch}, iteration "
                         f"{point.iteration} (the next step); rerun the same command to continue exactly")


@dataclass
class ResumePoint:
    """Where training continues: iteration ``iteration`` of epoch ``epoch`` (0: the epoch's start), with
    the epoch's metric totals so far (``MetricLogger.global_totals``; kept by rank 0 only)."""

    epoch: int = 0
    iteration: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)


class Trainer:
    """Everything one training step touches, and the step itself."""

    def __init__(self, args, student, teacher, loss_fn, optimizer, schedules, scaler, autocast_dtype, device,
                 run_facts: dict[str, int]):
        self.args, self.student, self.teacher, self.loss_fn = args, student, teacher, loss_fn
        self.optimizer, self.schedules, self.scaler = optimizer, schedules, scaler
        self.autocast_dtype, self.device = autocast_dtype, device
        self.run_facts = run_facts  # what else, besides the arguments, an exact resume needs unchanged
        self.student_module = student.module if isinstance(student, DistributedDataParallel) else student
        self.device_photometric = (DevicePhotometric(args.local_crops_number, patch_size=args.patch_size,
                                                     patch_augment_p=patch_augment_probability(args),
                                                     patch_blur=args.patch_blur)
                                   if args.gpu_augment else None)
        self.stop_signals = utils.StopSignals()  # main installs it around the training loop
        self.stop_agreed = False  # under torchrun: a process had received a stop signal by the last step
        self.resumed_from: str | None = None  # the --resume_from file this run started from (kept in checkpoints)
        # The run's line of descent, kept in its checkpoints: a resume with unchanged settings takes the
        # checkpoint's; a fresh start or a change (--allow_args_change) begins a new one. Periodic checkpoints of
        # another lineage are never overwritten (set_aside_other_lineages).
        self.lineage: str | None = uuid.uuid4().hex[:12]
        self.started_from: str | None = None  # the checkpoint this process resumed, if any
        self.args_changes: dict[str, list] = {}  # the settings changed at that resume: {name: [checkpoint, now]}
        self.fused_loss = uses_fused_loss(args)
        self.curves = None  # --tensorboard's SummaryWriter on rank 0 (open_curves), else None

    def step(self, images: list[torch.Tensor], geometry: torch.Tensor, epoch: int, iteration: int,
             iteration_in_epoch: int) -> dict[str, float]:
        """One optimisation step on a batch: views ``V x [B, 3, S, S]``, geometry ``[B, V, 6]``.

        The step's own random draws (drop-path) are seeded from (seed, epoch, rank, iteration), so a
        resumed run repeats them exactly. Afterwards ``stop_due`` says whether training should stop.
        """
        torch.manual_seed(utils.derived_seed(self.args.seed, epoch, utils.get_rank(), STEP_SEED, iteration_in_epoch))
        self._vote_to_stop()
        self.schedules.apply(self.optimizer, iteration)
        images = self._prepare_views(images)
        matches = compute_matches(geometry.to(self.device, non_blocking=True), self.args.patch_size,
                                  self.args.matching, self.args.patch_loss)
        if self.fused_loss:
            loss, stats = self._fused_loss(images, matched_pairs(matches, self.args.cls_weight), epoch)
        else:
            loss, stats = self._reference_loss(images, matches, epoch)
        stats = {name: value.item() for name, value in stats.items()}
        loss_value = loss.item()
        if utils.is_distributed():  # the votes came with the loss: reading them now costs no extra wait
            self.stop_agreed = self.loss_fn.piggyback.item() > 0
        if not math.isfinite(loss_value):
            self._stop_on_non_finite(loss_value, stats, epoch, iteration_in_epoch)
        self._optimise(loss, epoch)
        momentum = float(self.schedules.momentum[iteration])
        if self.backbone_frozen(epoch):  # only the heads move: the teacher's backbone stays bitwise as loaded
            for name, teacher_part in self.teacher.named_children():
                if name != "backbone":
                    utils.ema_update(teacher_part, getattr(self.student_module, name), momentum)
        else:
            utils.ema_update(self.teacher, self.student_module, momentum)
        if not self.args.patch_loss:
            stats = {k: v for k, v in stats.items() if k not in ("loss_patch", "matched_patches")}
        return {"loss": loss_value, **stats, "lr": self.optimizer.param_groups[0]["lr"],
                "wd": self.optimizer.param_groups[0]["weight_decay"], "teacher_momentum": momentum,
                "teacher_temp": float(self.loss_fn.teacher_temps[epoch]), **self._patch_temperature(epoch)}

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether only the heads train in ``epoch`` (``--freeze_backbone_epochs``)."""
        return epoch < self.args.freeze_backbone_epochs

    def _patch_temperature(self, epoch: int) -> dict[str, float]:
        """``teacher_patch_temp`` for the log when the patch tokens have their own schedule (``--patch_head ibot``)."""
        if self.loss_fn.patch_teacher_temps is None:
            return {}
        return {"teacher_patch_temp": float(self.loss_fn.patch_teacher_temps[epoch])}

    def _vote_to_stop(self) -> None:
        """Under torchrun, this process's vote (has it received a stop signal?) rides on the loss's center
        all-reduce: a signal may reach only some processes, and all must stop after the same step."""
        if utils.is_distributed():
            received = float(self.stop_signals.received is not None)
            self.loss_fn.piggyback = torch.full((1,), received, device=self.device)

    def stop_due(self) -> bool:
        """After a step, whether to stop: under torchrun, whether any process had voted to by that step (so
        that all agree); in a single process, whether a stop signal has arrived."""
        if utils.is_distributed():
            return self.stop_agreed
        return self.stop_signals.received is not None

    def _prepare_views(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The loader's uint8 views, on the device: photometrically augmented (``--gpu_augment``), normalised."""
        images = [view.to(self.device, non_blocking=True) for view in images]
        if self.device_photometric is not None:
            return self.device_photometric(images)
        return [normalize(view) for view in images]

    def _fused_loss(self, images: list[torch.Tensor], pairs: MatchedPairs, epoch: int) -> tuple[torch.Tensor, dict]:
        """Forward passes to head embeddings (the student head on matched tokens only), then the fused loss."""
        with self._autocast():
            with torch.no_grad():
                teacher_z, teacher_weights = self.teacher(images[:NUM_GLOBAL_VIEWS])  # only the global views
            student_z, student_weights = self.student(images, pairs.rows)
        return self.loss_fn(student_z, student_weights, teacher_z, teacher_weights, pairs, epoch, self.autocast_dtype)

    def _reference_loss(self, images: list[torch.Tensor], matches: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        """Forward passes to every token's logits, then the straightforward loss."""
        tokens, batch = tokens_per_view(matches), len(images[0])
        with self._autocast():
            with torch.no_grad():
                teacher_logits = logits_per_view(*self.teacher(images[:NUM_GLOBAL_VIEWS]),
                                                 tokens[:NUM_GLOBAL_VIEWS], batch)
            student_logits = logits_per_view(*self.student(images), tokens, batch)
        return self.loss_fn.reference(student_logits, teacher_logits, matches, epoch)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _optimise(self, loss: torch.Tensor, epoch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.args.clip_grad:
            utils.clip_gradients(self.student_module, self.args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, self.student_module, self.args.freeze_last_layer)
        if self.backbone_frozen(epoch):  # no gradient: AdamW leaves the weights and their moments as they are
            for parameter in self.student_module.backbone.parameters():
                parameter.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _stop_on_non_finite(self, loss: float, stats: dict, epoch: int, iteration: int) -> None:
        parts = ", ".join(f"{name}={value:.6g}" for name, value in stats.items())
        raise FloatingPointError(
            f"loss is {loss} at epoch {epoch}, iteration {iteration} ({parts}, "
            f"lr={self.optimizer.param_groups[0]['lr']:.6g}); training stopped. The last good checkpoint in "
            f"{self.args.output_dir} is untouched. Try a lower --lr, --precision fp32 or bf16, or a "
            f"lower --teacher_temp.")

    def train_one_epoch(self, loader: DataLoader, epoch: int, start: ResumePoint,
                        run: utils.Progress | None = None) -> dict[str, float]:
        """Run ``epoch`` from iteration ``start.iteration`` (the loader must start there too), writing
        checkpoint.pth every ``--save_every_iters``; returns the epoch's mean statistics and its total
        ``skipped_images``. A stop signal before the epoch's last step saves and raises ``TrainingStopped``.
        ``run``: the whole run's progress, whose ETA the progress lines show."""
        logger = utils.MetricLogger()
        logger.add_totals(start.metrics)
        header = f"Epoch: [{epoch}/{self.args.epochs}]"
        batches = logger.log_every(loader, self.args.print_freq, header, run)
        for index, (images, geometry, replaced) in enumerate(batches, start=start.iteration):
            iteration = epoch * self.schedules.iters_per_epoch + index
            stats = self.step(images, geometry, epoch, iteration, index)
            logger.update(**stats, skipped_images=replaced.sum().item())
            if self.curves is not None:
                for name, value in stats.items():
                    self.curves.add_scalar(f"train/{name}", value, iteration)
            if self.stop_due() and index + 1 < self.schedules.iters_per_epoch:  # at the last, the epoch ends first
                self.stop(ResumePoint(epoch, index + 1, logger.global_totals()))
            if self.mid_epoch_save_due(iteration, index):
                save_checkpoint(self, ResumePoint(epoch, index + 1, logger.global_totals()))
        logger.synchronize_between_processes()
        print("Averaged stats:", logger, flush=True)
        stats = logger.global_averages()
        stats["skipped_images"] = int(logger.meters["skipped_images"].total)
        if stats["skipped_images"]:
            print(f"warning: {stats['skipped_images']} unreadable image(s) skipped in epoch {epoch} (paths above)")
        return stats

    def stop(self, point: ResumePoint) -> None:
        """Every process: write checkpoint.pth (rank 0) so that a restart continues at ``point``, then raise
        ``TrainingStopped``."""
        save_checkpoint(self, point)
        raise self.stopped(point)

    def stopped(self, point: ResumePoint) -> TrainingStopped:
        """The error that ends training stopped by a signal at ``point``, printed by rank 0 now: stop signals
        are still caught, so that torchrun's SIGTERM, sent once another process has exited, cannot cut it off."""
        stopped = TrainingStopped(self.stop_signals.received, point, Path(self.args.output_dir))
        print(stopped, flush=True)
        return stopped

    def mid_epoch_save_due(self, iteration: int, iteration_in_epoch: int) -> bool:
        """Whether ``--save_every_iters`` asks for a checkpoint after this iteration (epoch ends save anyway)."""
        every = self.args.save_every_iters
        return bool(every) and (iteration + 1) % every == 0 and iteration_in_epoch + 1 < self.schedules.iters_per_epoch


# ----------------------------------------------------------------------------------------------
# Checkpoints and resuming.
# ----------------------------------------------------------------------------------------------
RESUME_CRITICAL_ARGS = (
    "arch", "patch_size", "embed_dim", "depth", "num_heads", "out_dim", "head_hidden_dim", "head_bottleneck_dim",
    "norm_last_layer", "use_bn_in_head", "momentum_teacher", "drop_path_rate", "patch_loss", "cls_weight",
    "matching", "patch_head", "patch_out_dim", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs",
    "warmup_teacher_patch_temp", "teacher_patch_temp",
    "precision", "weight_decay", "weight_decay_end", "clip_grad", "batch_size_per_gpu", "epochs", "freeze_last_layer",
    "lr", "warmup_epochs", "min_lr", "optimizer", "global_crops_scale", "global_crops_size", "local_crops_number",
    "local_crops_scale", "local_crops_size", "patch_augment", "patch_augment_p", "patch_blur", "gpu_augment", "seed",
    "freeze_backbone_epochs")


def checkpoint_state(trainer: Trainer, point: ResumePoint) -> dict:
    """DINO's checkpoint layout (student, teacher, optimizer, epoch, args, dino_loss) plus ``iteration``,
    ``epoch_metrics``, ``run`` (image and process counts), ``resumed_from`` (the ``--resume_from`` file
    the run started from, or None) and ``lineage`` (``Trainer.lineage``): ``epoch``/``iteration`` is the next step."""
    state = {"student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict(),
             "optimizer": trainer.optimizer.state_dict(), "epoch": point.epoch, "iteration": point.iteration,
             "epoch_metrics": point.metrics, "args": vars(trainer.args), "run": trainer.run_facts,
             "dino_loss": trainer.loss_fn.state_dict(), "resumed_from": trainer.resumed_from,
             "lineage": trainer.lineage}
    if trainer.scaler is not None:
        state["fp16_scaler"] = trainer.scaler.state_dict()
    return state


def check_finite_weights(trainer: Trainer, point: ResumePoint) -> None:
    """Refuse to checkpoint non-finite weights: the last good checkpoint must survive a divergence."""
    parameters = list(trainer.student.parameters())
    if not torch.stack([torch.isfinite(p).all() for p in parameters]).all():
        raise FloatingPointError(
            f"the student's weights are not finite at the checkpoint for epoch {point.epoch}, iteration "
            f"{point.iteration} (the next step); not saved, and the last good checkpoint in "
            f"{trainer.args.output_dir} is untouched. Try a lower --lr or --clip_grad, --precision fp32 or bf16, "
            "or a lower --teacher_temp.")


def save_checkpoint(trainer: Trainer, point: ResumePoint, also: tuple[Path, ...] = ()) -> None:
    """Rank 0: write checkpoint.pth (atomically, after any ``also`` copies) so that a restart continues at ``point``."""
    if not utils.is_main_process():
        return
    check_finite_weights(trainer, point)
    state = checkpoint_state(trainer, point)
    path = Path(trainer.args.output_dir) / "checkpoint.pth"
    for copy in (*also, path):  # checkpoint.pth last: it is the commit point a restart trusts
        utils.save_atomic(state, copy)
    print(f"Saved {path}: next epoch {point.epoch}, iteration {point.iteration}", flush=True)


def restore_checkpoint(output_dir: Path, trainer: Trainer, source: tuple[Path, dict | None]) -> ResumePoint:
    """Load the checkpoint to continue from (``source``, as ``resume_checkpoint`` gives it) into the trainer and
    return where to continue (the start without one).

    A file that is not a complete training checkpoint, holds non-finite values, or was written with other
    result-deciding settings (unless ``--allow_args_change``) stops with an error: never a silent fresh start.
    """
    path, checkpoint = source
    if checkpoint is None:
        return ResumePoint()
    utils.require_keys(checkpoint, ("student", "teacher", "optimizer", "epoch", "dino_loss"), path,
                       "PW-Self training checkpoint", "move it away or choose another --output_dir")
    check_finite_checkpoint(checkpoint, path)
    trainer.args_changes = check_resume_args(checkpoint, trainer, path)
    if not trainer.args_changes:
        trainer.lineage = checkpoint.get("lineage")  # None: written before lineages were recorded
    trainer.started_from = str(path.resolve())
    trainer.resumed_from = (checkpoint.get("resumed_from") if path == output_dir / "checkpoint.pth"
                            else str(path.resolve()))
    utils.load_state_strict(trainer.student_module, utils.strip_prefixes(checkpoint["student"]), "student", path)
    utils.load_state_strict(trainer.teacher, utils.strip_prefixes(checkpoint["teacher"]), "teacher", path)
    refuse_cls_only_center(checkpoint, trainer, path)
    utils.load_state_strict(trainer.loss_fn, checkpoint["dino_loss"], "loss state (center)", path)
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    if trainer.scaler is not None and "fp16_scaler" in checkpoint:
        trainer.scaler.load_state_dict(checkpoint["fp16_scaler"])
    return ResumePoint(int(checkpoint["epoch"]), int(checkpoint.get("iteration", 0)),
                       checkpoint.get("epoch_metrics", {}) if utils.is_main_process() else {})


def checkpoint_patches(checkpoint: dict | None) -> int | None:
    """The number of patches of the teacher's position embeddings in a training checkpoint (None without one)."""
    if checkpoint is None or not isinstance(checkpoint.get("teacher"), dict):
        return None
    pos_embed = utils.strip_prefixes(checkpoint["teacher"]).get("backbone.pos_embed")
    return None if pos_embed is None else pos_embed.shape[1] - 1


def refuse_cls_only_center(checkpoint: dict, trainer: Trainer, path: Path) -> None:
    """A checkpoint of DINO's loss (one CLS centre ``[1, K]``, e.g. written by DINO's main_dino.py) cannot be
    resumed with the patch loss, whose centre has a row per token: say what can be done instead."""
    saved = checkpoint["dino_loss"].get("center")
    ours = trainer.loss_fn.state_dict().get("center")
    if saved is None or ours is None or saved.shape[0] != 1 or ours.shape[0] == 1:
        return
    raise ValueError(f"{path} holds DINO's loss state (one CLS centre, {list(saved.shape)}), but --patch_loss true "
                     f"needs a centre per token ({list(ours.shape)}): resuming it as PW-Self is not a continuation. "
                     "Resume it with --patch_loss false to continue DINO's training exactly; starting PW-Self from "
                     "its weights is continued pre-training, a new run with --init_weights PATH (see "
                     "docs/continued_pretraining.md).")


def resume_checkpoint(output_dir: Path, resume_from: str | None) -> tuple[Path, dict | None]:
    """The checkpoint a run continues from, and its contents: ``<output_dir>/checkpoint.pth`` (the commit
    point) when it exists, else ``--resume_from``, else none: a fresh start, refused where an earlier
    run's history would be overwritten (``refuse_fresh_start_over_history``)."""
    committed = output_dir / "checkpoint.pth"
    if committed.exists():
        checkpoint = utils.load_checkpoint(committed)
        if resume_from is not None:
            check_resume_from_agrees(committed, checkpoint, Path(resume_from))
        return committed, checkpoint
    if resume_from is not None:
        return Path(resume_from), utils.load_checkpoint(resume_from)
    refuse_fresh_start_over_history(output_dir)
    return committed, None


def check_resume_from_agrees(committed: Path, checkpoint: dict, resume_from: Path) -> None:
    """Accept ``--resume_from`` beside an existing checkpoint.pth only when it names that file, or when
    checkpoint.pth was written by a run that resumed from it (the same command rerun, e.g. a requeued job)."""
    source = str(resume_from.resolve())
    if source == str(committed.resolve()):
        return
    if checkpoint.get("resumed_from") == source:
        print(f"Continuing from {committed}, written by this run after it resumed from {resume_from} "
              "(--resume_from only decides the first start)", flush=True)
        return
    raise FileExistsError(f"--resume_from {resume_from} was given, but {committed} exists too and was not written "
                          f"by a run resumed from that file; nothing was changed. To continue the run in "
                          f"{committed.parent}, drop --resume_from; to continue from {resume_from} instead, move "
                          f"{committed} away (the log lines after {resume_from.name} are then redone).")


def refuse_fresh_start_over_history(output_dir: Path) -> None:
    """Refuse to start afresh in a folder holding an earlier run's log lines or periodic checkpoints but no
    checkpoint.pth (moved or deleted?): starting afresh would overwrite that history."""
    log = output_dir / "log.txt"
    lines = len(log.read_text().splitlines()) if log.is_file() else 0
    periodic = [path for _, path in periodic_checkpoints(output_dir)]
    if not (lines or periodic):
        return
    found = ([f"{log.name} with {lines} line(s)"] if lines else []) + (
        [f"{len(periodic)} periodic checkpoint(s)"] if periodic else [])
    fix = (f"To continue from the newest periodic checkpoint, rerun with --resume_from {periodic[-1]}: exactly as "
           "the run went on from there (later log lines are redone)" if periodic else "No checkpoint is left")
    raise FileExistsError(f"{output_dir} holds {' and '.join(found)} of an earlier run but no checkpoint.pth (moved "
                          "or deleted?); starting afresh would overwrite them, so nothing was changed. "
                          f"{fix}. To start afresh, choose another --output_dir or move those files away.")


def periodic_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the periodic copies ``checkpoint{epoch:04}.pth`` in ``output_dir``, by epoch."""
    numbered = (re.fullmatch(r"checkpoint(\d+)\.pth", path.name) for path in output_dir.glob("checkpoint*.pth"))
    return sorted((int(match[1]), output_dir / match[0]) for match in numbered if match)


def check_finite_checkpoint(checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint holding NaN or infinity: training from it would fail later, blaming --lr."""
    for part in ("student", "teacher", "dino_loss"):
        name = utils.first_non_finite(checkpoint[part])
        if name is not None:
            raise ValueError(f"{path} holds non-finite values (NaN or infinity), first in the {part}'s tensor "
                             f"{name}: it comes from a diverged run or is corrupt, and cannot be resumed. Move it "
                             "away and continue from an earlier checkpoint (--resume_from checkpointNNNN.pth), "
                             "e.g. with a lower --lr and --allow_args_change.")


def changed_settings(checkpoint: dict, args: argparse.Namespace, run_facts: dict[str, int]) -> dict[str, list]:
    """The result-deciding settings (``RESUME_CRITICAL_ARGS`` as ``--name``, image and process counts) that
    differ from the checkpoint's: ``{setting: [checkpoint's value, value now]}``; settings the checkpoint does not
    record (nor ``with_former_defaults``) are skipped."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    saved_args, saved_facts = with_former_defaults(checkpoint.get("args", {})), checkpoint.get("run", {})
    changes = {f"--{name}": [plain(saved_args[name]), plain(getattr(args, name))] for name in RESUME_CRITICAL_ARGS
               if name in saved_args and plain(saved_args[name]) != plain(getattr(args, name))}
    return changes | {name: [saved_facts[name], value] for name, value in run_facts.items()
                      if name in saved_facts and saved_facts[name] != value}


def resume_differences(checkpoint: dict, args: argparse.Namespace, run_facts: dict[str, int]) -> list[str]:
    """``changed_settings`` as readable lines, ``--lr: checkpoint 0.0005, now 0.001``."""
    return [f"{name}: checkpoint {old}, now {new}"
            for name, (old, new) in changed_settings(checkpoint, args, run_facts).items()]


def with_former_defaults(saved_args: dict) -> dict:
    """A checkpoint's arguments plus what a run from before an argument existed did instead, where that
    differs from the argument's default: patch-augmented runs from before ``--patch_blur`` blurred their
    tiles isotropically (a run without ``--patch_augment`` blurred none: still skipped)."""
    if saved_args.get("patch_augment") and "patch_blur" not in saved_args:
        return {**saved_args, "patch_blur": "isotropic"}
    return saved_args


def check_resume_args(checkpoint: dict, trainer: Trainer, path: Path) -> dict[str, list]:
    """Stop (or, with ``--allow_args_change``, warn) when resuming would not continue the same run; returns
    the changes allowed (``changed_settings``), empty for an exact continuation."""
    changes = changed_settings(checkpoint, trainer.args, trainer.run_facts)
    if not changes:
        return changes
    listing = "\n  ".join(resume_differences(checkpoint, trainer.args, trainer.run_facts))
    if not trainer.args.allow_args_change:
        raise ValueError(f"{path} was written by a run with other settings that decide the result:\n  {listing}\n"
                         "Rerun with the checkpoint's values, choose another --output_dir to start afresh, or pass "
                         "--allow_args_change to continue anyway (then not an exact continuation).")
    refuse_optimizer_changes(checkpoint.get("args", {}), trainer.args, path)
    print(f"warning: resuming {path} with changed settings (--allow_args_change):\n  {listing}", flush=True)
    return changes


# Arguments that change the optimizer's parameter groups or the kind of state it keeps.
OPTIMIZER_SHAPING_ARGS = {
    "norm_last_layer": "it decides whether the scale of the head's last layer is trained, which changes the "
                       "optimizer's parameter groups",
    "optimizer": "another optimizer keeps other state",
}


def refuse_optimizer_changes(saved_args: dict, args: argparse.Namespace, path: Path) -> None:
    """Even under ``--allow_args_change``, refuse changes that make the checkpoint's optimizer state unusable."""
    for name, reason in OPTIMIZER_SHAPING_ARGS.items():
        if name in saved_args and saved_args[name] != getattr(args, name):
            raise ValueError(f"--{name} cannot change on resume, even with --allow_args_change (checkpoint "
                             f"{saved_args[name]}, now {getattr(args, name)}): {reason}, so the optimizer state in "
                             f"{path} cannot be carried over. Resume with --{name} {saved_args[name]}, or start "
                             "afresh in another --output_dir.")


# ----------------------------------------------------------------------------------------------
# Building and running.
# ----------------------------------------------------------------------------------------------
def build_loader(args: argparse.Namespace) -> DataLoader:
    """The training loader: ``TrainingImages`` through a ``ResumableSampler``, full batches only.

    Batches are ``(views V x [B, 3, S, S], geometry [B, V, 6], replaced [B])``, ``replaced`` counting
    the unreadable images skipped for each sample.
    """
    augmentation = MultiCropAugmentation(tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                         args.local_crops_number, args.global_crops_size, args.local_crops_size,
                                         photometric=not args.gpu_augment,
                                         patch_augment_p=patch_augment_probability(args), patch_size=args.patch_size,
                                         patch_blur=args.patch_blur)
    dataset = TrainingImages(utils.list_image_files(args.data_path), augmentation, args.strict_images)
    loader = DataLoader(dataset, sampler=ResumableSampler(dataset, args.seed), batch_size=args.batch_size_per_gpu,
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                        collate_fn=collate_multicrop, worker_init_fn=utils.ignore_stop_signals)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images give no full batch of {args.batch_size_per_gpu} per process "
                         f"over {utils.get_world_size()} process(es); lower --batch_size_per_gpu")
    return loader


def build_trainer(args: argparse.Namespace, device: torch.device, loader: DataLoader,
                  native_patches: int | None = None) -> Trainer:
    """Models, loss, optimizer and schedules; ``native_patches``: the position-embedding grid of the checkpoint
    to resume (DINO's keep 224 px, 196 patches, whatever the crop size), by default ``--global_crops_size``'s."""
    apply_defaults(args, run_defaults(args))  # for callers that build a trainer without validate_args
    torch.manual_seed(args.seed)  # the same initial weights on every process
    student, teacher = build_student_teacher(args, native_patches)
    if utils.is_distributed() and args.use_bn_in_head and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    if args.compile:  # in place: parameter names and checkpoints stay the same
        student.compile()
        teacher.compile()
    loss_fn = build_loss(args).to(device)
    optimizer = utils.build_optimizer(args.optimizer, utils.get_params_groups(student))
    if utils.is_distributed():
        student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast_dtype = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    run_facts = {"num_images": len(loader.dataset), "world_size": utils.get_world_size()}
    return Trainer(args, student, teacher, loss_fn, optimizer, Schedules(args, len(loader)), scaler,
                   autocast_dtype, device, run_facts)


def initial_weights(args: argparse.Namespace, source: tuple[Path, dict | None]) -> initialisation.InitWeights | None:
    """The ``--init_weights`` to start from, read and checked; None when there is none or when a checkpoint is
    resumed (which must then come from the same initialisation). Sets ``args.init_record``: the record of what
    was loaded, carried over from the checkpoint on a resume."""
    path, checkpoint = source
    if checkpoint is not None:
        if args.init_weights is not None:
            initialisation.refuse_other_initialisation(checkpoint, args, path)
        args.init_record = (checkpoint.get("args") or {}).get("init_record")
        if args.init_record is not None:  # the options left unset take the values an initialised run gives them
            for name in args.defaulted:
                setattr(args, name, None)
            apply_defaults(args, run_defaults(args, args.init_record))
        return None
    args.init_record = None
    return initialisation.load_init_weights(args) if args.init_weights is not None else None


def start_from_weights(trainer: Trainer, init: initialisation.InitWeights) -> None:
    """Load ``init`` into student and teacher, record it in ``args.init_record`` and, with ``--init_knn_data``,
    the teacher's k-NN before the first step."""
    args = trainer.args
    args.init_record = initialisation.apply_init_weights(trainer.student_module, trainer.teacher, init, args)
    apply_defaults(args, run_defaults(args, args.init_record))  # the head warm-up, now that the heads are known
    if args.defaulted:
        print("Defaults of a run started from weights (chosen on holdout; set them to override): "
              + ", ".join(f"--{name} {getattr(args, name)}" for name in args.defaulted), flush=True)
    if args.init_knn_data is not None:
        top1 = initialisation.knn_top1(trainer.teacher.backbone, args.init_knn_data, args.global_crops_size,
                                       trainer.device)
        args.init_record["knn_top1"] = round(top1, 2)
        print(f"Initial teacher: 20-NN top-1 {top1:.2f} on {args.init_knn_data}", flush=True)


def write_epoch_outputs(trainer: Trainer, output_dir: Path, epoch: int, train_stats: dict) -> None:
    """Rank 0: one JSON line in log.txt (the first with ``init``, what ``--init_weights`` loaded), the periodic
    copy, then checkpoint.pth (atomically, last)."""
    if not utils.is_main_process():
        return
    init = {"init": trainer.args.init_record} if epoch == 0 and trainer.args.init_record else {}
    with open(output_dir / "log.txt", "a") as log:
        log.write(json.dumps({"epoch": epoch, **train_stats, **init}) + "\n")
    keep = trainer.args.saveckp_freq and (epoch + 1) % trainer.args.saveckp_freq == 0
    save_checkpoint(trainer, ResumePoint(epoch + 1), also=(output_dir / f"checkpoint{epoch:04}.pth",) if keep else ())


def claim_output_dir(output_dir: Path, held: contextlib.ExitStack) -> None:
    """Rank 0: create ``output_dir`` and take its lock until ``held`` closes (a live run there is refused,
    named), then clear temporaries left by processes killed while saving: only the lock's holder knows that
    none of them is another live run's checkpoint in flight. A start that fails before writing anything there
    removes the folder again if it created it (``utils.created_output_dir``)."""
    held.enter_context(utils.created_output_dir(output_dir))
    held.enter_context(utils.folder_lock(output_dir))
    utils.remove_stale_temporaries(output_dir)


def record_start(output_dir: Path, trainer: Trainer, resume: ResumePoint) -> None:
    """Rank 0, once the checkpoint to continue from is restored (``resume``): move aside what another lineage left
    from there on, write args.json (and args_history.jsonl when the lineage changes), write checkpoint.pth at once
    when there is none (a fresh start or ``--resume_from``: log lines then never exist without it), and drop
    the log lines it does not cover."""
    if utils.is_main_process():
        set_aside_other_lineages(output_dir, trainer, resume)
        utils.write_text_atomic(json.dumps(vars(trainer.args), indent=2) + "\n", output_dir / "args.json")
        record_lineage_start(output_dir, trainer, resume)
        if not (output_dir / "checkpoint.pth").exists():
            save_checkpoint(trainer, resume)
        utils.trim_epoch_log(output_dir / "log.txt", resume.epoch)


def set_aside_other_lineages(output_dir: Path, trainer: Trainer, resume: ResumePoint) -> None:
    """Move the periodic checkpoints from epoch ``resume.epoch`` on that another lineage wrote (say, before this
    run went back to an earlier checkpoint with other arguments) into a new sub-folder ``superseded_<time>``, with
    copies of log.txt and args.json as they were: this run would overwrite them or mix its own among them.
    Those of this lineage stay: this run rewrites them with the same weights."""
    later = [path for epoch, path in periodic_checkpoints(output_dir) if epoch >= resume.epoch]
    others = [path for path in later if not written_by_lineage(path, trainer.lineage)]
    if not others:
        return
    folder = new_superseded_folder(output_dir)
    kept = [name for name in ("log.txt", "args.json") if (output_dir / name).is_file()]
    for name in kept:
        utils.write_atomic(folder / name, lambda handle: handle.write((output_dir / name).read_bytes()))
    for path in others:
        path.replace(folder / path.name)
    copies = f" and copies of {' and '.join(kept)}" if kept else ""
    print(f"Moved {', '.join(path.name for path in others)} (of another lineage: other arguments or another "
          f"start) to {folder}{copies}, so that this run, continuing from {trainer.started_from} at epoch "
          f"{resume.epoch}, does not overwrite them", flush=True)


def new_superseded_folder(output_dir: Path) -> Path:
    """A new ``superseded_<time>`` folder in ``output_dir`` (``_2``, ``_3``, ... after it within one second)."""
    stem = output_dir / f"superseded_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    for number in itertools.count(1):
        folder = stem if number == 1 else stem.with_name(f"{stem.name}_{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def written_by_lineage(path: Path, lineage: str | None) -> bool:
    """Whether the checkpoint at ``path`` belongs to ``lineage``; an unreadable one is taken as not."""
    try:
        return utils.load_checkpoint(path).get("lineage") == lineage
    except (RuntimeError, OSError):
        return False


def record_lineage_start(output_dir: Path, trainer: Trainer, resume: ResumePoint) -> None:
    """Append to ``args_history.jsonl`` one line per change of lineage in ``output_dir`` (a fresh start, a resume
    with changed settings, a return to another lineage's checkpoint): from which epoch and iteration, when, from
    which checkpoint, the settings changed ``{setting: [checkpoint's, now]}`` and all the arguments. Each line
    holds until the next one; args.json holds the latest arguments only."""
    history = output_dir / "args_history.jsonl"
    lines = history.read_text().splitlines() if history.is_file() else []
    if lines and json.loads(lines[-1])["lineage"] == trainer.lineage:
        return  # the same run goes on
    entry = {"start_epoch": resume.epoch, "start_iteration": resume.iteration,
             "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "lineage": trainer.lineage,
             "from": trainer.started_from, "changed": trainer.args_changes, "args": vars(trainer.args)}
    utils.write_text_atomic("".join(line + "\n" for line in lines) + json.dumps(entry) + "\n", history)


def train(trainer: Trainer, loader: DataLoader, output_dir: Path, resume: ResumePoint) -> None:
    """The epochs from ``resume`` on, each ending with a line of the whole run's elapsed time and ETA. A stop
    signal ends them after the current step, with checkpoint.pth written, by raising ``TrainingStopped``."""
    args, iters_per_epoch = trainer.args, trainer.schedules.iters_per_epoch
    run = utils.Progress(args.epochs * iters_per_epoch, "Run", done=resume.epoch * iters_per_epoch + resume.iteration)
    for epoch in range(resume.epoch, args.epochs):
        start = resume if epoch == resume.epoch else ResumePoint(epoch)
        loader.sampler.set_epoch(epoch, start.iteration * args.batch_size_per_gpu)
        train_stats = trainer.train_one_epoch(loader, epoch, start, run)
        write_epoch_outputs(trainer, output_dir, epoch, train_stats)
        print(f"Epoch {epoch} done ({epoch + 1} of {args.epochs}); the run: {run.times()}", flush=True)
        if trainer.stop_due() and epoch + 1 < args.epochs:  # the signal came in the epoch's last step
            raise trainer.stopped(ResumePoint(epoch + 1))
    print(f"Training time {utils.format_duration(run.elapsed)}", flush=True)


def run_summary(trainer: Trainer, loader: DataLoader, resume: ResumePoint) -> str:
    """The few lines printed before training (every argument is in args.json): data, model, schedule, output
    folder, and where the run starts."""
    args, iters_per_epoch, processes = trainer.args, trainer.schedules.iters_per_epoch, utils.get_world_size()
    total_batch = args.batch_size_per_gpu * processes
    backbone = sum(p.numel() for p in trainer.student_module.backbone.parameters())
    heads = sum(p.numel() for p in trainer.student_module.parameters()) - backbone
    precision = str(trainer.autocast_dtype or torch.float32).removeprefix("torch.")
    curves = f"; training curves in {Path(args.output_dir) / TENSORBOARD_DIR}" if args.tensorboard else ""
    return "\n".join([
        f"Data: {len(loader.dataset)} images in {args.data_path}, {iters_per_epoch} iterations per epoch; "
        f"{loader.dataset.transform}",
        f"Model: {args.arch}/{args.patch_size} student and teacher, {backbone:,} backbone + {heads:,} head parameters; "
        f"precision {precision}; device {trainer.device}",
        f"Schedule: {args.epochs} epochs x {iters_per_epoch} iterations = {args.epochs * iters_per_epoch} steps; batch "
        f"{args.batch_size_per_gpu} per process x {processes} process(es) = {total_batch}; peak lr "
        f"{trainer.schedules.lr.max():.3g} (--lr {args.lr:g} x {total_batch}/256) after {args.warmup_epochs:g} "
        "warm-up epoch(s)",
        f"Output: {args.output_dir} (every argument in args.json{curves})",
        start_description(trainer, resume)])


def start_description(trainer: Trainer, resume: ResumePoint) -> str:
    """Whether the run starts afresh, from ``--init_weights`` or resumes a checkpoint, and where."""
    if trainer.started_from is not None:
        return f"Resumed from {trainer.started_from}: next epoch {resume.epoch}, iteration {resume.iteration}"
    if trainer.args.init_record is not None:
        return f"Start: epoch 0, from --init_weights {trainer.args.init_weights} (what was loaded: above)"
    return "Start: epoch 0, from random weights"


def open_curves(trainer: Trainer, output_dir: Path, resume: ResumePoint, held: contextlib.ExitStack) -> None:
    """Rank 0, with ``--tensorboard``: the writer of the training curves in ``<output_dir>/tensorboard`` until
    ``held`` closes, its global step the iteration. On a resume, TensorBoard hides what an interrupted run logged
    from the resumed iteration on (the writer's purge step): the curves go on without doubled points."""
    if not (trainer.args.tensorboard and utils.is_main_process()):
        return
    iteration = resume.epoch * trainer.schedules.iters_per_epoch + resume.iteration
    trainer.curves = utils.tensorboard_writer(output_dir / TENSORBOARD_DIR, purge_step=iteration)
    held.callback(trainer.curves.close)


def main(args: argparse.Namespace) -> Trainer:
    """Train (or resume) and return the trainer holding the final student and teacher.

    Rank 0 holds the output folder's lock throughout. A stop signal (SIGTERM, SIGUSR1, Ctrl-C) ends
    training after the current step, with checkpoint.pth written, by raising ``TrainingStopped``.
    """
    validate_args(args)
    device = utils.resolve_device(args.device)
    utils.init_distributed(device)
    output_dir = Path(args.output_dir)
    with contextlib.ExitStack() as held:
        utils.run_on_main_process(lambda: claim_output_dir(output_dir, held))
        loader = build_loader(args)
        source = resume_checkpoint(output_dir, args.resume_from)  # read once: its grid shapes the models
        init = initial_weights(args, source)
        grid = checkpoint_patches(source[1]) if init is None else init.num_patches
        trainer = build_trainer(args, device, loader, grid)
        if init is not None:
            start_from_weights(trainer, init)
        resume = restore_checkpoint(output_dir, trainer, source)
        del init
        del source  # the checkpoint's own tensors (a second copy of the model) are not needed while training
        print(run_summary(trainer, loader, resume), flush=True)
        record_start(output_dir, trainer, resume)
        if resume.epoch >= args.epochs:
            print(f"Training already finished: {output_dir / 'checkpoint.pth'} is at epoch {resume.epoch} "
                  f"of {args.epochs}.")
            return trainer
        open_curves(trainer, output_dir, resume, held)
        with trainer.stop_signals:
            train(trainer, loader, output_dir, resume)
    return trainer


def run_from_command_line(args: argparse.Namespace) -> Trainer:
    """``main`` for the command line: training stopped by a signal exits with ``STOPPED_EXIT_STATUS``."""
    try:
        return main(args)
    except TrainingStopped:  # already explained by rank 0
        sys.exit(STOPPED_EXIT_STATUS)


if __name__ == "__main__":
    utils.run_script(run_from_command_line, get_args_parser())
