"""The PW-Self objective (docs/method.md section 4): matched token pairs of a batch and the loss over them.

``compute_matches`` turns view geometries into, for every (teacher global view, student view) pair, the
teacher token matched to each student token; ``matched_pairs`` flattens those into rows, partners and loss
weights; ``PatchWiseDINOLoss`` computes the loss from head embeddings (fused with the head's last layer,
``fused_loss.py``) or from full logits (``reference``, the straightforward computation), and keeps the
per-position centers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

import utils
from fused_loss import DEFAULT_CHUNK_ELEMENTS, FusedConfig, matched_cross_entropy
from patch_matching import match_patches_batched

NUM_GLOBAL_VIEWS = 2


def view_pairs(num_views: int) -> list[tuple[int, int]]:
    """(teacher global view, student view) pairs: every other view for each global view."""
    return [(g, v) for g in range(NUM_GLOBAL_VIEWS) for v in range(num_views) if v != g]


def compute_matches(geometry: torch.Tensor, patch_size: int, mode: str,
                    patch_loss: bool) -> dict[tuple[int, int], torch.Tensor]:
    """Teacher token per student token for every view pair, on the geometry's device.

    All pairs whose student views share a size are matched in one batched call (two calls in all).

    Args:
        geometry: ``[B, V, 6]`` from ``collate_multicrop``.

    Returns:
        ``{(g, v): LongTensor [B, T_v]}`` with -1 for unmatched tokens; ``T_v = 1`` (CLS only)
        when ``patch_loss`` is off.
    """
    batch, num_views = geometry.shape[:2]
    pairs = view_pairs(num_views)
    if not patch_loss:
        cls_only = torch.zeros(batch, 1, dtype=torch.long, device=geometry.device)
        return {pair: cls_only for pair in pairs}
    found = {}
    for group in ([p for p in pairs if p[1] < NUM_GLOBAL_VIEWS], [p for p in pairs if p[1] >= NUM_GLOBAL_VIEWS]):
        if group:
            teachers = torch.cat([geometry[:, g] for g, _ in group])
            students = torch.cat([geometry[:, v] for _, v in group])
            found.update(zip(group, match_patches_batched(teachers, students, patch_size, mode).split(batch)))
    return {pair: found[pair] for pair in pairs}


@dataclass
class MatchedPairs:
    """Every matched (teacher token, student token) pair of a batch, by rows of the flat token layouts.

    Student rows follow ``MultiCropWrapper``'s layout (view, sample, token); teacher rows likewise over
    the global views: token ``i`` of sample ``b`` in global view ``g`` is teacher row ``(g * B + b) * T_g + i``.

    Attributes:
        rows: int64 ``[N]`` the student rows that have at least one partner, ascending.
        partners: int64 ``[N, G]`` the teacher row matched to each of them in global view ``g``, or -1.
        weights: float64 ``[N, G]`` the derivative of the loss with respect to each pair's cross-entropy.
        is_cls: bool ``[N]`` whether the student token is a CLS token.
        tokens_per_view: ``T_v`` of every view; batch_size: ``B``; num_pairs: view pairs in the loss.
    """

    rows: torch.Tensor
    partners: torch.Tensor
    weights: torch.Tensor
    is_cls: torch.Tensor
    tokens_per_view: list[int]
    batch_size: int
    num_pairs: int


def matched_pairs(matches: dict[tuple[int, int], torch.Tensor], cls_weight: float | None) -> MatchedPairs:
    """Turn ``compute_matches``'s per-pair index maps into flat rows, partners and loss weights."""
    tokens, batch = tokens_per_view(matches), len(matches[(1, 0)])
    groups = [_group_partners(matches, views, tokens[0], cls_weight) for views in utils.consecutive_runs(tokens)]
    partners, weights, is_cls = (torch.cat(parts) for parts in zip(*groups))
    rows = torch.nonzero((partners >= 0).any(1)).flatten()
    return MatchedPairs(rows, partners[rows], weights[rows], is_cls[rows], tokens, batch, len(matches))


def tokens_per_view(matches: dict[tuple[int, int], torch.Tensor]) -> list[int]:
    """Tokens ``T_v`` of every view, read off the matches."""
    num_views = 1 + max(v for _, v in matches)
    return [matches[_a_pair_of(v)].shape[1] for v in range(num_views)]


def _a_pair_of(view: int) -> tuple[int, int]:
    """A view pair in which ``view`` is the student: global view 1 teaches view 0, global view 0 all others."""
    return (1 if view == 0 else 0), view


