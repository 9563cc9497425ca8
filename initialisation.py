"""Continued pre-training: a training run that starts from released or earlier weights (``--init_weights``).

``patch_wise_dino.py --init_weights PATH|NAME`` starts student and teacher from a backbone (DINO's released
files or names, DINO or pwself training checkpoints, timm or DINO state dicts) and, where the file holds heads
of the same shapes, from its heads too. It is not a resume: epochs and schedules start at zero. What was loaded
is printed and recorded (``init_record`` in args.json and the checkpoints, ``init`` in the first log line). A
restart resumes the run's own ``checkpoint.pth`` and never loads the file again.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import utils
import vision_transformer as vits
from eval_knn import build_split, extract_features, knn_classifier, sequential_loader
from transforms_patch import eval_transform


# What an initialised run's options take when left unset (patch_wise_dino.apply_defaults), chosen on the holdout
# split by continuing PW-Self from trained teachers (docs/continued_pretraining.md): the learning rate as a fraction
# of DINO's from-scratch default, and the head warm-up for heads that start fresh.
LR_FRACTION = 1 / 3
CONTINUED_DEFAULTS = {"warmup_epochs": 3, "momentum_teacher": 0.996}
HEAD_WARMUP_EPOCHS = 1


def continued_defaults(scratch_lr: float, record: dict | None = None) -> dict:
    """The defaults of a run started from weights: ``{option: value}``, with ``freeze_backbone_epochs`` only once
    ``record`` (``init_record``) tells whether the heads start fresh (then ``HEAD_WARMUP_EPOCHS``, else 0)."""
    defaults = {"lr": scratch_lr * LR_FRACTION, **CONTINUED_DEFAULTS}
    if record is not None:
        defaults["freeze_backbone_epochs"] = HEAD_WARMUP_EPOCHS if record.get("heads", "").startswith("fresh") else 0
    return defaults


@dataclass
class InitWeights:
    """What ``--init_weights`` gives: the backbone's tensors, the head's (None: fresh) and the record."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    record: dict

    @property
    def num_patches(self) -> int:
        """Patches of the file's position-embedding grid (DINO's: 196, whatever the crops)."""
        return self.backbone["pos_embed"].shape[1] - 1


def describe(args: argparse.Namespace) -> str:
    """``--init_weights`` as a file's absolute path or a released name, the identity a restart is checked by."""
    if vits.reference_weights(args.init_weights) is not None:
        return args.init_weights
    return str(Path(args.init_weights).resolve())


def load_init_weights(args: argparse.Namespace) -> InitWeights:
    """Read ``--init_weights`` (a released name is downloaded once, or the error gives the URL and cache path),
    check it is finite and of this run's architecture, and take the head of ``--init_checkpoint_key`` if any."""
    path = vits.resolve_weights_path(args.init_weights)
    checkpoint = utils.load_checkpoint(path, what="--init_weights")
    backbone = vits.backbone_state_dict(checkpoint, args.init_checkpoint_key, source=str(path))
    bad = utils.first_non_finite(backbone)
    if bad is not None:
        raise ValueError(f"--init_weights {path} holds NaN or infinity in {bad}: a run started from it would diverge "
                         "at once; choose an earlier checkpoint of that run")
    entry = checkpoint.get(args.init_checkpoint_key)
    head = head_state(entry) if isinstance(entry, dict) else None
    record = {"file": describe(args), "checkpoint_key": args.init_checkpoint_key if isinstance(entry, dict) else None,
              "backbone": "loaded"}
    init = InitWeights(backbone, head, record)
    side = math.isqrt(init.num_patches)
    record["position_grid"] = f"{side}x{side}"
    return init


def check_architecture(backbone: dict[str, torch.Tensor], model: vits.VisionTransformer, args: argparse.Namespace,
                       path: str | Path) -> None:
    """Stop when the file's ViT (patch, width, depth) is not ``model``, the one the arguments built, naming both."""
    sizes = vits.backbone_tensor_sizes(backbone)
    found = tuple(sizes[key].value for key in ("patch_size", "embed_dim", "depth")) if sizes else None
    wanted = (model.patch_size, model.embed_dim, len(model.blocks))
    if found != wanted:
        described = (f"patch {found[0]}, width {found[1]}, depth {found[2]}" if found else
                     "not a ViT backbone (no patch_embed.proj.weight)")
        raise ValueError(f"--init_weights {path} is a ViT of {described}, but the arguments build --arch {args.arch} "
                         f"with patch {wanted[0]}, width {wanted[1]}, depth {wanted[2]}: give the file's --arch, "
                         "--patch_size (and --embed_dim/--depth/--num_heads for other sizes)")


