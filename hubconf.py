"""torch.hub entry points: PW-Self's ViT backbones and DINO head.

    model = torch.hub.load("/path/to/pwself", "vit_small", source="local",
                           pretrained_weights="out/checkpoint.pth")       # our training checkpoint (teacher)
    model = torch.hub.load("/path/to/pwself", "vit_small", source="local", patch_size=8,
                           pretrained_weights="dino_vits8")                # DINO's released weights, by name
    model = torch.hub.load("/path/to/pwself", "dino_vitb16", source="local")  # same as DINO's hub entry

``pretrained_weights`` takes what the evaluations' ``--pretrained_weights`` takes: a path (our or DINO's
training checkpoint, or a backbone-only state dict in DINO or timm layout) or a name of
``vision_transformer.REFERENCE_WEIGHTS``, downloaded once into torch's hub cache
(``$TORCH_HOME/hub/checkpoints``) and read from there. Without it the backbone has random weights. Every
backbone entry also takes ``checkpoint_key`` ("teacher" or "student"), ``img_size`` (the native size of the
position embeddings; other multiples of the patch work too) and size overrides ``embed_dim``, ``depth``,
``num_heads``. A backbone returns the CLS feature ``[B, D]``; ``forward_features`` gives every token.
"""
from __future__ import annotations

import pathlib

import vision_transformer as vits

dependencies = ["torch", "timm"]

# DINO's repository has modules of the same names (vision_transformer, utils): if its hub entries ran first
# in this process, Python would hand us its module, and the entries below would fail obscurely.
if pathlib.Path(vits.__file__).resolve().parent != pathlib.Path(__file__).resolve().parent:
    raise ImportError(f"'vision_transformer' is already imported from {vits.__file__}, not from this repository "
                      "(DINO's torch.hub entries use the same module name); load PW-Self's entries in a fresh "
                      "Python process")


def vit_tiny(patch_size: int | None = None, pretrained_weights: str = "", **kwargs) -> vits.VisionTransformer:
    """ViT-Tiny (width 192, 12 blocks, 3 heads); patch 16 unless given or set by a reference name."""
    return vits.pretrained_backbone("vit_tiny", patch_size, pretrained_weights, **kwargs)


def vit_small(patch_size: int | None = None, pretrained_weights: str = "", **kwargs) -> vits.VisionTransformer:
    """ViT-Small (width 384, 12 blocks, 6 heads); patch 16 unless given or set by a reference name."""
    return vits.pretrained_backbone("vit_small", patch_size, pretrained_weights, **kwargs)


def vit_base(patch_size: int | None = None, pretrained_weights: str = "", **kwargs) -> vits.VisionTransformer:
    """ViT-Base (width 768, 12 blocks, 12 heads); patch 16 unless given or set by a reference name."""
    return vits.pretrained_backbone("vit_base", patch_size, pretrained_weights, **kwargs)


def dino_head(in_dim: int = 384, out_dim: int = 65536, **kwargs) -> vits.DINOHead:
    """DINO's projection head (random weights): ``use_bn``, ``norm_last_layer``, ``nlayers``, ``hidden_dim``
    and ``bottleneck_dim`` as in ``vision_transformer.DINOHead``; the defaults are DINO's for ViT-S."""
    return vits.DINOHead(in_dim, out_dim, **kwargs)


def dino_vits16(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-S/16 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _reference_backbone("dino_vits16", pretrained, kwargs)


def dino_vits8(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-S/8 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _reference_backbone("dino_vits8", pretrained, kwargs)


def dino_vitb16(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-B/16 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _reference_backbone("dino_vitb16", pretrained, kwargs)


def dino_vitb8(pretrained: bool = True, **kwargs) -> vits.VisionTransformer:
    """ViT-B/8 with DINO's released ImageNet weights (downloaded on the first call); random if not ``pretrained``."""
    return _reference_backbone("dino_vitb8", pretrained, kwargs)


def _reference_backbone(name: str, pretrained: bool, kwargs: dict) -> vits.VisionTransformer:
    """The architecture of reference weights ``name``, with them loaded when ``pretrained``."""
    entry = vits.REFERENCE_WEIGHTS[name]
    return vits.pretrained_backbone(entry.arch, entry.patch_size, name if pretrained else "", **kwargs)
