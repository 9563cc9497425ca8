"""The PW-Self loss against a per-sample, per-pair re-computation of docs/method.md section 4."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_geometries
from patch_matching import match_patches
from pwself_loss import MatchedCrossEntropy, PatchWiseDINOLoss, compute_matches, view_pairs

PATCH, GLOBAL, LOCAL, K = 8, 32, 16, 12
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def make_inputs(seed, batch=3, num_locals=2, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    geometry = torch.stack([random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            *[random_geometries(generator, batch, LOCAL, (60, 70)) for _ in range(num_locals)]], dim=1)
    tokens = [1 + (GLOBAL // PATCH) ** 2] * 2 + [1 + (LOCAL // PATCH) ** 2] * num_locals
    student = [(scale * torch.randn(batch, t, K, generator=generator)).requires_grad_() for t in tokens]
    teacher = [scale * torch.randn(batch, tokens[0], K, generator=generator) for _ in range(2)]
    center = torch.randn(tokens[0], K, generator=generator)
    return geometry, student, teacher, center


def per_head(logits):
    """Per-view logits ``[B, T_v, K]`` in ``PatchWiseDINOLoss.reference``'s layout for one shared head."""
    return [[view] for view in logits]


def make_loss(center, cls_weight=None):
    loss_fn = PatchWiseDINOLoss(K, center.shape[0], np.array([TEACHER_TEMP]), STUDENT_TEMP, cls_weight=cls_weight)
    loss_fn.center.copy_(center)
    return loss_fn


def reference_loss(student, teacher, geometry, center, cls_weight=None):
    """docs/method.md section 4 written out: every sample, every view pair, every matched token pair."""
    pair_losses = []
    for g, v in view_pairs(len(student)):
        cls_terms, patch_terms = [], []
        for b in range(geometry.shape[0]):
            t_tokens, s_tokens = match_patches(geometry[b, g], geometry[b, v], PATCH)
            for i, j in zip(t_tokens, s_tokens):
                p = F.softmax((teacher[g][b, i] - center[i]) / TEACHER_TEMP, dim=-1)
                q = F.log_softmax(student[v][b, j] / STUDENT_TEMP, dim=-1)
                (cls_terms if j == 0 else patch_terms).append(-(p * q).sum())
        if cls_weight is None:
            pair_losses.append(torch.stack(cls_terms + patch_terms).mean())
        elif patch_terms:
            pair_losses.append(cls_weight * torch.stack(cls_terms).mean()
                               + (1 - cls_weight) * torch.stack(patch_terms).mean())
        else:
            pair_losses.append(torch.stack(cls_terms).mean())
    return torch.stack(pair_losses).mean()


@pytest.mark.parametrize("cls_weight", [None, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_match_reference(seed, cls_weight):
    geometry, student, teacher, center = make_inputs(seed)
    loss, stats = make_loss(center, cls_weight).reference(per_head(student), per_head(teacher), compute_matches(geometry, PATCH, "upstream", True), 0)
    grads = torch.autograd.grad(loss, student)
    expected = reference_loss(student, teacher, geometry, center, cls_weight)
    expected_grads = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-6)
    assert stats["matched_patches"] > 0 and torch.isfinite(stats["loss_patch"])


def test_view_pair_with_no_patch_pairs_uses_cls_only():
    geometry, student, teacher, center = make_inputs(5, batch=2, num_locals=1)
    # Make the local view disjoint from both global views in every sample.
    geometry[:, :2, :4] = torch.tensor([0.0, 0.0, 30.0, 30.0])
    geometry[:, 2, :4] = torch.tensor([40.0, 40.0, 10.0, 10.0])
    for cls_weight in (None, 0.9):
        loss, _ = make_loss(center, cls_weight).reference(per_head(student), per_head(teacher), compute_matches(geometry, PATCH, "upstream", True), 0)
        torch.testing.assert_close(loss, reference_loss(student, teacher, geometry, center, cls_weight))


def test_without_patch_loss_it_is_dinos_cls_loss():
    torch.manual_seed(0)
    batch, views = 4, 4
    student = [torch.randn(batch, K) * 3 for _ in range(views)]
    teacher = [torch.randn(batch, K) * 3 for _ in range(2)]
    center = torch.randn(1, K)
    # DINO's loss, written independently: teacher softmax with centering, mean over all (teacher, other view) terms.
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / TEACHER_TEMP, dim=-1)
        for v, s in enumerate(student):
            if v != iq:
                total += torch.sum(-q * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1).mean()
                terms += 1
    geometry = torch.zeros(batch, views, 6)
    matches = compute_matches(geometry, PATCH, "upstream", patch_loss=False)
    loss, _ = make_loss(center).reference(per_head([s[:, None] for s in student]), per_head([t[:, None] for t in teacher]), matches, 0)
    torch.testing.assert_close(loss, total / terms)


def test_center_update_per_position():
    geometry, student, teacher, center = make_inputs(2)
    loss_fn = make_loss(center)
    loss_fn.reference(per_head(student), per_head(teacher), compute_matches(geometry, PATCH, "upstream", True), 0)
    expected = 0.9 * center + 0.1 * torch.cat(teacher).mean(0)
    torch.testing.assert_close(loss_fn.center, expected)
    assert "center" in loss_fn.state_dict() and loss_fn.state_dict()["center"].shape == (1 + 16, K)


def test_centre_matching_and_statistics():
    geometry, student, teacher, center = make_inputs(3)
    matches = compute_matches(geometry, PATCH, "centre", True)
    assert set(matches) == set(view_pairs(4)) and len(matches) == 6
    assert matches[(0, 2)].shape == (3, 1 + 4) and matches[(1, 0)].shape == (3, 1 + 16)
    _, stats = make_loss(center).reference(per_head(student), per_head(teacher), matches, 0)
    counted = sum((m[:, 1:] >= 0).sum().item() for m in matches.values())
    assert stats["matched_patches"].item() == pytest.approx(counted / (6 * 3))
    assert 0 < stats["teacher_entropy"].item() < np.log(K)


def test_wrong_teacher_shape_is_named():
    geometry, student, teacher, center = make_inputs(0)
    loss_fn = make_loss(center[:5])
    with pytest.raises(ValueError, match="global crop size, patch size, out_dim"):
        loss_fn.reference(per_head(student), per_head(teacher), compute_matches(geometry, PATCH, "upstream", True), 0)


def test_matched_cross_entropy_gradcheck():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, dtype=torch.float64, generator=generator).requires_grad_()
    teacher_probs = torch.softmax(torch.randn(2, 4, 7, dtype=torch.float64, generator=generator), dim=-1)
    match = torch.tensor([[0, 3, -1, 1, 1], [0, -1, 2, 2, 0]])
    assert torch.autograd.gradcheck(lambda s: MatchedCrossEntropy.apply(s, teacher_probs, match, 0.1), (student,))
    expected = -(teacher_probs.gather(1, match.clamp(min=0)[..., None].expand(-1, -1, 7))
                 * torch.log_softmax(student / 0.1, dim=-1)).sum(-1)
    torch.testing.assert_close(MatchedCrossEntropy.apply(student, teacher_probs, match, 0.1), expected)


def test_matched_cross_entropy_keeps_half_precision_gradients():
    student = torch.randn(2, 3, 8).bfloat16().requires_grad_()
    teacher_probs = torch.softmax(torch.randn(2, 3, 8), dim=-1)
    ce = MatchedCrossEntropy.apply(student, teacher_probs, torch.tensor([[0, 1, 2], [0, 2, -1]]), 0.1)
    assert ce.dtype == torch.float32
    ce.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()