def head_state(entry: dict) -> dict[str, torch.Tensor] | None:
    """The ``head.*`` tensors of a training checkpoint's student or teacher entry (``module.`` stripped)."""
    head = {key[len("head."):]: value for key, value in utils.strip_prefixes(entry).items() if key.startswith("head.")}
    return head or None


def apply_init_weights(student: nn.Module, teacher: nn.Module, init: InitWeights, args: argparse.Namespace) -> dict:
    """Load the backbone into student and teacher (``MultiCropWrapper``s), after checking it is their ViT, and
    the head where every tensor of it matches this run's head in name and shape (else the heads stay fresh, and
    the record says why). Returns the completed record, which is also printed."""
    path = args.init_weights
    check_architecture(init.backbone, student.backbone, args, path)
    for model in (student, teacher):
        utils.load_state_strict(model.backbone, init.backbone, "backbone (--init_weights)", path)
    record = dict(init.record)
    ours = student.head.state_dict()
    if not args.init_heads:
        record["heads"] = "fresh (--init_heads false)"
    elif init.head is None:
        record["heads"] = "fresh (the file holds no head)"
    elif init.head.keys() != ours.keys() or any(init.head[k].shape != ours[k].shape for k in ours):
        shapes = {key: list(value.shape) for key, value in init.head.items() if key.endswith("last_layer.weight_v")}
        record["heads"] = (f"fresh (the file's head does not fit this run's: its last layer {shapes or 'differs'}; "
                           f"--out_dim and the head sizes decide it)")
    else:
        for model in (student, teacher):
            model.head.load_state_dict(init.head)
        record["heads"] = "loaded"
    if getattr(student, "patch_head", None) is not None:
        record["patch_head"] = "fresh"
    print("Initialised from --init_weights: " + ", ".join(f"{key} {value}" for key, value in record.items()),
          flush=True)
    return record


def refuse_other_initialisation(checkpoint: dict, args: argparse.Namespace, path: Path) -> None:
    """``--init_weights`` with an existing ``checkpoint.pth``: that run is resumed (the file is not loaded
    again), and it must be a run initialised from the same file and key."""
    saved = (checkpoint.get("args") or {}).get("init_record") or {}
    asked = {"file": describe(args), "checkpoint_key": args.init_checkpoint_key}
    if saved.get("file") == asked["file"] and saved.get("checkpoint_key") in (asked["checkpoint_key"], None):
        return
    started = (f"initialised from {saved.get('file')} (key {saved.get('checkpoint_key')})" if saved else
               "not started from --init_weights")
    raise ValueError(f"{path} exists: rerunning would resume that run, which was {started}, while this command asks "
                     f"for --init_weights {asked['file']} (--init_checkpoint_key {asked['checkpoint_key']}). To start "
                     "a new initialised run, choose another --output_dir; to continue that run, give its own "
                     "--init_weights (or leave it out).")


@torch.no_grad()
def knn_top1(backbone: nn.Module, data_path: str, crop_size: int, device: torch.device, k: int = 20) -> float:
    """20-NN top-1 (percent) of ``backbone``'s CLS features on ``<data_path>/train`` against ``<data_path>/val``
    (eval_knn.py's rule and resize, at ``crop_size``): the starting point an initialised run shows."""
    transform = eval_transform(crop_size * 8 // 7, crop_size)
    splits = [build_split(data_path, split, transform) for split in ("train", "val")]
    was_training = backbone.training
    backbone.eval()
    features = [extract_features(backbone, sequential_loader(split, 64, 0), device) for split in splits]
    backbone.train(was_training)
    labels = [torch.tensor(split.targets) for split in splits]
    num_classes = int(max(labels[0].max(), labels[1].max())) + 1
    top1, _ = knn_classifier(features[0], labels[0], features[1], labels[1], min(k, len(labels[0])), 0.07,
                             num_classes)
    return top1
