"""``--patch_head ibot``: iBOT's head layout (one MLP for every token, a second last layer for the patches), one
patch center for all positions and the patches' own teacher-temperature schedule; in the loss (both paths), in
training and resuming, and in the evaluations' backbone loader."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import eval_knn
import export_backbone
import patch_wise_dino
import utils
import vision_transformer as vits
from conftest import TINY_ARGS, TINY_BACKBONE_ARGS, write_images
from patch_matching import match_patches
from pwself_loss import PatchWiseDINOLoss, view_pairs
from test_bench import TINY as BENCH_TINY
from test_fused_loss import synthetic_batch
from test_method_options import (D, K, K_PATCH, PATCH, STUDENT_TEMP, TEACHER_TEMP, assert_both_paths_give,
                                 make_batch)
from test_reliability import Crash, crash_at_epoch_1_iteration_2

PATCH_TEMP = 0.07  # the patches' teacher temperature in the loss tests (the CLS one is TEACHER_TEMP, 0.04)
IBOT = ["--patch_head", "ibot", "--patch_out_dim", "48"]


def parse(data, output, *extra: str):
    return patch_wise_dino.get_args_parser().parse_args(
        TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


def head_shapes(model) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters outside the backbone."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if not name.startswith("backbone.")}


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------
def test_ibot_head_shares_the_mlp_and_has_two_last_layers(tmp_path):
    student, teacher = patch_wise_dino.build_student_teacher(parse(tmp_path, tmp_path / "run", *IBOT))
    shared, _ = patch_wise_dino.build_student_teacher(parse(tmp_path, tmp_path / "run"))
    # Exactly the shared head's parameters (one MLP, DINO's last layer) plus a second last layer of 48 prototypes.
    assert head_shapes(student) == {**head_shapes(shared), "head.last_layer2.weight_g": (48, 1),
                                    "head.last_layer2.weight_v": (48, 32)}
    assert len([name for name in head_shapes(student) if name.endswith(".mlp.0.weight")]) == 1
    assert [name for name in head_shapes(student) if "last_layer" in name] == [
        "head.last_layer.weight_v", "head.last_layer.weight_g",
        "head.last_layer2.weight_v", "head.last_layer2.weight_g"]
    assert student.patch_head is None and [layer.weight.shape for layer in student.last_layers] == [(64, 32), (48, 32)]
    assert not any(layer.weight_g.requires_grad for layer in student.last_layers)  # --norm_last_layer true: both
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))

    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    embeddings, weights = teacher(views)
    tokens = teacher.backbone.forward_features(torch.cat(views[:2])).flatten(0, 1)  # CLS and patches alike
    torch.testing.assert_close(embeddings[:len(tokens)], teacher.head.embed(tokens))
    assert [w.shape for w in weights] == [(64, 32), (48, 32)]

    loss_fn = patch_wise_dino.build_loss(parse(tmp_path, tmp_path / "run", *IBOT))
    assert {name: tuple(b.shape) for name, b in loss_fn.state_dict().items()} == {"center": (1, 64),
                                                                                   "patch_center": (1, 48)}


def test_ibot_last_layers_are_both_frozen_early_and_both_follow_the_teacher_ema(tmp_path):
    student, teacher = patch_wise_dino.build_student_teacher(
        parse(tmp_path, tmp_path / "run", *IBOT, "--norm_last_layer", "false"))
    assert all(layer.weight_g.requires_grad for layer in student.last_layers)  # --norm_last_layer false: both free
    embeddings, weights = student([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)])
    (embeddings.sum() + sum(w.square().sum() for w in weights)).backward()
    utils.cancel_gradients_last_layer(0, student, freeze_last_layer=1)
    assert all(p.grad is None for name, p in student.named_parameters() if "last_layer" in name)
    assert student.head.mlp[0].weight.grad is not None

    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    before = teacher.head.last_layer2.weight_v.clone()
    utils.ema_update(teacher, student, 0.5)
    expected = 0.5 * before + 0.5 * student.head.last_layer2.weight_v
    torch.testing.assert_close(teacher.head.last_layer2.weight_v, expected)


def test_ibot_patch_temperature_warms_up_on_its_own_schedule(tmp_path):
    schedule = ["--epochs", "5", "--warmup_teacher_temp_epochs", "3", "--teacher_temp", "0.06"]
    ibot = patch_wise_dino.build_loss(parse(tmp_path, tmp_path / "run", *IBOT, *schedule))
    temperatures = np.array([ibot.teacher_temperatures(epoch) for epoch in range(5)])
    np.testing.assert_allclose(temperatures[:, 1], [0.04, 0.055, 0.07, 0.07, 0.07])  # iBOT's 0.04 -> 0.07
    np.testing.assert_allclose(temperatures[:, 0], [0.04, 0.05, 0.06, 0.06, 0.06])  # CLS: its own flags
    shared = patch_wise_dino.build_loss(parse(tmp_path, tmp_path / "run", *schedule))
    assert [shared.teacher_temperatures(epoch) for epoch in range(5)] == [(t,) for t in temperatures[:, 0]]
    separate = patch_wise_dino.build_loss(parse(tmp_path, tmp_path / "run", "--patch_head", "separate", *schedule))
    assert [separate.teacher_temperatures(epoch) for epoch in range(5)] == [(t, t) for t in temperatures[:, 0]]


# ----------------------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------------------
def make_ibot_loss(centers, cls_weight=None, chunk_elements=2 ** 20, positions=1 + (32 // PATCH) ** 2):
    loss_fn = PatchWiseDINOLoss(K, positions, np.array([TEACHER_TEMP]), STUDENT_TEMP, cls_weight=cls_weight,
                                chunk_elements=chunk_elements, patch_out_dim=K_PATCH, one_patch_center=True,
                                patch_teacher_temps=np.array([PATCH_TEMP])).double()
    loss_fn.center.copy_(centers[0])
    loss_fn.patch_center.copy_(centers[1])
    return loss_fn


def per_token_ibot_loss(geometry, tokens, student_z, student_w, teacher_z, teacher_w, centers, cls_weight):
    """docs/method.md section 4 token by token: CLS through the CLS last layer, center and temperature; every patch
    through the patch last layer, the one patch center and the patch temperature."""
    batch = geometry.shape[0]
    student_views = student_z.split([batch * t for t in tokens])
    teacher_views = teacher_z.view(2, batch, tokens[0], D)
    pair_losses = []
    for g, v in view_pairs(len(tokens)):
        terms = {True: [], False: []}
        for b in range(batch):
            for i, j in zip(*match_patches(geometry[b, g], geometry[b, v], PATCH)):
                head, temperature = (0, TEACHER_TEMP) if j == 0 else (1, PATCH_TEMP)
                p = F.softmax((teacher_views[g, b, i] @ teacher_w[head].T - centers[head][0]) / temperature, dim=-1)
                q = F.log_softmax(student_views[v][b * tokens[v] + j] @ student_w[head].T / STUDENT_TEMP, dim=-1)
                terms[j == 0].append(-(p * q).sum())
        if cls_weight is None:
            pair_losses.append(torch.stack(terms[True] + terms[False]).mean())
        else:
            pair_losses.append(cls_weight * torch.stack(terms[True]).mean()
                               + (1 - cls_weight) * torch.stack(terms[False]).mean())
    return torch.stack(pair_losses).mean()


def ibot_batch(seed):
    """``make_batch``'s tokens and weights, with one patch center ``[1, K_patch]``."""
    geometry, matches, tokens, student_z, student_w, teacher_z, teacher_w, centers = make_batch(seed)
    centers = (centers[0], torch.randn(1, K_PATCH, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return geometry, matches, tokens, student_z, student_w, teacher_z, teacher_w, centers


@pytest.mark.parametrize("cls_weight", [None, 0.7])
def test_ibot_loss_of_both_paths_matches_a_token_by_token_computation(cls_weight):
    batch = ibot_batch(0)
    geometry, _, tokens, student_z, student_w, teacher_z, teacher_w, centers = batch
    expected = per_token_ibot_loss(geometry, tokens, student_z, student_w, teacher_z, teacher_w, centers, cls_weight)
    assert_both_paths_give(expected, make_ibot_loss(centers, cls_weight), make_ibot_loss(centers, cls_weight, 3 * K),
                           batch, cls_weight)


def test_ibot_patch_center_is_the_ema_of_the_mean_over_batch_views_and_positions():
    generator = torch.Generator().manual_seed(3)
    batch, positions = 2, 1 + 4
    centers = (torch.randn(1, K, generator=generator, dtype=torch.float64),
               torch.randn(1, K_PATCH, generator=generator, dtype=torch.float64))
    teacher_logits = [[torch.randn(batch, 1, K, generator=generator, dtype=torch.float64),
                       torch.randn(batch, positions - 1, K_PATCH, generator=generator, dtype=torch.float64)]
                      for _ in range(2)]  # per global view: CLS [B, 1, K], patches [B, N, K_patch]
    loss_fn = make_ibot_loss(centers, positions=positions)
    loss_fn.update_center(teacher_logits)
    # iBOT's update_center: the patch logits of both views [2B, N, K_patch], their mean over positions summed over
    # samples, divided by the number of samples.
    patches = torch.cat([view[1] for view in teacher_logits])
    patch_mean = patches.mean(1).sum(0, keepdim=True) / len(patches)
    torch.testing.assert_close(loss_fn.patch_center, 0.9 * centers[1] + 0.1 * patch_mean)
    cls_mean = torch.cat([view[0] for view in teacher_logits]).mean(0)
    torch.testing.assert_close(loss_fn.center, 0.9 * centers[0] + 0.1 * cls_mean)

    # The fused path's update from embeddings gives the same: the last layer is linear.
    teacher_z = F.normalize(torch.randn(2 * batch, positions, D, generator=generator, dtype=torch.float64), dim=-1)
    weights = (torch.randn(K, D, generator=generator, dtype=torch.float64),
               torch.randn(K_PATCH, D, generator=generator, dtype=torch.float64))
    from_logits, from_embeddings = make_ibot_loss(centers, positions=positions), make_ibot_loss(centers,
                                                                                               positions=positions)
    from_logits.update_center([[z[:, :1] @ weights[0].T, z[:, 1:] @ weights[1].T] for z in teacher_z.split(batch)])
    from_embeddings.update_center_from_embeddings(teacher_z, weights)
    for ours, theirs in zip(from_embeddings.centers, from_logits.centers):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_ibot_loss_needs_the_patches_own_last_layer():
    with pytest.raises(ValueError, match="needs their own last layer"):
        PatchWiseDINOLoss(K, 17, np.array([TEACHER_TEMP]), one_patch_center=True)


# ----------------------------------------------------------------------------------------------
# Training, resuming, evaluating.
# ----------------------------------------------------------------------------------------------
def test_ibot_head_trains_resumes_exactly_and_loads_in_evaluations(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data" / "train", classes=("x", "y"), per_class=6, seed=4)
    run = ["--epochs", "2", "--save_every_iters", "1", "--warmup_teacher_temp_epochs", "1", *IBOT]
    uninterrupted = patch_wise_dino.main(parse(data, tmp_path / "a", *run))
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        patch_wise_dino.main(parse(data, tmp_path / "b", *run))
    monkeypatch.undo()
    resumed = patch_wise_dino.main(parse(data, tmp_path / "b", *run))
    for ours, theirs in ((resumed.student, uninterrupted.student), (resumed.teacher, uninterrupted.teacher),
                         (resumed.loss_fn, uninterrupted.loss_fn)):
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert (tmp_path / "b" / "log.txt").read_text() == (tmp_path / "a" / "log.txt").read_text()
    log = [json.loads(line) for line in (tmp_path / "a" / "log.txt").read_text().splitlines()]
    assert [line["teacher_patch_temp"] for line in log] == pytest.approx([0.04, 0.07])
    assert [line["teacher_temp"] for line in log] == pytest.approx([0.04, 0.04])

    checkpoint = utils.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    teacher = checkpoint["teacher"]
    assert teacher["head.last_layer.weight_v"].shape == (64, 32)  # DINO's keys and shapes for the CLS head
    assert teacher["head.last_layer2.weight_v"].shape == (48, 32)  # iBOT's key for the patches' last layer
    assert {key.split(".")[0] for key in teacher} == {"backbone", "head"}
    assert {key: tuple(value.shape) for key, value in checkpoint["dino_loss"].items()} == {"center": (1, 64),
                                                                                          "patch_center": (1, 48)}
    for key in ("teacher", "student"):  # what every evaluation loads (vision_transformer.load_pretrained_weights)
        assert not any(name.startswith("head") for name in vits.backbone_state_dict(checkpoint, key))

    knn = eval_knn.main(eval_knn.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--data_path", str(data.parent), "--pretrained_weights",
                              str(tmp_path / "a" / "checkpoint.pth"), "--resize_size", "16", "--crop_size", "16",
                              "--num_workers", "0", "--device", "cpu", "--nb_knn", "3", "--val_split", "train"]))
    assert 0 <= knn[3]["top1"] <= 100
    export_backbone.main(export_backbone.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--pretrained_weights", str(tmp_path / "a" / "checkpoint.pth"), "--format", "dino",
                              "--output", str(tmp_path / "backbone.pth")]))
    assert not any("head" in key for key in torch.load(tmp_path / "backbone.pth", weights_only=True))


