"""torch.hub entry points: PW-Self's ViT backbones and DINO head.

    model = torch.hub.load("/path/to/pwself", "vit_small", source="local",
                           pretrained_weights="out/checkpoint.pth")       # our training checkpoint (teacher)
    model = torch.hub.load("/path/to/pwself", "vit_small", source="local", patch_size=8,
                           pretrained=True)                                # DINO's released ViT-S/8
    model = torch.hub.load("/path/to/pwself", "dino_vitb16", source="local")  # same as DINO's hub entry

Every backbone entry takes DINO's arguments: ``pretrained`` (DINO's released weights for the entry's
architecture and patch size; default True for the ``dino_*`` entries, False for ``vit_*``), ``patch_size``,
``img_size`` (the native size of the position embeddings, an int or DINO's one-element list ``[224]``; any
input size works, see vision_transformer.py) and ``drop_path_rate``; and ours: ``pretrained_weights``, loaded
instead of the released weights when given, takes what the evaluations' ``--pretrained_weights`` takes (a path
of our or DINO's training checkpoint, or of a backbone-only state dict in DINO or timm layout, or a name of
``vision_transformer.REFERENCE_WEIGHTS``), ``checkpoint_key`` ("teacher" or "student") and size overrides
``embed_dim``, ``depth``, ``num_heads``. With ``pretrained_weights``, the patch size and sizes left out are
the weights' own (a checkpoint's stored training args and its tensors, as in the evaluations), and the
entry's architecture must be theirs: ``vit_tiny(pretrained_weights="out/checkpoint.pth")`` loads a run
trained with ``--arch vit_tiny --patch_size 8 --embed_dim 96 --depth 3 --num_heads 3``. Released weights are
downloaded once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``, shared with DINO's own hub entries)
and read from there. A backbone returns the CLS feature ``[B, D]``; ``forward_features`` gives every token.

This repository's modules are named like DINO's (``vision_transformer``, ``utils``). They are imported here
without taking or leaving those names in ``sys.modules``, so that DINO's hub entries and ours can be loaded in
one process, in either order, each building its own models.
"""
from __future__ import annotations

import hashlib
import importlib
import pathlib
import sys
import types

dependencies = ["torch", "timm"]

_REPOSITORY = pathlib.Path(__file__).resolve().parent
# Where our modules are kept in sys.modules: a prefix of this checkout's own, never a name another repository uses.
_PRIVATE_PREFIX = f"_pwself_hub_{hashlib.sha1(str(_REPOSITORY).encode()).hexdigest()[:10]}_"


def _is_ours(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and pathlib.Path(file).resolve().parent == _REPOSITORY


def _import_privately(name: str) -> types.ModuleType:
    """Our top-level module ``name``, with the modules of this repository it imports.

    torch.hub puts a repository's folder first on ``sys.path`` and runs its hubconf, whose plain imports then
    stay in ``sys.modules``: DINO's ``vision_transformer`` would be handed to us, or ours to DINO, whichever
    came first. So entries of those names that are not ours are set aside during the import and put back
    after it, and the modules it added are moved to private names (reused by later loads). A module of ours
    already imported under its plain name (by our scripts, or by the caller) is used as it is.
    """
    if name in sys.modules and _is_ours(sys.modules[name]):
        return sys.modules[name]
    if _PRIVATE_PREFIX + name in sys.modules:
        return sys.modules[_PRIVATE_PREFIX + name]
    own_names = [path.stem for path in _REPOSITORY.glob("*.py")]
    before = {own: sys.modules.get(own) for own in own_names}
    set_aside = {own: sys.modules.pop(own) for own, module in before.items() if module and not _is_ours(module)}
    sys.path.insert(0, str(_REPOSITORY))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(_REPOSITORY))
        added = {own: sys.modules.pop(own) for own in own_names
                 if own in sys.modules and sys.modules[own] is not before[own]}
        sys.modules.update(set_aside)
    sys.modules.update({_PRIVATE_PREFIX + own: added_module for own, added_module in added.items()})
    return module


vits = _import_privately("vision_transformer")

# DINO's hub entries, by architecture and patch size: what ``pretrained=True`` loads.
_RELEASED = {(vits.REFERENCE_WEIGHTS[name].arch, vits.REFERENCE_WEIGHTS[name].patch_size): name
             for name in ("dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8")}


def vit_tiny(pretrained: bool = False, pretrained_weights: str = "", patch_size: int | None = None,
             **kwargs) -> vits.VisionTransformer:
    """ViT-Tiny (width 192, 12 blocks, 3 heads); patch size and sizes the weights' own unless given (else 16
    and the standard sizes). DINO released no ViT-Tiny: ``pretrained=True`` is an error."""
    return _backbone("vit_tiny", pretrained, pretrained_weights, patch_size, kwargs)