def _group_partners(matches: dict[tuple[int, int], torch.Tensor], views: list[int], teacher_tokens: int,
                    cls_weight: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rows (-1: none) and pair weights ``[n * B * T, G]``, and CLS flags ``[n * B * T]``, of ``n``
    consecutive student views of ``T`` tokens each, in the flat layout."""
    template = matches[_a_pair_of(views[0])]
    (batch, tokens), device = template.shape, template.device
    unmatched = torch.full_like(template, -1)  # a view is never its own student
    match = torch.stack([torch.stack([matches.get((g, v), unmatched) for g in range(NUM_GLOBAL_VIEWS)])
                         for v in views])  # [n, G, B, T]
    sequence = torch.arange(NUM_GLOBAL_VIEWS * batch, device=device).view(1, NUM_GLOBAL_VIEWS, batch, 1)
    partners = torch.where(match >= 0, sequence * teacher_tokens + match, -1)
    weights = pair_weights(match, cls_weight) / len(matches)
    is_cls = (torch.arange(tokens, device=device) == 0).repeat(len(views) * batch)
    return partners.permute(0, 2, 3, 1).flatten(0, 2), weights.permute(0, 2, 3, 1).flatten(0, 2), is_cls


def pair_weights(match: torch.Tensor, cls_weight: float | None) -> torch.Tensor:
    """``d l(g, v) / d CE`` for every token of view-pair matches ``[..., B, T_v]``, float64 (docs/method.md section 4).

    Unset ``cls_weight``: ``1 / (B + matched patches)`` for every matched token. Else ``lambda / B`` for
    CLS and ``(1 - lambda) / matched patches`` for patches; ``1 / B`` for CLS when no patch is matched.
    """
    matched = (match >= 0).to(torch.float64)
    batch, patch_count = match.shape[-2], matched[..., 1:].sum((-2, -1), keepdim=True)
    if cls_weight is None:
        return matched / (batch + patch_count)
    has_patches = (patch_count[..., 0] > 0).to(torch.float64)
    weights = matched * (1 - cls_weight) / patch_count.clamp(min=1)
    weights[..., 0] = matched[..., 0] * (1 - (1 - cls_weight) * has_patches) / batch  # lambda / B, or 1 / B
    return weights


def head_positions(num_heads: int) -> tuple[slice, ...]:
    """Token positions served by each last layer ("head" here): all of them with one shared head; CLS, then the
    patches, with a second last layer for the patches (``--patch_head separate`` or ``ibot``)."""
    if num_heads not in (1, 2):
        raise ValueError(f"one head (shared) or two (CLS and patches) are supported, got {num_heads}")
    return (slice(0, None),) if num_heads == 1 else (slice(0, 1), slice(1, None))


def logits_per_view(embeddings: torch.Tensor, weights: tuple[torch.Tensor, ...], tokens_per_view: list[int],
                    batch: int) -> list[list[torch.Tensor]]:
    """The heads' last layers on every token of the flat layout ``[sum_v B * T_v, d]``.

    Returns per view a list with one ``[B, T_v^h, K_h]`` per head (``head_positions``): ``[B, T_v, K]`` for a
    shared head; ``[B, 1, K]`` and ``[B, T_v - 1, K_patch]`` with a last layer of its own for the patches.
    """
    sizes = [batch * t for t in tokens_per_view]
    if len(weights) == 1:
        logits = nn.functional.linear(embeddings, weights[0])
        return [[view.view(batch, tokens, -1)] for view, tokens in zip(logits.split(sizes), tokens_per_view)]
    positions = head_positions(len(weights))
    return [[nn.functional.linear(view.view(batch, tokens, -1)[:, where], weight)
             for where, weight in zip(positions, weights)]
            for view, tokens in zip(embeddings.split(sizes), tokens_per_view)]


def match_within_head(match: torch.Tensor, where: slice) -> torch.Tensor:
    """A view pair's match ``[B, T_v]`` restricted to one head's positions, re-indexed within them (-1 stays)."""
    part = match[:, where]
    if where.start == 0:
        return part
    return torch.where(part >= 0, part - where.start, -1)


class PatchWiseDINOLoss(nn.Module):
    """The PW-Self objective (docs/method.md section 4) with one center per teacher token position.

    ``forward`` computes it fused with the head's last layer (``fused_loss.py``: chunked, from the
    embeddings of matched tokens); ``reference`` computes the same from full per-view logits, the
    straightforward way. Both return the same loss, gradients and statistics.

    With a shared head (the default) the center is ``[1 + N, K]`` (``center``). With a last layer of its own
    for the patches (``patch_out_dim`` set) CLS tokens keep DINO's ``center [1, K]`` and patch tokens get
    ``patch_center``: one per position, ``[N, K_patch]`` (``--patch_head separate``), or with
    ``one_patch_center`` a single ``[1, K_patch]``, the EMA of the mean over samples, views and positions
    (``--patch_head ibot``, iBOT's ``center2``). Since every pair's weight in the loss is fixed beforehand, the
    loss is the sum of the CLS pairs' and the patch pairs' weighted cross-entropies, each through its head.

    Args:
        out_dim: number of prototypes ``K`` (of the CLS head when the patch head is separate).
        num_positions: teacher tokens per global view (``1 + P_global^2``; 1 for DINO's CLS loss).
        teacher_temps: teacher temperature per epoch.
        student_temp: student temperature (of every head, as in iBOT).
        center_momentum: EMA momentum of the center.
        cls_weight: ``None`` for the token mean over matched pairs; else the CLS weight lambda.
        chunk_elements: logits per chunk of the fused computation (its memory, 4 bytes each).
        compile: ``torch.compile`` the fused computation's per-chunk softmax kernels.
        patch_out_dim: ``K_patch`` of the patches' own last layer; ``None``: one head for every token.
        one_patch_center: one patch center ``[1, K_patch]`` for all positions instead of one per position.
        patch_teacher_temps: the patches' own teacher temperature per epoch; ``None``: ``teacher_temps``.
    """

    def __init__(self, out_dim: int, num_positions: int, teacher_temps: np.ndarray, student_temp: float = 0.1,
                 center_momentum: float = 0.9, cls_weight: float | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, compile: bool = False,
                 patch_out_dim: int | None = None, one_patch_center: bool = False,
                 patch_teacher_temps: np.ndarray | None = None):
        super().__init__()
        self.student_temp, self.center_momentum, self.cls_weight = student_temp, center_momentum, cls_weight
        self.teacher_temps, self.chunk_elements, self.compile = teacher_temps, chunk_elements, compile
        self.num_positions, self.patch_teacher_temps = num_positions, patch_teacher_temps
        if patch_out_dim is not None and num_positions < 2:
            raise ValueError("a last layer of the patches' own needs patch tokens (--patch_loss true)")
        if patch_out_dim is None and (one_patch_center or patch_teacher_temps is not None):
            raise ValueError("a patch center or temperature of the patches' own needs their own last layer "
                             "(patch_out_dim)")
        cls_positions = num_positions if patch_out_dim is None else 1
        self.register_buffer("center", torch.zeros(cls_positions, out_dim))
        patch_positions = 1 if one_patch_center else num_positions - 1
        self.register_buffer("patch_center",  # None (not in the state dict) with a shared head
                             None if patch_out_dim is None else torch.zeros(patch_positions, patch_out_dim))
        self.piggyback: torch.Tensor | None = None  # see _sum_over_processes

    @property
    def centers(self) -> tuple[torch.Tensor, ...]:
        """One center per head, in ``head_positions`` order."""
        return (self.center,) if self.patch_center is None else (self.center, self.patch_center)

    def teacher_temperatures(self, epoch: int) -> tuple[float, ...]:
        """The teacher temperature of each head at ``epoch``, in ``head_positions`` order: the patches' own
        schedule when there is one (``--patch_head ibot``), else the CLS schedule for every head."""
        cls_temp = float(self.teacher_temps[epoch])
        if self.patch_center is None:
            return (cls_temp,)
        return cls_temp, (cls_temp if self.patch_teacher_temps is None else float(self.patch_teacher_temps[epoch]))

    def forward(self, student_z: torch.Tensor, student_weights: tuple[torch.Tensor, ...], teacher_z: torch.Tensor,
                teacher_weights: tuple[torch.Tensor, ...], pairs: MatchedPairs, epoch: int,
                compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
        """Loss over all view pairs from head embeddings, then a center update.

        Args:
            student_z: ``[N, d]`` embeddings of the student rows ``pairs.rows``.
            student_weights: the student's last-layer weight per head, ``[K_h, d]``.
            teacher_z: ``[G * B * T_g, d]`` embeddings of every teacher token (no gradient).
            teacher_weights: the teacher's last-layer weight per head.
            pairs: from ``matched_pairs``.
            epoch: selects the teacher temperatures.
            compute_dtype: dtype of the matmuls (the autocast dtype); ``None``: the embeddings'.

        Returns:
            the scalar loss and the statistics of ``reference``.
        """
        tokens = pairs.tokens_per_view[0]
        self._check_positions(tokens, [weight.shape[0] for weight in teacher_weights])
        teacher_z = teacher_z.view(-1, tokens, teacher_z.shape[-1])
        temperatures = self.teacher_temperatures(epoch)
        config = FusedConfig(self.student_temp, temperatures[0], compute_dtype, self.chunk_elements, self.compile)
        if len(self.centers) == 1:
            loss, cross_entropy, entropy = matched_cross_entropy(student_z, student_weights[0], teacher_z,
                                                                 teacher_weights[0], self.center, pairs.partners,
                                                                 pairs.weights, config)
        else:
            loss, cross_entropy, entropy = self._fused_per_head(student_z, student_weights, teacher_z,
                                                                teacher_weights, pairs, config, temperatures)
        stats = self._pair_statistics(cross_entropy, pairs, entropy / teacher_z.shape[:2].numel())
        self.update_center_from_embeddings(teacher_z, teacher_weights)
        return loss, stats

    def _fused_per_head(self, student_z, student_weights, teacher_z, teacher_weights, pairs: MatchedPairs,
                        config: FusedConfig, temperatures: tuple[float, ...]):
        """``matched_cross_entropy`` for the CLS pairs through the CLS head and for the patch pairs through the
        patch head, each against its own center and at its own teacher temperature; the losses and entropies
        add, the CEs ``[N, G]`` interleave."""
        tokens = teacher_z.shape[1]
        sequence, position = pairs.partners.div(tokens, rounding_mode="floor"), pairs.partners.remainder(tokens)
        loss, entropy, cross_entropy = 0.0, 0.0, None
        for where, center, student_w, teacher_w, temperature in zip(head_positions(2), self.centers, student_weights,
                                                                     teacher_weights, temperatures):
            rows = pairs.is_cls if where.start == 0 else ~pairs.is_cls
            served = teacher_z[:, where].contiguous()  # [S, T_h, d]: the teacher tokens this head serves
            partners = torch.where(pairs.partners >= 0, sequence * served.shape[1] + position - where.start, -1)[rows]
            head_loss, head_ce, head_entropy = matched_cross_entropy(
                student_z[rows], student_w, served, teacher_w, center, partners, pairs.weights[rows],
                replace(config, teacher_temp=temperature))
            if cross_entropy is None:
                cross_entropy = head_ce.new_zeros(pairs.partners.shape)
            cross_entropy[rows] = head_ce
            loss, entropy = loss + head_loss, entropy + head_entropy
        return loss, cross_entropy, entropy

    def reference(self, student_logits: list[list[torch.Tensor]], teacher_logits: list[list[torch.Tensor]],
                  matches: dict[tuple[int, int], torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict]:
        """The loss from full logits, then a center update: the straightforward computation.

        Args:
            student_logits: per view, per head ``[B, T_v^h, K_h]`` (``logits_per_view``).
            teacher_logits: per global view, per head ``[B, T_g^h, K_h]`` (no gradient).
            matches: ``{(g, v): [B, T_v]}`` teacher token per student token, -1 if unmatched.
            epoch: selects the teacher temperatures.

        Returns:
            the scalar loss and detached statistics (``loss_cls``, ``loss_patch``,
            ``matched_patches`` per view pair and sample, ``teacher_entropy``).
        """
        teacher_probs, teacher_entropy = self.teacher_distributions(teacher_logits, self.teacher_temperatures(epoch))
        positions = head_positions(len(self.centers))
        pair_losses, cls_means, patch_sums, patch_counts = [], [], [], []
        for (g, v), match in matches.items():
            ce = torch.cat([MatchedCrossEntropy.apply(student, teacher, match_within_head(match, where),
                                                      self.student_temp)
                            for student, teacher, where in zip(student_logits[v], teacher_probs[g], positions)], 1)
            patch_mask = (match[:, 1:] >= 0).to(ce.dtype)
            cls_means.append(ce[:, 0].mean())
            patch_sums.append((ce[:, 1:] * patch_mask).sum())
            patch_counts.append(patch_mask.sum())
            pair_losses.append(self.pair_loss(ce[:, 0], patch_sums[-1], patch_counts[-1]))
        loss = torch.stack(pair_losses).mean()
        stats = self._statistics(cls_means, patch_sums, patch_counts, teacher_entropy, len(student_logits[0][0]))
        self.update_center(teacher_logits)
        return loss, stats

    def pair_loss(self, cls_ce: torch.Tensor, patch_sum: torch.Tensor, patch_count: torch.Tensor) -> torch.Tensor:
        """Loss of one view pair from its CLS cross-entropies ``[B]`` and its patch sum and count."""
        if self.cls_weight is None:
            return (cls_ce.sum() + patch_sum) / (cls_ce.numel() + patch_count)
        weighted = self.cls_weight * cls_ce.mean() + (1 - self.cls_weight) * patch_sum / patch_count.clamp(min=1)
        return torch.where(patch_count > 0, weighted, cls_ce.mean())  # no patch pairs: CLS term alone

    @torch.no_grad()
    def teacher_distributions(self, teacher_logits: list[list[torch.Tensor]], temperatures: tuple[float, ...]):
        """Centered, sharpened teacher probabilities per global view and head ``[B, T_g^h, K_h]`` (head ``h`` at
        ``temperatures[h]``; a one-row center ``[1, K_h]`` is subtracted at every position), and their mean
        entropy over tokens."""
        probs, entropies = [], []
        for per_head in teacher_logits:
            self._check_positions(sum(logits.shape[1] for logits in per_head), [logits.shape[2] for logits in per_head])
            log_probs = [torch.log_softmax((logits.to(_loss_dtype(logits)) - center) / temperature, dim=-1)
                         for logits, center, temperature in zip(per_head, self.centers, temperatures)]
            probs.append([log_p.exp() for log_p in log_probs])
            entropies.append(torch.cat([-(p * log_p).sum(-1) for p, log_p in zip(probs[-1], log_probs)], 1).mean())
        return probs, torch.stack(entropies).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: list[list[torch.Tensor]]) -> None:
        """``C <- m C + (1 - m) * mean over samples and global views`` per position (over the positions too for
        a one-row center serving several), over all processes."""
        batch_sums, per_row = self._pool_positions(
            [torch.stack([per_head[h].sum(0, dtype=center.dtype) for per_head in teacher_logits]).sum(0)
             for h, center in enumerate(self.centers)])
        self._sum_over_processes(batch_sums)
        count = sum(len(per_head[0]) for per_head in teacher_logits) * utils.get_world_size()
        for center, batch_sum, positions in zip(self.centers, batch_sums, per_row):
            center.mul_(self.center_momentum).add_(batch_sum / (count * positions), alpha=1 - self.center_momentum)

    @torch.no_grad()
    def update_center_from_embeddings(self, teacher_z: torch.Tensor, teacher_weights: tuple[torch.Tensor, ...]) -> None:
        """``update_center`` from embeddings ``[S, T_g, d]``: the last layer is linear, so the logits' mean
        is ``mean(z) W^T``; only ``[T_g, d]`` is summed over processes instead of ``[T_g, K]``."""
        positions = head_positions(len(self.centers))
        batch_sums, per_row = self._pool_positions([teacher_z[:, where].sum(0, dtype=self.center.dtype)
                                                    for where in positions])
        self._sum_over_processes(batch_sums)
        for center, batch_sum, weight, positions in zip(self.centers, batch_sums, teacher_weights, per_row):
            mean_logits = batch_sum / (len(teacher_z) * utils.get_world_size() * positions) @ weight.to(center.dtype).T
            center.mul_(self.center_momentum).add_(mean_logits, alpha=1 - self.center_momentum)

    def _pool_positions(self, position_sums: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """Each head's sums per position ``[T_h, *]`` -> the sums its center's rows average, and how many positions
        each row pools: a one-row center serving several positions (``one_patch_center``) pools them all, ``[1, *]``."""
        pooled = [len(center) == 1 and len(total) > 1 for total, center in zip(position_sums, self.centers)]
        return ([total.sum(0, keepdim=True) if pool else total for total, pool in zip(position_sums, pooled)],
                [len(total) if pool else 1 for total, pool in zip(position_sums, pooled)])

    def _sum_over_processes(self, batch_sums: list[torch.Tensor]) -> None:
        """All-reduce every tensor of ``batch_sums`` in place, in one collective. ``piggyback``, when set, rides
        in the same collective and is replaced by its sum: values the trainer needs summed over processes at
        every step (a vote to stop) then cost no collective of their own."""
        if not utils.is_distributed():
            return
        extra = [] if self.piggyback is None else [self.piggyback.to(batch_sums[0].dtype)]
        packed = utils.all_reduce_sum(torch.cat([batch_sum.flatten() for batch_sum in batch_sums] + extra))
        sizes = [batch_sum.numel() for batch_sum in batch_sums]
        *summed, piggyback = packed.split(sizes + [len(packed) - sum(sizes)])
        for batch_sum, total in zip(batch_sums, summed):
            batch_sum.copy_(total.view_as(batch_sum))
        if self.piggyback is not None:
            self.piggyback = piggyback

    def _check_positions(self, tokens: int, out_dims: list[int]) -> None:
        expected = (self.num_positions, [center.shape[1] for center in self.centers])
        if (tokens, out_dims) != expected:
            raise ValueError(f"teacher logits have {tokens} tokens per sample and {out_dims} prototypes per head, "
                             f"but the loss expects {expected[0]} and {expected[1]}: the global crop size, patch "
                             "size, out_dim, patch_out_dim or patch head changed")

    @staticmethod
    @torch.no_grad()
    def _statistics(cls_means, patch_sums, patch_counts, teacher_entropy, batch_size) -> dict[str, torch.Tensor]:
        patch_total = torch.stack(patch_counts).sum()
        return {
            "loss_cls": torch.stack(cls_means).mean().detach(),
            "loss_patch": (torch.stack(patch_sums).sum() / patch_total.clamp(min=1)).detach(),
            "matched_patches": patch_total / (len(patch_counts) * batch_size),
            "teacher_entropy": teacher_entropy,
        }

    @staticmethod
    @torch.no_grad()
    def _pair_statistics(cross_entropy: torch.Tensor, pairs: MatchedPairs, teacher_entropy: torch.Tensor) -> dict:
        """``_statistics`` from the fused path's cross-entropies ``[N, G]``."""
        matched = pairs.partners >= 0
        cls, patch = matched & pairs.is_cls[:, None], matched & ~pairs.is_cls[:, None]
        patch_total = patch.sum().to(cross_entropy.dtype)
        pairs_and_samples = pairs.num_pairs * pairs.batch_size
        return {
            "loss_cls": (cross_entropy * cls).sum() / pairs_and_samples,
            "loss_patch": (cross_entropy * patch).sum() / patch_total.clamp(min=1),
            "matched_patches": patch_total / pairs_and_samples,
            "teacher_entropy": teacher_entropy,
        }


class MatchedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of every student token against the teacher token it is matched to.

    ``CE[b, j] = -sum_k P[b, m(b, j), k] log softmax(s[b, j] / tau)_k
               = logsumexp(s[b, j] / tau) - sum_k P[b, m(b, j), k] s[b, j, k] / tau``  (P sums to 1).

    Memory: nothing of size ``[B, T, K]`` is kept for the backward pass beyond the student logits
    and the teacher probabilities that exist anyway (shared by all view pairs); the float32
    softmax and the gathered teacher rows are rebuilt transiently in ``backward``.

    Inputs: student logits ``[B, T_v, K]`` (any float dtype), teacher probabilities ``[B, T_g, K]``,
    match ``[B, T_v]`` (-1 entries give values the caller must mask out), the student temperature.
    Output: ``[B, T_v]`` in float32 (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, match, student_temp: float):
        scaled = student_logits.to(_loss_dtype(student_logits)) / student_temp
        log_norm = torch.logsumexp(scaled, dim=-1)
        cross_entropy = log_norm - torch.linalg.vecdot(gather_tokens(teacher_probs, match), scaled)
        ctx.save_for_backward(student_logits, teacher_probs, match, log_norm)
        ctx.student_temp = student_temp
        return cross_entropy

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, teacher_probs, match, log_norm = ctx.saved_tensors
        scaled = student_logits.to(_loss_dtype(student_logits)) / ctx.student_temp
        grad = scaled.sub_(log_norm[..., None]).exp_()  # the student softmax, in place
        grad.sub_(gather_tokens(teacher_probs, match)).mul_(grad_output[..., None] / ctx.student_temp)
        return grad.to(student_logits.dtype), None, None, None


def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits, float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, j]]`` for every ``b, j``: ``[B, T, K]`` and ``[B, J]`` -> ``[B, J, K]`` (-1 reads row 0)."""
    return torch.gather(tokens, 1, index.clamp(min=0)[..., None].expand(-1, -1, tokens.shape[-1]))