def test_checkpoints_without_the_patch_temperatures_resume_and_changes_are_named(tmp_path):
    args = parse(tmp_path, tmp_path / "run")
    saved = {name: value for name, value in vars(args).items()
             if name not in ("warmup_teacher_patch_temp", "teacher_patch_temp")}  # written before these existed
    assert patch_wise_dino.resume_differences({"args": saved}, args, {}) == []
    changed = parse(tmp_path, tmp_path / "run", "--teacher_patch_temp", "0.06")
    assert patch_wise_dino.resume_differences({"args": vars(args)}, changed, {}) == [
        "--teacher_patch_temp: checkpoint 0.07, now 0.06"]


@pytest.mark.parametrize("extra,message", [
    (["--patch_head", "ibot", "--patch_loss", "false"],
     "--patch_head ibot needs --patch_loss true (without the patch loss there are no patch tokens for it): set "
     "--patch_loss true, or --patch_head shared for DINO's loss"),
    (["--patch_head", "ibot", "--teacher_patch_temp", "0", "--warmup_teacher_patch_temp", "-1"],
     "teacher temperatures must be positive: --warmup_teacher_patch_temp -1.0, --teacher_patch_temp 0.0")])
def test_bad_ibot_arguments_are_named(tmp_path, extra, message):
    data = write_images(tmp_path / "data", per_class=2)
    with pytest.raises(ValueError) as error:
        patch_wise_dino.main(parse(data, tmp_path / "run", *extra))
    assert message in str(error.value)


