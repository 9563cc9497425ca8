"""The fused, chunked loss (fused_loss.py) against the straightforward one, and the fused training step."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import TINY_ARGS, random_geometries
from patch_wise_dino import build_trainer, get_args_parser
from pwself_loss import PatchWiseDINOLoss, compute_matches, logits_per_view, matched_pairs

PATCH, GLOBAL, LOCAL, K, D = 8, 32, 16, 24, 6


def make_batch(seed, batch=3, num_locals=2, mode="upstream", patch_loss=True, dtype=torch.float64):
    """Geometry-derived matches and random head embeddings/weights for every token of every view."""
    generator = torch.Generator().manual_seed(seed)
    geometry = torch.stack([random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            *[random_geometries(generator, batch, LOCAL, (60, 70)) for _ in range(num_locals)]], dim=1)
    matches = compute_matches(geometry, PATCH, mode, patch_loss)
    rows = sum(len(m) * m.shape[1] for (g, v), m in matches.items() if g == (1 if v == 0 else 0))
    teacher_rows = 2 * batch * matches[(1, 0)].shape[1]
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)
    student_z, teacher_z = unit(rows, D).requires_grad_(), unit(teacher_rows, D)
    student_w = (2 * torch.randn(K, D, generator=generator, dtype=dtype)).requires_grad_()
    teacher_w = 2 * torch.randn(K, D, generator=generator, dtype=dtype)
    center = torch.randn(matches[(1, 0)].shape[1], K, generator=generator, dtype=dtype)
    return matches, student_z, student_w, teacher_z, teacher_w, center


def make_loss(center, cls_weight=None, chunk_elements=2 ** 20):
    loss_fn = PatchWiseDINOLoss(K, center.shape[0], np.array([0.04]), 0.1, cls_weight=cls_weight,
                                chunk_elements=chunk_elements).to(center.dtype)
    loss_fn.center.copy_(center)
    return loss_fn


def reference_run(matches, student_z, student_w, teacher_z, teacher_w, center, cls_weight):
    pairs = matched_pairs(matches, cls_weight)
    loss_fn = make_loss(center, cls_weight)
    student = logits_per_view(student_z, (student_w,), pairs.tokens_per_view, pairs.batch_size)
    teacher = logits_per_view(teacher_z, (teacher_w,), pairs.tokens_per_view[:2], pairs.batch_size)
    loss, stats = loss_fn.reference(student, teacher, matches, 0)
    return loss, torch.autograd.grad(loss, (student_z, student_w)), stats, loss_fn.center


def fused_run(matches, student_z, student_w, teacher_z, teacher_w, center, cls_weight, chunk_elements,
              compute_dtype=None):
    pairs = matched_pairs(matches, cls_weight)
    loss_fn = make_loss(center, cls_weight, chunk_elements)
    loss, stats = loss_fn(student_z[pairs.rows], (student_w,), teacher_z, (teacher_w,), pairs, 0, compute_dtype)
    return loss, torch.autograd.grad(loss, (student_z, student_w)), stats, loss_fn.center


@pytest.mark.parametrize("mode,cls_weight,chunk_elements", [
    ("upstream", None, 2 ** 20), ("upstream", None, 3 * K), ("upstream", 0.8, 5 * K), ("centre", None, 7 * K),
    ("centre", 1.0, 2 ** 20)])
def test_fused_equals_reference_in_float64(mode, cls_weight, chunk_elements):
    batch = make_batch(0, mode=mode)
    expected_loss, expected_grads, expected_stats, expected_center = reference_run(*batch, cls_weight)
    loss, grads, stats, center = fused_run(*batch, cls_weight, chunk_elements)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, expected_grads):  # unmatched student tokens get exactly zero in both
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for name, value in expected_stats.items():
        torch.testing.assert_close(stats[name].double(), value.double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(center, expected_center, rtol=1e-12, atol=1e-12)


def test_fused_skips_unmatched_tokens_and_handles_disjoint_views():
    matches, *rest = make_batch(1, batch=2, num_locals=2)
    matches[(0, 2)][:, 1:] = -1  # local view 2 shares no patch with either global view
    matches[(1, 2)][:, 1:] = -1
    pairs = matched_pairs(matches, None)
    assert len(pairs.rows) < sum(len(m) * m.shape[1] for (g, v), m in matches.items() if g == (1 if v == 0 else 0))
    assert pairs.is_cls.sum() == 2 * 4  # every CLS token of the 4 views is kept
    for cls_weight in (None, 0.9):
        expected = reference_run(matches, *rest, cls_weight)
        actual = fused_run(matches, *rest, cls_weight, 4 * K)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(actual[1][0], expected[1][0], rtol=1e-10, atol=1e-12)


def test_fused_cls_only_is_dinos_loss():
    batch = make_batch(2, batch=4, patch_loss=False)
    assert batch[0][(1, 0)].shape == (4, 1) and batch[5].shape == (1, K)
    expected_loss, expected_grads, _, _ = reference_run(*batch, None)
    loss, grads, _, _ = fused_run(*batch, None, 2 * K)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-10, atol=1e-12)


def test_fused_half_precision_matmuls_stay_close_and_keep_dtypes():
    matches, student_z, student_w, teacher_z, teacher_w, center = make_batch(3, dtype=torch.float32)
    expected_loss, expected_grads, _, _ = reference_run(matches, student_z, student_w, teacher_z, teacher_w,
                                                        center, None)
    loss, grads, _, _ = fused_run(matches, student_z, student_w, teacher_z, teacher_w, center, None, 4 * K,
                                  compute_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=0.1, atol=2e-2)


def test_wrong_center_shape_is_named():
    matches, student_z, student_w, teacher_z, teacher_w, center = make_batch(0)
    with pytest.raises(ValueError, match="global crop size, patch size, out_dim"):
        fused_run(matches, student_z, student_w, teacher_z, teacher_w, center[:3], None, 2 ** 20)


def synthetic_batch(batch, views, generator):
    images = [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)]
    images += [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(views - 2)]
    geometry = torch.stack([random_geometries(generator, batch, 16 if v < 2 else 8, (40, 40), min_side=6)
                            for v in range(views)], dim=1)
    return images, geometry


@pytest.mark.parametrize("extra", [[], ["--patch_loss", "false"], ["--cls_weight", "0.7", "--use_bn_in_head", "true"]])
def test_fused_training_step_equals_reference_step(tmp_path, extra):
    images, geometry = synthetic_batch(4, 4, torch.Generator().manual_seed(0))
    results = []
    for fused in ("true", "false"):
        args = get_args_parser().parse_args(TINY_ARGS + ["--data_path", str(tmp_path), "--fused_loss", fused,
                                                         "--freeze_last_layer", "0", "--drop_path_rate", "0"] + extra)
        trainer = build_trainer(args, torch.device("cpu"), DataLoader(range(8), batch_size=4))
        stats = [trainer.step(images, geometry, 0, iteration, iteration) for iteration in range(2)]
        grads = {name: p.grad for name, p in trainer.student.named_parameters() if p.grad is not None}
        results.append((stats, grads, trainer.loss_fn.center))
    (fused_stats, fused_grads, fused_center), (stats, grads, center) = results
    for ours, theirs in zip(fused_stats, stats):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
    assert fused_grads.keys() == grads.keys() and "head.last_layer.weight_v" in grads
    for name in grads:  # the second step's (clipped) gradients
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(fused_center, center, rtol=1e-5, atol=1e-6)
