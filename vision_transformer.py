"""Vision Transformers with DINO's interface, built on timm, and the DINO projection head.

The backbone is timm's ``VisionTransformer`` (fused scaled-dot-product attention, DINO's parameter
names), wrapped so that it behaves like DINO's ``vision_transformer.VisionTransformer``:

* ``model(x)`` returns the CLS feature ``[B, D]``;
* ``model.forward_features(x)`` returns every normalised token ``[B, 1 + N, D]``;
* ``model.get_last_selfattention(x)`` returns the last block's attention ``[B, heads, 1+N, 1+N]``;
* ``model.get_intermediate_layers(x, n)`` returns the last ``n`` block outputs, each normalised;
* any input whose sides are multiples of the patch size works: the position embeddings of the
  native grid (``img_size // patch_size`` per side) are resampled bicubically to the input's grid.

A DINO backbone state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``,
``norm.*``) loads with ``strict=True``; so does a timm ViT state dict without its classifier.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

import utils

__all__ = ["VisionTransformer", "DINOHead", "WeightNormLinear", "vit_tiny", "vit_small", "vit_base"]


class VisionTransformer(TimmVisionTransformer):
    """timm's ViT with DINO's forward interface and size-agnostic position embeddings.

    Args:
        img_size: side of the image the position embeddings are learned for (the native size).
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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop the input to a multiple of {self.patch_size} pixels per side"
            )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the CLS token and add position embeddings resampled to the grid of ``x``.

        Args:
            x: patch embeddings ``[B, H, W, D]`` (timm's NHWC layout for dynamic sizes).

        Returns:
            tokens ``[B, 1 + H * W, D]``.
        """
        batch, grid_h, grid_w, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + self.resample_pos_embed(grid_h, grid_w))

    def resample_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings ``[1, 1 + grid_h * grid_w, D]`` for a ``grid_h x grid_w`` patch grid.

        The native grid is returned unchanged; other grids are resampled bicubically (no
        antialiasing, as DINO does), in float32 whatever the parameter dtype.
        """
        native_h, native_w = self.patch_embed.grid_size
        if (grid_h, grid_w) == (native_h, native_w):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, native_h, native_w, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> input tokens of the first block ``[B, 1 + N, D]``."""
        self._check_input(x)
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

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
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be at least 1, got {nlayers}")
        self.mlp = _head_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

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


def add_backbone_args(parser) -> None:
    """The arguments that define a backbone, shared by training and every evaluation script."""
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS),
                        help="Backbone: vit_small is the usual choice, vit_tiny the fastest. When "
                             "evaluating, it must match the weights.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="Patch side in pixels. Smaller patches give more tokens and better features at "
                             "a quadratic attention cost; image and crop sides must be multiples of it.")
    parser.add_argument("--embed_dim", default=None, type=int, help="Override the architecture's width (tiny models).")
    parser.add_argument("--depth", default=None, type=int, help="Override the architecture's number of blocks.")
    parser.add_argument("--num_heads", default=None, type=int, help="Override the architecture's number of heads.")


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
    """Raise a ``ValueError`` listing ``check_backbone_args``'s problems, if any (for an evaluation's
    ``validate_args``, and before any model is built)."""
    problems = check_backbone_args(args)
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))


def build_backbone(args, img_size: int = 224, drop_path_rate: float = 0.0) -> VisionTransformer:
    """The ViT named by ``args.arch`` / ``args.patch_size`` with any size overrides in ``args``."""
    validate_backbone_args(args)
    overrides = {name: getattr(args, name) for name in BACKBONE_SIZE_ARGS if getattr(args, name, None) is not None}
    return ARCHS[args.arch](patch_size=args.patch_size, img_size=img_size, drop_path_rate=drop_path_rate, **overrides)


def backbone_state_dict(checkpoint: dict, checkpoint_key: str = "teacher") -> dict:
    """The backbone weights inside a checkpoint, with wrapper prefixes and head weights removed.

    Accepts a full training checkpoint (ours or DINO's: weights under ``checkpoint_key``), or a
    backbone-only state dict in DINO or timm layout; strips ``module.`` and ``backbone.``.
    """
    if checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], dict):
        checkpoint = checkpoint[checkpoint_key]
    elif any(isinstance(value, dict) for value in checkpoint.values()):
        nested = [key for key, value in checkpoint.items() if isinstance(value, dict)]
        raise KeyError(f"no '{checkpoint_key}' weights in this checkpoint; it holds {nested}: pass one of "
                       f"them with --checkpoint_key")
    stripped = utils.strip_prefixes(checkpoint, ("module.", "backbone."))
    # Drop DINO's projection head and timm's classifier.
    return {key: value for key, value in stripped.items() if not key.startswith(("head.", "fc_norm."))}


def load_pretrained_weights(model: VisionTransformer, path: str, checkpoint_key: str = "teacher") -> None:
    """Load backbone weights strictly; a mismatch stops with the missing and unexpected keys, and weights
    holding NaN or infinity stop with the first such tensor (every evaluation loads through here).

    Position embeddings learned for another native grid are resampled (bicubic) to the model's.
    """
    checkpoint = utils.load_checkpoint(path, what="weights")
    state = backbone_state_dict(checkpoint, checkpoint_key)
    _raise_on_non_finite(state, checkpoint, path)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed_tensor(state["pos_embed"], model.pos_embed.shape[1] - 1)
    _raise_on_mismatch(model, state, path)
    model.load_state_dict(state, strict=True)
    print(f"Loaded {len(state)} backbone tensors from {path} (key '{checkpoint_key}')", flush=True)


def resample_pos_embed_tensor(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[1, 1 + n^2, D]`` position embeddings resampled to ``[1, 1 + num_patches, D]`` (square grids)."""
    old_side, new_side = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_patches)
    if old_side ** 2 != pos_embed.shape[1] - 1 or new_side ** 2 != num_patches:
        raise ValueError(f"cannot resample position embeddings of {pos_embed.shape[1]} tokens to 1 + {num_patches}")
    grid = pos_embed[:, 1:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    print(f"Resampled position embeddings from a {old_side}x{old_side} to a {new_side}x{new_side} grid", flush=True)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1).to(pos_embed.dtype)], 1)


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


def _raise_on_mismatch(model: nn.Module, state: dict, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(
            f"the weights in {path} do not fit this backbone (check --arch, --patch_size and size overrides):\n"
            f"  missing keys ({len(missing)}): {_preview(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}\n"
            f"  shape mismatches ({len(wrong_shape)}): {_preview(wrong_shape)}")


def _preview(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def build_frozen_backbone(args, img_size: int) -> VisionTransformer:
    """An evaluation backbone: pretrained weights from ``args.pretrained_weights`` or, with
    ``args.random_init``, deliberately random ones; in eval mode without gradients."""
    if bool(args.pretrained_weights) == bool(args.random_init):
        raise ValueError("give either --pretrained_weights PATH or --random_init (a random-weights baseline); "
                         "nothing is ever downloaded")
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


def add_weights_args(parser) -> None:
    """The arguments that pick evaluation weights."""
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Weights to evaluate: our or DINO's training checkpoint, or a backbone-only "
                             "state dict (DINO or timm layout).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which weights of a full checkpoint to use: teacher (usual) or student.")
    parser.add_argument("--random_init", action="store_true",
                        help="Evaluate randomly initialised weights instead (a baseline).")