def vit_small(pretrained: bool = False, pretrained_weights: str = "", patch_size: int | None = None,
              **kwargs) -> vits.VisionTransformer:
    """ViT-Small (width 384, 12 blocks, 6 heads); patch size and sizes the weights' own unless given (else 16
    and the standard sizes); ``pretrained``: DINO's ViT-S/16 or ViT-S/8."""
    return _backbone("vit_small", pretrained, pretrained_weights, patch_size, kwargs)


def vit_base(pretrained: bool = False, pretrained_weights: str = "", patch_size: int | None = None,
             **kwargs) -> vits.VisionTransformer:
    """ViT-Base (width 768, 12 blocks, 12 heads); patch size and sizes the weights' own unless given (else 16
    and the standard sizes); ``pretrained``: DINO's ViT-B/16 or ViT-B/8."""
    return _backbone("vit_base", pretrained, pretrained_weights, patch_size, kwargs)


def dino_vits16(pretrained: bool = True, pretrained_weights: str = "", patch_size: int = 16,
                **kwargs) -> vits.VisionTransformer:
    """ViT-S/16 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _released_backbone("dino_vits16", pretrained, pretrained_weights, patch_size, kwargs)


def dino_vits8(pretrained: bool = True, pretrained_weights: str = "", patch_size: int = 8,
               **kwargs) -> vits.VisionTransformer:
    """ViT-S/8 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _released_backbone("dino_vits8", pretrained, pretrained_weights, patch_size, kwargs)


def dino_vitb16(pretrained: bool = True, pretrained_weights: str = "", patch_size: int = 16,
                **kwargs) -> vits.VisionTransformer:
    """ViT-B/16 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _released_backbone("dino_vitb16", pretrained, pretrained_weights, patch_size, kwargs)


def dino_vitb8(pretrained: bool = True, pretrained_weights: str = "", patch_size: int = 8,
               **kwargs) -> vits.VisionTransformer:
    """ViT-B/8 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _released_backbone("dino_vitb8", pretrained, pretrained_weights, patch_size, kwargs)


def dino_head(in_dim: int = 384, out_dim: int = 65536, use_bn: bool = False, norm_last_layer: bool = True,
              nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256, pretrained: bool = False,
              pretrained_weights: str = "", checkpoint_key: str = "teacher") -> vits.DINOHead:
    """DINO's projection head, with DINO's ``DINOHead`` arguments and defaults (``in_dim`` 384: ViT-S).

    Random weights, or the head of the training checkpoint ``pretrained_weights`` (ours or DINO's, its
    ``checkpoint_key`` weights; the sizes must be the ones it was trained with). DINO released no head on its
    own, so ``pretrained=True`` is an error.
    """
    if pretrained:
        raise ValueError("dino_head has no released weights (pretrained=True): DINO's hub releases backbones only; "
                         "use pretrained=False for a random head, or pretrained_weights=PATH of a training "
                         "checkpoint (ours or DINO's full checkpoint) to load its head")
    head = vits.DINOHead(in_dim, out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers,
                         hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
    if pretrained_weights:
        vits.load_head_weights(head, pretrained_weights, checkpoint_key)
    return head


def _backbone(arch: str, pretrained: bool, pretrained_weights: str, patch_size: int | None,
              kwargs: dict) -> vits.VisionTransformer:
    """The backbone ``arch`` with ``pretrained_weights``, else DINO's released weights when ``pretrained``."""
    if pretrained and not pretrained_weights:
        pretrained_weights = _released_name(arch, patch_size or vits.DEFAULT_PATCH_SIZE)
    return vits.pretrained_backbone(arch, patch_size, pretrained_weights, **kwargs)


def _released_backbone(name: str, pretrained: bool, pretrained_weights: str, patch_size: int,
                       kwargs: dict) -> vits.VisionTransformer:
    """The backbone of DINO's hub entry ``name``, whose patch size is fixed (DINO's entries set it)."""
    entry = vits.REFERENCE_WEIGHTS[name]
    if patch_size != entry.patch_size:
        raise ValueError(f"{name} has patch size {entry.patch_size}, got patch_size={patch_size}; for patch "
                         f"{patch_size} use {entry.arch}(patch_size={patch_size}, ...)")
    return _backbone(entry.arch, pretrained, pretrained_weights, patch_size, kwargs)


def _released_name(arch: str, patch_size: int) -> str:
    """The name of DINO's released weights for ``arch`` at ``patch_size``, or an error listing those released."""
    if (arch, patch_size) not in _RELEASED:
        released = ", ".join(f"{name} = {released_arch}(patch_size={patch})"
                             for (released_arch, patch), name in _RELEASED.items())
        raise ValueError(f"DINO released no weights for {arch} with patch size {patch_size} (pretrained=True); "
                         f"released: {released}. Use pretrained=False for random weights, or "
                         "pretrained_weights=PATH for a weights file")
    return _RELEASED[(arch, patch_size)]
