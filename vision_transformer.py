"""Vision Transformers with DINO's interface, built on timm, and the DINO projection head.

The backbone is timm's ``VisionTransformer`` (fused scaled-dot-product attention, DINO's parameter
names), wrapped so that it behaves like DINO's ``vision_transformer.VisionTransformer``:

* ``model(x)`` returns the CLS feature ``[B, D]``;
* ``model.forward_features(x)`` returns every normalised token ``[B, 1 + N, D]``;
* ``model.get_last_selfattention(x)`` returns the last block's attention ``[B, heads, 1+N, 1+N]``;
* ``model.get_intermediate_layers(x, n)`` returns the last ``n`` block outputs, each normalised;
* any input size works: the position embeddings of the native grid (``img_size // patch_size`` per
  side) are resampled bicubically to the input's grid exactly as DINO does it (``resample_pos_embed``),
  so DINO's weights give DINO's features at every size. Sides that are not multiples of the patch size
  lose their right and bottom remainders, as in DINO (``crop_to_patches``, with a one-time warning).

A DINO backbone state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``,
``norm.*``) loads with ``strict=True``; so does a timm ViT state dict without its classifier.
"""
from __future__ import annotations

import argparse
import math
import re
import urllib.error
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

import utils

__all__ = ["VisionTransformer", "DINOHead", "WeightNormLinear", "vit_tiny", "vit_small", "vit_base"]


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT with DINO's forward interface and size-agnostic position embeddings.

    Args:
        img_size: side of the image the position embeddings are learned for (the native size);
            ``load_pretrained_weights`` replaces it by the side the loaded weights were learned for.
        patch_size: side of a square patch in pixels.
        **kwargs: anything timm's ``VisionTransformer`` takes (``embed_dim``, ``depth``,
            ``num_heads``, ``drop_path_rate``, ...). ``num_classes`` defaults to 0 (no classifier).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, **kwargs):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(img_size=img_size, patch_size=patch_size, dynamic_img_size=True, **kwargs)
        self.patch_size = patch_size
        # DINO draws the CLS token like the position embeddings (timm uses a near-zero one).
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.warned_about_cropping = False

    def crop_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> ``[B, C, H // p * p, W // p * p]`` for patch size ``p``.

        DINO's strided patch convolution ignores the right and bottom pixels that do not fill a patch (a
        480x854 DAVIS frame at patch 16 gives a 30x53 grid); this crop does the same explicitly, and says so
        once per model (its first such input), since those pixels never reach the features.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        used_height, used_width = (side // self.patch_size * self.patch_size for side in (height, width))
        if not used_height or not used_width:
            raise ValueError(f"image size {height}x{width} is smaller than one patch ({self.patch_size}x"
                             f"{self.patch_size} pixels); give images of at least {self.patch_size} pixels per side")
        if (used_height, used_width) == (height, width):
            return x
        if not self.warned_about_cropping:
            print(f"warning: input {height}x{width} is not a multiple of patch {self.patch_size}: using "
                  f"{used_height}x{used_width}, as DINO (the right {width - used_width} and bottom "
                  f"{height - used_height} pixels are dropped); reported once per model", flush=True)
            self.warned_about_cropping = True
        return x[..., :used_height, :used_width]

    def _pos_embed(self, x: torch.Tensor, square_image: bool = True) -> torch.Tensor:
        """Prepend the CLS token and add position embeddings resampled to the grid of ``x``.

        Args:
            x: patch embeddings ``[B, H, W, D]`` (timm's NHWC layout for dynamic sizes).
            square_image: whether the image given to the model was square (see ``resample_pos_embed``).

        Returns:
            tokens ``[B, 1 + H * W, D]``.
        """
        batch, grid_h, grid_w, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + self.resample_pos_embed(grid_h, grid_w, square_image))

    def resample_pos_embed(self, grid_h: int, grid_w: int, square_image: bool = True) -> torch.Tensor:
        """Position embeddings ``[1, 1 + grid_h * grid_w, D]`` for a ``grid_h x grid_w`` patch grid, as DINO's
        ``interpolate_pos_encoding`` computes them.

        The native grid of a square image is returned unchanged. Any other grid is resampled bicubically (no
        antialiasing) with DINO's scale factors ``(grid + 0.1) / native``, rows from the input's height and
        columns from its width, in float32 whatever the parameter dtype. DINO tests the image's pixel sides,
        not the grid: a non-square image cropped to the native grid (224x230 at patch 16, ``square_image``
        False) is resampled too, by those scale factors, which move the samples slightly.
        """
        native_h, native_w = self.patch_embed.grid_size
        if (grid_h, grid_w) == (native_h, native_w) and square_image:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, native_h, native_w, dim).permute(0, 3, 1, 2)
        # Not size=(grid_h, grid_w): given a scale factor, PyTorch samples output i at input position
        # (i + 0.5) / scale - 0.5, and DINO's weights were trained and evaluated with this nudged scale.
        # The output has floor(native * scale) = grid samples per axis.
        scale = ((grid_h + 0.1) / native_h, (grid_w + 0.1) / native_w)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def set_native_grid(self, num_patches: int) -> None:
        """Make the native grid square with ``num_patches`` patches; ``pos_embed`` becomes
        ``[1, 1 + num_patches, D]`` (zeros, for weights of that grid to be loaded into).

        Weights learned on another grid keep it, and every input size is resampled from it at forward
        time, as DINO does (its model stays at 224 px): resampling them once at load and again for
        inputs of other sizes would give numbers other than DINO's.
        """
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"position embeddings of {num_patches} patches do not form a square grid")
        self.patch_embed.set_input_size(img_size=side * self.patch_size)
        self.pos_embed = nn.Parameter(self.pos_embed.new_zeros(1, 1 + num_patches, self.pos_embed.shape[-1]),
                                      requires_grad=self.pos_embed.requires_grad)

    def native_grid_note(self) -> str:
        """One line for the user: the grid the position embeddings keep, and that other sizes are resampled."""
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        return (f"Position embeddings keep the weights' {side}x{side} grid ({side * self.patch_size} px); "
                "other sizes are resampled from it at forward time, as in DINO")

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> input tokens of the first block ``[B, 1 + N, D]``, ``N`` the patches of
        ``crop_to_patches(x)``."""
        patches = self.patch_embed(self.crop_to_patches(x))
        square_image = x.shape[-2] == x.shape[-1]
        return self.norm_pre(self.patch_drop(self._pos_embed(patches, square_image)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> all normalised output tokens ``[B, 1 + N, D]`` (CLS first)."""
        return self.norm(self.blocks(self.prepare_tokens(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> normalised CLS feature ``[B, D]``."""
        return self.forward_features(x)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> attention probabilities of the last block ``[B, heads, 1+N, 1+N]``."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return attention_probabilities(self.blocks[-1].attn, self.blocks[-1].norm1(tokens))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Images ``[B, C, H, W]`` -> the outputs of the last ``n`` blocks, each normalised, ``[B, 1+N, D]``."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be between 1 and the depth {len(self.blocks)}, got {n}")
        tokens = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        return outputs


def attention_probabilities(attn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights ``[B, heads, T, T]`` of a timm ``Attention`` module on ``[B, T, D]``.

    Fused attention never materialises these weights, so they are recomputed from the module's own
    projections; only used for visualisation, never in training.
    """
    batch, num_tokens, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = attn.q_norm(query), attn.k_norm(key)
    return ((query * attn.scale) @ key.transpose(-2, -1)).softmax(dim=-1)


# Width, blocks and heads of each architecture (``--embed_dim``, ``--depth``, ``--num_heads`` override them).
ARCH_SIZES = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
              "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
              "vit_base": dict(embed_dim=768, depth=12, num_heads=12)}


def _vit(patch_size: int, defaults: dict, kwargs: dict) -> VisionTransformer:
    """Build a ViT from size defaults that ``kwargs`` may override (tiny test models do)."""
    config = dict(mlp_ratio=4, qkv_bias=True, **defaults)
    config.update(kwargs)
    return VisionTransformer(patch_size=patch_size, **config)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Tiny: width 192, 12 blocks, 3 heads."""
    return _vit(patch_size, ARCH_SIZES["vit_tiny"], kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Small: width 384, 12 blocks, 6 heads."""
    return _vit(patch_size, ARCH_SIZES["vit_small"], kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-Base: width 768, 12 blocks, 12 heads."""
    return _vit(patch_size, ARCH_SIZES["vit_base"], kwargs)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * v / ||v||`` per output row.

    Parameters are named ``weight_g`` ``[out, 1]`` and ``weight_v`` ``[out, in]`` as in DINO's
    checkpoints (made with ``torch.nn.utils.weight_norm``), so those load unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``[out, in]``."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_dim={self.weight_v.shape[1]}, out_dim={self.weight_v.shape[0]}"


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2 normalisation -> weight-normalised linear to ``out_dim``.

    Works on any leading shape: ``[B, D]`` (CLS features) or ``[B, T, D]`` (token tensors); batch
    norm, when used, normalises over all leading positions together.

    Args:
        in_dim: input width ``D``.
        out_dim: number of prototypes ``K``.
        use_bn: batch norm after each hidden linear layer.
        norm_last_layer: freeze the scale ``g`` of the last layer at 1 (DINO's stabiliser).
        nlayers: linear layers in the MLP (at least 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the MLP output fed to the last layer.
        patch_out_dim: prototypes ``K_patch`` of a second weight-normalised last layer, ``last_layer2``, on the
            same bottleneck, for patch tokens (``--patch_head ibot``: iBOT's ``iBOTHead(shared_head=False)``
            layout); ``None``: no second last layer (``last_layer2`` is None and not in the state dict).
            ``norm_last_layer`` applies to both last layers; ``forward`` uses ``last_layer`` only.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 patch_out_dim: int | None = None):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be at least 1, got {nlayers}")
        self.mlp = _head_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer
        # Drawn after last_layer: the MLP and last_layer get the same initial weights with or without it.
        self.last_layer2 = None if patch_out_dim is None else WeightNormLinear(bottleneck_dim, patch_out_dim)
        if self.last_layer2 is not None:
            self.last_layer2.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., in_dim]`` -> logits ``[..., out_dim]``."""
        return self.last_layer(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., in_dim]`` -> L2-normalised bottleneck ``[..., bottleneck_dim]``, the last layer's input.

        Training feeds this to the fused loss, which applies the (linear) last layer chunk by chunk.
        """
        leading = x.shape[:-1]
        x = self.mlp(x.reshape(-1, x.shape[-1]))
        return F.normalize(x, dim=-1, p=2).reshape(*leading, -1)


def _head_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(width, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        width = hidden_dim
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Building from arguments, and loading pretrained weights.
# ----------------------------------------------------------------------------------------------
ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}
BACKBONE_SIZE_ARGS = ("embed_dim", "depth", "num_heads")
ARCHITECTURE_ARGS = ("arch", "patch_size", *BACKBONE_SIZE_ARGS)
DEFAULT_ARCH, DEFAULT_PATCH_SIZE = "vit_small", 16
WEIGHTS_ARCHITECTURE_HELP = ("a checkpoint's stored training args, a reference name's, or the architecture of their "
                             "width; vit_small with --random_init")


def add_backbone_args(parser) -> None:
    """The arguments that define a backbone, shared by training and every evaluation script."""
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS),
                        help="Backbone: vit_small (default) is the usual choice, vit_tiny the fastest. When "
                             f"evaluating weights, left out it is theirs ({WEIGHTS_ARCHITECTURE_HELP}); given, it "
                             "must agree with them.")
    parser.add_argument("--patch_size", default=DEFAULT_PATCH_SIZE, type=int,
                        help="Patch side in pixels (default 16). Smaller patches give more tokens and better "
                             "features at a quadratic attention cost; image and crop sides must be multiples of "
                             "it. When evaluating weights, left out it is theirs (the kernel of their patch "
                             "embedding, or a reference name's); given, it must agree with them.")
    parser.add_argument("--embed_dim", default=None, type=int,
                        help="Override the architecture's width (tiny models). Default: the architecture's; when "
                             "evaluating weights, theirs.")
    parser.add_argument("--depth", default=None, type=int,
                        help="Override the architecture's number of blocks. Default: the architecture's; when "
                             "evaluating weights, theirs.")
    parser.add_argument("--num_heads", default=None, type=int,
                        help="Override the architecture's number of heads. Default: the architecture's; when "
                             "evaluating weights, theirs (a checkpoint's stored args, or the architecture of their "
                             "width; other files need it given).")


def check_backbone_args(args) -> list[str]:
    """What is wrong with the backbone arguments (``add_backbone_args``), one line each; empty if nothing.

    Training's ``validate_args`` lists these with its own problems; without the check the model's
    constructors fail deep inside (ZeroDivisionError, a bare AssertionError).
    """
    problems = [f"--{name} must be positive, got {getattr(args, name)}" for name in ("patch_size", *BACKBONE_SIZE_ARGS)
                if getattr(args, name, None) is not None and getattr(args, name) <= 0]
    size = {name: (getattr(args, name), "") if getattr(args, name, None) is not None
            else (ARCH_SIZES[args.arch][name], f" ({args.arch}'s default)") for name in ("embed_dim", "num_heads")}
    (width, width_note), (heads, heads_note) = size["embed_dim"], size["num_heads"]
    if heads > 0 and width % heads:
        problems.append(f"--embed_dim {width}{width_note} is not a multiple of --num_heads {heads}{heads_note}; "
                        "choose a width divisible by the number of heads")
    return problems


def validate_backbone_args(args) -> None:
    """Fill in the backbone arguments not given from the weights, or the defaults (``resolve_backbone_args``),
    then raise a ``ValueError`` listing ``check_backbone_args``'s problems, if any (for an evaluation's
    ``validate_args``, and before any model is built)."""
    resolve_backbone_args(args)
    problems = check_backbone_args(args)
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))


def size_overrides(args) -> dict:
    """The ``--embed_dim`` / ``--depth`` / ``--num_heads`` overrides set in ``args``."""
    return {name: getattr(args, name) for name in BACKBONE_SIZE_ARGS if getattr(args, name, None) is not None}


def build_backbone(args, img_size: int = 224, drop_path_rate: float = 0.0) -> VisionTransformer:
    """The ViT named by ``args.arch`` / ``args.patch_size`` with any size overrides in ``args``."""
    validate_backbone_args(args)
    return ARCHS[args.arch](patch_size=args.patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                            **size_overrides(args))


def backbone_state_dict(checkpoint: dict, checkpoint_key: str = "teacher", source: str = "this checkpoint") -> dict:
    """The backbone weights inside a checkpoint, with wrapper prefixes and head weights removed.

    Accepts a full training checkpoint (ours or DINO's: weights under ``checkpoint_key``), or a
    backbone-only state dict in DINO or timm layout; strips ``module.`` and ``backbone.``. Any other layout
    with nested entries (DeiT's or MAE's ``{"model": ...}``, a wrong ``--checkpoint_key``) stops with one line
    naming ``source`` and the entries that hold tensors, each a possible ``--checkpoint_key``.
    """
    if isinstance(checkpoint.get(checkpoint_key), dict):
        checkpoint = checkpoint[checkpoint_key]
    elif any(isinstance(value, dict) for value in checkpoint.values()):
        weights = [str(key) for key, value in checkpoint.items()
                   if isinstance(value, dict) and any(torch.is_tensor(tensor) for tensor in value.values())]
        fix = (f"pass one of them with --checkpoint_key (e.g. --checkpoint_key {weights[0]})" if weights else
               "it holds no backbone weights: point --pretrained_weights to a training checkpoint or a state dict")
        raise ValueError(f"no '{checkpoint_key}' weights (--checkpoint_key {checkpoint_key}) in {source}: its entries "
                         f"are {', '.join(map(str, checkpoint))}; those holding weights: {', '.join(weights) or 'none'}"
                         f"; {fix}")
    stripped = utils.strip_prefixes(checkpoint, ("module.", "backbone."))
    # Drop DINO's projection head (with iBOT's second last layer, head.last_layer2, of --patch_head ibot), a separate
    # patch head (patch_head.*, --patch_head separate) and timm's classifier.
    return {key: value for key, value in stripped.items() if not key.startswith(("head.", "patch_head.", "fc_norm."))}


def load_pretrained_weights(model: VisionTransformer, path: str, checkpoint_key: str = "teacher") -> None:
    """Load backbone weights strictly; a mismatch stops with the missing and unexpected keys, and weights
    holding NaN or infinity stop with the first such tensor (every evaluation loads through here).

    ``path`` is a file, or a name of ``REFERENCE_WEIGHTS`` (read from torch's hub cache, downloaded there on
    first use). Weights learned on another grid keep it (``set_native_grid``): inputs of every size are
    resampled from it at forward time, as DINO does.
    """
    path = resolve_weights_path(path)
    checkpoint = utils.load_checkpoint(path, what="weights")
    state = backbone_state_dict(checkpoint, checkpoint_key, source=str(path))
    _raise_on_non_finite(state, checkpoint, path)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        model.set_native_grid(state["pos_embed"].shape[1] - 1)
        print(model.native_grid_note(), flush=True)
    _raise_on_mismatch(model, state, path)
    model.load_state_dict(state, strict=True)
    print(f"Loaded {len(state)} backbone tensors from {path} (key '{checkpoint_key}')", flush=True)


def load_head_weights(head: DINOHead, path: str, checkpoint_key: str = "teacher") -> None:
    """Load the projection head (``head.*``) of a training checkpoint, ours or DINO's, from its ``checkpoint_key``
    weights, strictly: the head's sizes must be those it was trained with."""
    weights = utils.load_checkpoint(path, what="weights").get(checkpoint_key)
    weights = utils.strip_prefixes(weights) if isinstance(weights, dict) else {}
    state = {key[len("head."):]: value for key, value in weights.items() if key.startswith("head.")}
    if not state:
        raise ValueError(f"no projection head (head.*) in the '{checkpoint_key}' weights of {path}: a head is kept "
                         "in a training checkpoint (ours or DINO's), under 'teacher' or 'student'")
    _raise_on_mismatch(head, state, path, what="head (check in_dim, out_dim, nlayers, hidden_dim and bottleneck_dim)")
    head.load_state_dict(state, strict=True)
    print(f"Loaded {len(state)} head tensors from {path} (key '{checkpoint_key}')", flush=True)


# Keys of a full training checkpoint (ours and DINO's), as opposed to exported backbone weights.
TRAINING_CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "epoch")


def _raise_on_non_finite(state: dict, checkpoint: dict, path: str) -> None:
    """Refuse backbone weights holding NaN or infinity: their features still give plausible-looking scores
    (k-NN 0 %, linear at chance, some mAP), which would be read as a bad model rather than a broken file."""
    name = utils.first_non_finite(state)
    if name is None:
        return
    if any(key in checkpoint for key in TRAINING_CHECKPOINT_KEYS):
        earlier = sorted(p.name for p in Path(path).parent.glob("checkpoint[0-9][0-9][0-9][0-9].pth")
                         if p.name != Path(path).name)
        found = f" (in that folder: {', '.join(earlier[-3:])})" if earlier else ""
        epoch = f" (epoch {checkpoint['epoch']})" if "epoch" in checkpoint else ""
        fix = (f"this is a training checkpoint{epoch}: the training run diverged before it was written; "
               f"evaluate an earlier checkpoint00NN.pth of the same run{found}")
    else:
        fix = "the file is damaged or was saved from a diverged model; evaluate other weights"
    raise RuntimeError(f"the weights in {path} are not finite: tensor {name} holds NaN or infinity; {fix}")


def _raise_on_mismatch(model: nn.Module, state: dict, path: str,
                       what: str = "backbone (check --arch, --patch_size and size overrides)") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(
            f"the weights in {path} do not fit this {what}:\n"
            f"  missing keys ({len(missing)}): {_preview(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}\n"
            f"  shape mismatches ({len(wrong_shape)}): {_preview(wrong_shape)}")


def _preview(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def build_frozen_backbone(args, img_size: int) -> VisionTransformer:
    """An evaluation backbone: pretrained weights from ``args.pretrained_weights`` or, with
    ``args.random_init``, deliberately random ones; in eval mode without gradients."""
    if bool(args.pretrained_weights) == bool(args.random_init):
        raise ValueError(missing_weights_message(args))
    with torch.random.fork_rng():  # the random baseline is the same in every run (seed 0)
        torch.manual_seed(0)
        model = build_backbone(args, img_size=img_size)
    if args.pretrained_weights:
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
    else:
        print("Evaluating RANDOM weights (--random_init): a baseline, not a trained model", flush=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model


def missing_weights_message(args) -> str:
    """What to give when neither or both of --pretrained_weights and --random_init are: DINO's scripts evaluate
    the released weights of --arch/--patch_size when --pretrained_weights is left out, so their name is offered."""
    released = [name for name, entry in REFERENCE_WEIGHTS.items()
                if (entry.arch, entry.patch_size) == (args.arch, args.patch_size)]
    offer = (f"--pretrained_weights {released[0]}, DINO's released weights for --arch {args.arch} --patch_size "
             f"{args.patch_size} (what DINO's scripts evaluate without --pretrained_weights)" if released else
             "a name of DINO's released weights (" + ", ".join(REFERENCE_WEIGHTS) + ")")
    return (f"give either --pretrained_weights PATH or --random_init (a random-weights baseline); instead of a PATH, "
            f"{offer} downloads them once, and nothing is downloaded otherwise")


def add_weights_args(parser) -> None:
    """The arguments that pick evaluation weights; call after ``add_backbone_args``.

    ``--arch`` and ``--patch_size`` then default to None ("not given"), so that the weights (a reference name,
    or the file itself) can set them and an explicit value that contradicts them is caught
    (``resolve_backbone_args``).
    """
    names = ", ".join(f"{name} ({entry.arch}, patch {entry.patch_size}: {entry.description})"
                      for name, entry in REFERENCE_WEIGHTS.items())
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Weights to evaluate: the path of our or DINO's training checkpoint or of a "
                             "backbone-only state dict (DINO or timm layout); or the name of DINO's released "
                             f"weights: {names}. A name is downloaded once into torch's hub cache "
                             "($TORCH_HOME/hub/checkpoints) and read from there. The architecture, patch size and "
                             "sizes not given are the weights' own (see --arch).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which weights of a full checkpoint to use: teacher (usual) or student.")
    parser.add_argument("--random_init", action="store_true",
                        help="Evaluate randomly initialised weights instead (a baseline).")
    parser.set_defaults(arch=None, patch_size=None)


def pretrained_backbone(arch: str, patch_size: int | None = None, pretrained_weights: str = "",
                        checkpoint_key: str = "teacher", img_size: int | Sequence[int] = 224,
                        drop_path_rate: float = 0.0, embed_dim: int | None = None, depth: int | None = None,
                        num_heads: int | None = None) -> VisionTransformer:
    """The backbone ``arch`` with ``pretrained_weights`` loaded (torch.hub's entries, see ``hubconf.py``).

    ``pretrained_weights`` is a path or a ``REFERENCE_WEIGHTS`` name, resolved, checked and loaded as in the
    evaluations; without it the weights are random (timm's initialisation). ``patch_size`` and the size
    overrides left None are the weights' own (``resolve_backbone_args``: a file's stored args and tensors, a
    name's), else 16 and ``arch``'s sizes; ``arch`` must agree with the weights. ``img_size`` is one side, as
    an int or as DINO's one-element list (``[224]``).
    The model is returned trainable, in training mode, like DINO's hub models.
    """
    args = argparse.Namespace(arch=arch, patch_size=patch_size, pretrained_weights=pretrained_weights,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    model = build_backbone(args, img_size=image_side(img_size), drop_path_rate=drop_path_rate)
    if pretrained_weights:
        load_pretrained_weights(model, pretrained_weights, checkpoint_key)
    return model


def image_side(img_size: int | Sequence[int]) -> int:
    """The side in pixels that ``img_size`` gives: an int, or DINO's form, a list of one int (``[224]``)."""
    side = img_size[0] if isinstance(img_size, (list, tuple)) and len(img_size) == 1 else img_size
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        raise ValueError(f"img_size={img_size!r} is not one image side: give a positive number of pixels, as an "
                         "int (224) or as DINO's one-element list ([224]); the position embeddings are square")
    return side


# ----------------------------------------------------------------------------------------------
# Reference weights by name: DINO's released backbones, fetched only when named.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceWeights:
    """Released backbone-only weights (a plain DINO-layout state dict) that a name stands for."""

    url: str
    arch: str
    patch_size: int
    description: str

    @property
    def file_name(self) -> str:
        """The file's name in the cache: the URL's last part, as ``torch.hub.load_state_dict_from_url`` keeps it."""
        return self.url.rsplit("/", 1)[-1]


# The URLs of DINO's hubconf.py, README and eval_image_retrieval.py.
_DINO_RELEASES = "https://dl.fbaipublicfiles.com/dino/"
REFERENCE_WEIGHTS = {
    "dino_vits16": ReferenceWeights(_DINO_RELEASES + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                                    "vit_small", 16, "DINO ViT-S/16 on ImageNet"),
    "dino_vits8": ReferenceWeights(_DINO_RELEASES + "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
                                   "vit_small", 8, "DINO ViT-S/8 on ImageNet"),
    "dino_vitb16": ReferenceWeights(_DINO_RELEASES + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                                    "vit_base", 16, "DINO ViT-B/16 on ImageNet"),
    "dino_vitb8": ReferenceWeights(_DINO_RELEASES + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
                                   "vit_base", 8, "DINO ViT-B/8 on ImageNet"),
    "dino_vits16_gldv2": ReferenceWeights(
        _DINO_RELEASES + "dino_vitsmall16_googlelandmark_pretrain/dino_vitsmall16_googlelandmark_pretrain.pth",
        "vit_small", 16, "DINO ViT-S/16 on Google Landmarks v2, DINO's image-retrieval model"),
}


def reference_weights(value: str) -> ReferenceWeights | None:
    """The entry that ``value`` (a ``--pretrained_weights`` value) names, or None for a path.

    An unknown name that looks like one (``dino_`` and a word, no such file) is an error listing the known
    names; anything else stays a path, so nothing is fetched without a known name.
    """
    if value in REFERENCE_WEIGHTS:
        return REFERENCE_WEIGHTS[value]
    if re.fullmatch(r"dino_\w+", value) and not Path(value).exists():
        raise ValueError(f"unknown reference weights '{value}'; the known names are "
                         f"{', '.join(REFERENCE_WEIGHTS)} (or give the path of a weights file)")
    return None


def resolve_backbone_args(args) -> None:
    """Set the backbone arguments left out (None) from the weights of ``args.pretrained_weights``: a reference
    name's architecture and patch size, or what a weights file holds (``weights_architecture``); vit_small and
    16 without weights (training, ``--random_init``). A given value that contradicts the weights is a
    ``ValueError`` naming both, before anything is built or downloaded. A file that does not exist yet while
    ``--arch`` and ``--patch_size`` are given (compare.py checks its evaluations' arguments before training
    writes the checkpoint) is left to the load."""
    name = getattr(args, "pretrained_weights", "") or ""
    if not name or getattr(args, "random_init", False):
        fill_defaults(args, {"arch": DEFAULT_ARCH, "patch_size": DEFAULT_PATCH_SIZE})
        return
    entry = reference_weights(name)
    if entry:
        check_reference_args(args, name, entry)
        fill_defaults(args, {"arch": entry.arch, "patch_size": entry.patch_size})
        return
    architecture_given = None not in (getattr(args, "arch", None), getattr(args, "patch_size", None))
    if Path(name).exists() or not architecture_given:
        fill_from_weights(args, name, weights_architecture(name, getattr(args, "checkpoint_key", "teacher")))


def fill_defaults(args, values: dict) -> None:
    """Set each argument of ``values`` that ``args`` leaves None (or lacks) to its value there."""
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def check_reference_args(args, name: str, entry: ReferenceWeights) -> None:
    """Refuse a given ``--arch`` or ``--patch_size`` that the reference weights ``name`` contradict (the strict
    load would fail later, after a download)."""
    implied = {"arch": entry.arch, "patch_size": entry.patch_size}
    contradicting = [f"--{key} {getattr(args, key, None)}" for key, value in implied.items()
                     if getattr(args, key, None) not in (None, value)]
    if contradicting:
        verb = "contradicts" if len(contradicting) == 1 else "contradict"
        raise ValueError(f"{' and '.join(contradicting)} {verb} --pretrained_weights {name}, a "
                         f"{entry.arch} with patch size {entry.patch_size} ({entry.description}); "
                         "leave out --arch and --patch_size to take the name's")


class Found(NamedTuple):
    """One architecture argument as a weights file gives it, and where in the file it was read."""

    value: str | int
    source: str


def backbone_tensor_sizes(state: dict) -> dict[str, Found]:
    """Patch side, width and depth of a ViT backbone state dict (DINO or timm layout): the kernel and output
    channels of ``patch_embed.proj.weight`` ``[D, 3, p, p]``, and the number of ``blocks.{i}``. Empty when
    there is no patch embedding (not a ViT backbone: the strict load then names what is missing)."""
    kernel = state.get("patch_embed.proj.weight")
    if kernel is None or kernel.dim() != 4:
        return {}
    embedding = "from its patch embedding patch_embed.proj.weight"
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return {"patch_size": Found(int(kernel.shape[-1]), embedding), "embed_dim": Found(int(kernel.shape[0]), embedding),
            "depth": Found(depth, "from its blocks.{i}")}


def stored_arch_and_heads(stored: dict, width: int) -> dict[str, Found]:
    """The architecture name and number of heads of weights of ``width``, given their checkpoint's stored
    training args ``stored`` (empty for a file without any).

    Ours store ``num_heads`` (None stands for the architecture's own). DINO's store ``arch`` alone: its heads
    hold where its standard width is the weights'. Otherwise the architecture whose standard width is
    ``width`` gives the heads (and the name, if none is stored); a width no architecture has gives no heads.
    """
    found = {}
    arch = stored.get("arch")
    if arch in ARCHS:
        found["arch"] = Found(arch, "from its stored args")
        if "num_heads" in stored:
            found["num_heads"] = Found(stored["num_heads"] or ARCH_SIZES[arch]["num_heads"], "from its stored args")
            return found
    standard = [name for name, sizes in ARCH_SIZES.items() if sizes["embed_dim"] == width]
    if standard:
        name = arch if arch in standard else standard[0]
        source = f"from {name}, the architecture of its width {width}"
        found["num_heads"] = Found(ARCH_SIZES[name]["num_heads"], source)
        found.setdefault("arch", Found(name, source))
    return found


def weights_architecture(path: str, checkpoint_key: str = "teacher") -> dict[str, Found]:
    """What the weights file ``path`` says of ``--arch``, ``--patch_size``, ``--embed_dim``, ``--depth`` and
    ``--num_heads``: the tensors give patch, width and depth; stored training args (ours, DINO's), or the
    width, give the architecture and heads (``stored_arch_and_heads``). Args are read at the checkpoint's top
    level, whatever ``checkpoint_key``. Remembered per file version, as every evaluation asks twice."""
    try:
        stat = Path(path).stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None  # load_checkpoint names the problem
    return dict(_weights_architecture(str(path), checkpoint_key, version))


@lru_cache(maxsize=8)
def _weights_architecture(path: str, checkpoint_key: str, version: tuple | None) -> tuple[tuple[str, Found], ...]:
    checkpoint = utils.load_checkpoint(path, what="weights")
    found = backbone_tensor_sizes(backbone_state_dict(checkpoint, checkpoint_key, source=path))
    stored = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    if found:
        found.update(stored_arch_and_heads(stored, found["embed_dim"].value))
    return tuple(found.items())


def fill_from_weights(args, path: str, found: dict[str, Found]) -> None:
    """Check the given backbone arguments against ``found`` (``weights_architecture`` of ``path``), then set
    those left out: the architecture's own sizes stay None, others become overrides. Prints the result once."""
    contradictions = [f"--{key} {getattr(args, key)} contradicts the weights' {fact.value} ({path}, {fact.source}): "
                      f"drop --{key} or give {fact.value}"
                      for key, fact in found.items() if getattr(args, key, None) not in (None, fact.value)]
    if contradictions:
        raise ValueError("; ".join(contradictions))
    if not found:  # not a ViT backbone: the strict load names what is missing
        fill_defaults(args, {"arch": DEFAULT_ARCH, "patch_size": DEFAULT_PATCH_SIZE})
        return
    if getattr(args, "num_heads", None) is None and "num_heads" not in found:
        raise ValueError(unknown_heads_message(path, found["embed_dim"].value))
    given = {key: getattr(args, key, None) for key in ARCHITECTURE_ARGS}
    fill_defaults(args, {"arch": found["arch"].value if "arch" in found else DEFAULT_ARCH,
                         "patch_size": found["patch_size"].value})
    for key in BACKBONE_SIZE_ARGS:
        if getattr(args, key, None) is None and key in found and found[key].value != ARCH_SIZES[args.arch][key]:
            setattr(args, key, found[key].value)
    now = {key: getattr(args, key, None) for key in ARCHITECTURE_ARGS}
    if now != given:
        flags = " ".join(f"--{key} {value}" for key, value in now.items() if value is not None)
        print(f"Backbone of the weights in {path}: {flags}", flush=True)


def unknown_heads_message(path: str, width: int) -> str:
    """Why the heads of weights of ``width`` cannot be told, and what to give."""
    widths = ", ".join(f"{name} {sizes['embed_dim']}" for name, sizes in ARCH_SIZES.items())
    return (f"cannot tell the number of attention heads of the weights in {path}: their width {width} is no standard "
            f"architecture's ({widths}) and the file stores no num_heads (DINO's checkpoints and backbone-only files "
            "do not); give --num_heads")


def reference_weights_path(name: str) -> Path:
    """Where the file of reference weights ``name`` is kept: torch's hub cache, ``$TORCH_HOME/hub/checkpoints``
    (the folder ``torch.hub.load_state_dict_from_url`` and DINO's hub entries use, so their files are reused)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / REFERENCE_WEIGHTS[name].file_name


def download_reference_weights(name: str) -> None:
    """Download reference weights ``name`` into the cache unless already there; offline, an error that
    gives the URL and the exact path to place the file at."""
    entry, path = REFERENCE_WEIGHTS[name], reference_weights_path(name)
    if path.is_file():
        return
    print(f"Downloading {name} ({entry.description}) from {entry.url} to {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Written to a temporary file and renamed when complete: an interrupted download leaves no file.
        torch.hub.download_url_to_file(entry.url, str(path))
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"cannot download reference weights {name} from {entry.url} ({error}); without network "
                           f"access, download that file elsewhere and place it at {path}") from error


def resolve_weights_path(value: str) -> str:
    """The file to read for a ``--pretrained_weights`` value: a reference name's cached file (downloaded by
    rank 0 on first use while the other processes wait), or the value itself as a path."""
    if reference_weights(value) is None:
        return value
    utils.run_on_main_process(lambda: download_reference_weights(value))
    return str(reference_weights_path(value))


# ----------------------------------------------------------------------------------------------
# Frozen patch features, shared by the dense evaluations (correspondence, video segmentation).
# ----------------------------------------------------------------------------------------------
def backbone_patch_features(model: VisionTransformer, n_last_blocks: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feature function: normalised images ``[B, 3, H, W]`` -> patch tokens ``[B, N, n_last_blocks * D]``
    (CLS dropped, patches row-major), each block's tokens L2-normalised so that the concatenation's cosine
    is the mean over blocks. With ``n_last_blocks`` 1 these are DINO's video-segmentation features."""
    def patch_tokens(images: torch.Tensor) -> torch.Tensor:
        blocks = model.get_intermediate_layers(images, n_last_blocks)
        return torch.cat([F.normalize(block[:, 1:].float(), dim=-1) for block in blocks], dim=-1)

    return patch_tokens
