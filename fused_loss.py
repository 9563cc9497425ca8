"""PW-Self's matched cross-entropy fused with the DINO head's last layer, in chunks of tokens.

The head's last layer is linear: logits ``= z W^T`` for the L2-normalised bottleneck ``z [N, d]``
and the weight-normalised prototypes ``W [K, d]``. A matched pair (teacher token ``i``, student
token ``j``) costs (docs/method.md section 4)

    CE(i, j) = logsumexp(s_j) - <P_i, s_j>,   s_j = z_j W^T / tau_s,   P_i = softmax((t_i - C_i) / tau_t)

and since ``<P_i, z_j W^T> = z_j . (P_i W)``, every teacher token is folded back to ``d``
dimensions once, ``Y_i = P_i W``: the dot products and the teacher part of every gradient become
``d``-wide matmuls instead of gathers of ``K``-long rows. The loss is a weighted sum of CEs with
weights fixed before it is computed, so its gradient is formed in the same pass and ``backward``
only scales it:

    dL/dz_j = (w_j softmax(s_j) W - sum_g w_jg Y_(partner jg)) / tau_s,   w_j = sum_g w_jg
    dL/dW   = (sum_j w_j softmax(s_j)^T z_j - sum_i P_i^T A_i) / tau_s,   A_i = sum_(jg -> i) w_jg z_j

Nothing of size ``[tokens, K]`` outlives one chunk of ``chunk_elements / K`` rows, so memory does
not grow with the batch. Matmuls take their inputs in ``compute_dtype`` (the autocast dtype);
softmax, log-sum-exp, dot products and sums run in float32 (float64 inputs stay float64).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_CHUNK_ELEMENTS = 2 ** 27  # 512 MiB of float32 logits per chunk


@dataclass(frozen=True)
class FusedConfig:
    """Temperatures, the matmul dtype (``None``: the embeddings' dtype), the chunk size in logits, and
    whether to ``torch.compile`` the per-chunk softmax kernels."""

    student_temp: float
    teacher_temp: float
    compute_dtype: torch.dtype | None = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    compile: bool = False


def matched_cross_entropy(student_z: torch.Tensor, student_weight: torch.Tensor, teacher_z: torch.Tensor,
                          teacher_weight: torch.Tensor, center: torch.Tensor, partners: torch.Tensor,
                          pair_weights: torch.Tensor, config: FusedConfig):
    """Weighted matched cross-entropy of student against teacher tokens, through the last layer.

    Args:
        student_z: ``[N, d]`` student embeddings (only tokens that have a partner).
        student_weight: ``[K, d]`` the student's last-layer weight (gradients flow to both).
        teacher_z: ``[S, T, d]`` teacher embeddings, ``S`` sequences (global views x samples) of
            ``T`` tokens; teacher row ``s * T + t`` is what ``partners`` refers to.
        teacher_weight: ``[K, d]``; center: ``[T, K]`` subtracted per token position.
        partners: int64 ``[N, G]`` teacher row of each student token's partner, -1 for none.
        pair_weights: ``[N, G]`` weight of each pair in the loss (0 where there is no partner).

    Returns:
        the loss ``sum(pair_weights * CE)`` (differentiable), the CEs ``[N, G]`` (0 without a
        partner) and the summed entropy of the teacher distributions over all ``S * T`` tokens.
    """
    return _FusedMatchedCrossEntropy.apply(student_z, student_weight, teacher_z.detach(), teacher_weight.detach(),
                                           center, partners, pair_weights, config)


class _FusedMatchedCrossEntropy(torch.autograd.Function):
    """The autograd wrapper of ``matched_cross_entropy``: gradient in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, student_z, student_weight, teacher_z, teacher_weight, center, partners, pair_weights, config):
        dtype = config.compute_dtype or student_z.dtype
        accumulate = torch.promote_types(dtype, torch.float32)
        z = student_z.to(accumulate)
        valid, partner_rows = partners >= 0, partners.clamp(min=0)
        weights = pair_weights.to(accumulate) * valid
        targets = _weighted_scatter(z, weights, partner_rows, valid, teacher_z.shape[0] * teacher_z.shape[1])
        folded, teacher_grad, entropy = teacher_pass(teacher_z, teacher_weight, center, student_weight, targets, config)
        log_norm, softmax_folded, student_grad = student_pass(z, student_weight, weights.sum(1), config)
        partner_folded = folded[partner_rows]  # [N, G, d]
        cross_entropy = torch.where(valid, log_norm[:, None] - torch.linalg.vecdot(z[:, None], partner_folded)
                                    / config.student_temp, 0.0)
        grad_z = (softmax_folded - (weights[..., None] * partner_folded).sum(1)) / config.student_temp
        grad_weight = (student_grad - teacher_grad) / config.student_temp
        ctx.grads = (grad_z.to(student_z.dtype), grad_weight.to(student_weight.dtype))
        ctx.mark_non_differentiable(cross_entropy, entropy)
        return (weights * cross_entropy).sum(), cross_entropy, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_cross_entropy, _grad_entropy):
        grad_z, grad_weight = ctx.grads
        return grad_z * grad_loss, grad_weight * grad_loss, None, None, None, None, None, None