def test_bench_takes_the_ibot_head():
    args = bench.get_args_parser().parse_args(BENCH_TINY + ["--patch_head", "shared", "ibot"])
    variants = bench.step_variants(args)
    assert [variant["patch_head"] for variant in variants] == ["shared", "ibot"]
    assert bench.training_args(args, variants[1]).patch_head == "ibot"


def test_ibot_training_step_of_both_loss_paths_agrees(tmp_path):
    images, geometry = synthetic_batch(4, 4, torch.Generator().manual_seed(0))
    results = []
    for fused in ("true", "false"):
        args = parse(tmp_path, tmp_path / "run", *IBOT, "--fused_loss", fused, "--freeze_last_layer", "0",
                     "--drop_path_rate", "0", "--teacher_patch_temp", "0.05")
        trainer = patch_wise_dino.build_trainer(args, torch.device("cpu"), torch.utils.data.DataLoader(range(8), 4))
        stats = [trainer.step(images, geometry, 0, iteration, iteration) for iteration in range(2)]
        grads = {name: p.grad for name, p in trainer.student.named_parameters() if p.grad is not None}
        results.append((stats, grads, trainer.loss_fn.state_dict()))
    (fused_stats, fused_grads, fused_centers), (stats, grads, centers) = results
    for ours, theirs in zip(fused_stats, stats):
        assert ours.keys() == theirs.keys() and "teacher_patch_temp" in ours
        for name in ours:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
    assert fused_grads.keys() == grads.keys() and "head.last_layer2.weight_v" in grads
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in centers:
        torch.testing.assert_close(fused_centers[name], centers[name], rtol=1e-5, atol=1e-6, msg=name)