def _weighted_scatter(z: torch.Tensor, weights: torch.Tensor, partner_rows: torch.Tensor, valid: torch.Tensor,
                      teacher_rows: int) -> torch.Tensor:
    """``A_i = sum over pairs (j, g) with partner i of w_jg z_j``: ``[teacher_rows, d]`` from ``z [N, d]`` and
    ``weights``, ``partner_rows``, ``valid`` ``[N, G]``."""
    targets = torch.zeros(teacher_rows, z.shape[1], dtype=z.dtype, device=z.device)
    return targets.index_add_(0, partner_rows[valid], (weights[..., None] * z[:, None])[valid])


def teacher_pass(teacher_z: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
                 student_weight: torch.Tensor, targets: torch.Tensor, config: FusedConfig):
    """Teacher distributions chunk by chunk, folded back to the bottleneck and never kept.

    Args: ``teacher_z [S, T, d]``, ``teacher_weight [K, d]``, ``center [T, K]``,
    ``student_weight [K, d]``, ``targets [S * T, d]`` (the ``A_i`` of the module docstring).

    Returns:
        ``Y = P W_student`` ``[S * T, d]``, ``sum_i P_i^T A_i`` ``[K, d]`` and the summed entropy.
    """
    dtype = config.compute_dtype or teacher_z.dtype
    sequences, tokens, _ = teacher_z.shape
    teacher_w, student_w = teacher_weight.to(dtype), student_weight.to(dtype)
    step = max(1, config.chunk_elements // (tokens * teacher_w.shape[0]))
    softmax = _kernel(teacher_softmax, config.compile)
    folded, weight_grad, entropy = [], 0.0, 0.0
    for start in range(0, sequences, step):
        logits = torch.mm(teacher_z[start:start + step].flatten(0, 1).to(dtype), teacher_w.T)
        probs, chunk_entropy = softmax(logits.view(-1, tokens, logits.shape[-1]), center, config.teacher_temp)
        entropy = entropy + chunk_entropy
        folded.append(_matmul(probs, student_w, dtype))
        weight_grad = weight_grad + _matmul(probs.T, targets[start * tokens:(start + step) * tokens], dtype)
    return torch.cat(folded), weight_grad, entropy


def student_pass(z: torch.Tensor, student_weight: torch.Tensor, total_weights: torch.Tensor, config: FusedConfig):
    """Student log-normalisers and softmax terms of the gradient, chunk by chunk.

    Args: ``z [N, d]`` (float32/64), ``student_weight [K, d]``, ``total_weights [N]`` (``w_j``).

    Returns:
        ``logsumexp(s_j)`` ``[N]``, ``w_j softmax(s_j) W`` ``[N, d]`` and
        ``sum_j w_j softmax(s_j)^T z_j`` ``[K, d]``.
    """
    dtype = config.compute_dtype or z.dtype
    weight = student_weight.to(dtype)
    step = max(1, config.chunk_elements // weight.shape[0])
    softmax = _kernel(student_softmax, config.compile)
    log_norms, softmax_folded, weight_grad = [], [], 0.0
    for start in range(0, len(z), step):
        chunk = z[start:start + step].to(dtype)
        log_norm, weighted_probs = softmax(torch.mm(chunk, weight.T), config.student_temp,
                                           total_weights[start:start + step])
        log_norms.append(log_norm)
        softmax_folded.append(_matmul(weighted_probs, weight, dtype))
        weight_grad = weight_grad + _matmul(weighted_probs.T, chunk, dtype)
    return torch.cat(log_norms), torch.cat(softmax_folded), weight_grad


def teacher_softmax(logits: torch.Tensor, center: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, T, K]`` -> ``softmax((logits - center) / temperature)`` ``[n * T, K]`` in the logits' dtype,
    and the summed entropy of those distributions (computed in float32)."""
    scaled = (logits.to(center.dtype) - center) / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    probs = torch.exp(scaled - log_norm)
    entropy = (log_norm.squeeze(-1) - torch.linalg.vecdot(probs, scaled)).sum()  # -sum p log p
    return probs.to(logits.dtype).flatten(0, 1), entropy


def student_softmax(logits: torch.Tensor, temperature: float,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, K]`` -> ``logsumexp(logits / temperature)`` ``[n]`` (float32) and
    ``weights[:, None] * softmax(logits / temperature)`` ``[n, K]`` in the logits' dtype."""
    scaled = logits.to(weights.dtype) / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    return log_norm, (torch.exp(scaled - log_norm[:, None]) * weights[:, None]).to(logits.dtype)


def _kernel(function: Callable, compile_it: bool) -> Callable:
    """``function``, or its ``torch.compile``d version (one elementwise kernel instead of several passes)."""
    return _compiled(function) if compile_it else function


@functools.cache
def _compiled(function: Callable) -> Callable:
    return torch.compile(function, dynamic=None)


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with both inputs in ``dtype``, returned in float32 (float64 stays): small ``[*, d]`` results."""
    product = torch.mm(a.to(dtype), b.to(dtype))
    return product.to(torch.promote_types(dtype, torch.float32))
