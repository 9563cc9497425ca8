"""The 2024 method's options in training: the separate patch head (``--patch_head separate``) and patch-level
photometric augmentation (``--patch_augment``); the loss path chosen by ``--fused_loss auto``; and the default
left bitwise as it was before any of them existed."""
import hashlib
import json
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_knn
import export_backbone
import patch_wise_dino
import utils
from conftest import TINY_ARGS, TINY_BACKBONE_ARGS, random_geometries, write_images
from patch_matching import match_patches
from pwself_loss import PatchWiseDINOLoss, compute_matches, logits_per_view, matched_pairs, view_pairs
from test_reliability import Crash, crash_at_epoch_1_iteration_2

PATCH, GLOBAL, LOCAL, K, K_PATCH, D = 8, 32, 16, 24, 10, 6
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
REFERENCE = Path(__file__).parent / "fixtures" / "shared_head_reference.json"


# ----------------------------------------------------------------------------------------------
# The loss with a separate patch head.
# ----------------------------------------------------------------------------------------------
def make_batch(seed, batch=3, num_locals=2, mode="upstream"):
    """Matches, head embeddings of every token, both heads' last-layer weights and both centers (float64)."""
    generator = torch.Generator().manual_seed(seed)
    geometry = torch.stack([random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            random_geometries(generator, batch, GLOBAL, (60, 70), min_side=10),
                            *[random_geometries(generator, batch, LOCAL, (60, 70)) for _ in range(num_locals)]], dim=1)
    matches = compute_matches(geometry, PATCH, mode, True)
    tokens = [1 + (GLOBAL // PATCH) ** 2] * 2 + [1 + (LOCAL // PATCH) ** 2] * num_locals
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)
    student_z = unit(batch * sum(tokens), D).requires_grad_()
    teacher_z = unit(2 * batch * tokens[0], D)
    weights = lambda: tuple((2 * torch.randn(k, D, generator=generator, dtype=torch.float64)) for k in (K, K_PATCH))
    student_w, teacher_w = tuple(w.requires_grad_() for w in weights()), weights()
    centers = (torch.randn(1, K, generator=generator, dtype=torch.float64),
               torch.randn(tokens[0] - 1, K_PATCH, generator=generator, dtype=torch.float64))
    return geometry, matches, tokens, student_z, student_w, teacher_z, teacher_w, centers


def make_loss(centers, cls_weight=None, chunk_elements=2 ** 20):
    loss_fn = PatchWiseDINOLoss(K, 1 + len(centers[1]), np.array([TEACHER_TEMP]), STUDENT_TEMP, cls_weight=cls_weight,
                                chunk_elements=chunk_elements, patch_out_dim=K_PATCH).double()
    loss_fn.center.copy_(centers[0])
    loss_fn.patch_center.copy_(centers[1])
    return loss_fn


def per_token_loss(geometry, tokens, student_z, student_w, teacher_z, teacher_w, centers, cls_weight):
    """docs/method.md section 4 written out token by token, CLS through the CLS head and center, patches through the
    patch head and their position's center."""
    batch = geometry.shape[0]
    student_views = student_z.split([batch * t for t in tokens])
    teacher_views = teacher_z.view(2, batch, tokens[0], D)
    pair_losses = []
    for g, v in view_pairs(len(tokens)):
        cls_terms, patch_terms = [], []
        for b in range(batch):
            for i, j in zip(*match_patches(geometry[b, g], geometry[b, v], PATCH)):
                head = 0 if j == 0 else 1
                center = centers[head][0 if i == 0 else i - 1]
                p = F.softmax((teacher_views[g, b, i] @ teacher_w[head].T - center) / TEACHER_TEMP, dim=-1)
                q = F.log_softmax(student_views[v][b * tokens[v] + j] @ student_w[head].T / STUDENT_TEMP, dim=-1)
                (cls_terms if j == 0 else patch_terms).append(-(p * q).sum())
        if cls_weight is None:
            pair_losses.append(torch.stack(cls_terms + patch_terms).mean())
        else:
            pair_losses.append(cls_weight * torch.stack(cls_terms).mean()
                               + (1 - cls_weight) * torch.stack(patch_terms).mean())
    return torch.stack(pair_losses).mean()


def assert_both_paths_give(expected, reference_fn, fused_fn, batch, cls_weight) -> None:
    """The reference and the fused loss of ``batch`` (``make_batch``'s tuple) equal ``expected`` with its
    gradients, and agree on statistics and updated centers."""
    geometry, matches, tokens, student_z, student_w, teacher_z, teacher_w, _ = batch
    expected_grads = torch.autograd.grad(expected, (student_z, *student_w))
    pairs = matched_pairs(matches, cls_weight)
    student = logits_per_view(student_z, student_w, tokens, len(geometry))
    teacher = logits_per_view(teacher_z, teacher_w, tokens[:2], len(geometry))
    assert [logits.shape[1:] for logits in student[2]] == [(1, K), (tokens[2] - 1, K_PATCH)]
    reference, reference_stats = reference_fn.reference(student, teacher, matches, 0)
    fused, fused_stats = fused_fn(student_z[pairs.rows], student_w, teacher_z, teacher_w, pairs, 0)
    for loss in (reference, fused):
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        for ours, theirs in zip(torch.autograd.grad(loss, (student_z, *student_w)), expected_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for name, value in reference_stats.items():
        torch.testing.assert_close(fused_stats[name].double(), value.double(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(fused_fn.centers, reference_fn.centers):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls_weight", [None, 0.7])
def test_separate_head_loss_matches_a_token_by_token_computation(cls_weight):
    batch = make_batch(0)
    geometry, _, tokens, student_z, student_w, teacher_z, teacher_w, centers = batch
    expected = per_token_loss(geometry, tokens, student_z, student_w, teacher_z, teacher_w, centers, cls_weight)
    assert_both_paths_give(expected, make_loss(centers, cls_weight), make_loss(centers, cls_weight, 3 * K), batch,
                           cls_weight)


def test_separate_centers_follow_their_own_tokens():
    geometry, matches, tokens, student_z, student_w, teacher_z, teacher_w, centers = make_batch(1)
    loss_fn = make_loss(centers)
    loss_fn(student_z[matched_pairs(matches, None).rows], student_w, teacher_z, teacher_w,
            matched_pairs(matches, None), 0)
    teacher_logits = [teacher_z.view(-1, tokens[0], D) @ w.T for w in teacher_w]  # [2B, T, K_h]
    torch.testing.assert_close(loss_fn.center, 0.9 * centers[0] + 0.1 * teacher_logits[0][:, :1].mean(0))
    torch.testing.assert_close(loss_fn.patch_center, 0.9 * centers[1] + 0.1 * teacher_logits[1][:, 1:].mean(0))
    assert set(loss_fn.state_dict()) == {"center", "patch_center"}
    assert loss_fn.center.shape == (1, K)  # DINO's own center shape


# ----------------------------------------------------------------------------------------------
# Training with a separate patch head.
# ----------------------------------------------------------------------------------------------
SEPARATE = ["--patch_head", "separate", "--patch_out_dim", "48", "--save_every_iters", "1"]


def parse(data: Path, output: Path, *extra: str):
    return patch_wise_dino.get_args_parser().parse_args(
        TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


def test_separate_head_trains_resumes_exactly_and_loads_in_evaluations(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data" / "train", classes=("x", "y"), per_class=6, seed=4)
    uninterrupted = patch_wise_dino.main(parse(data, tmp_path / "a", "--epochs", "2", *SEPARATE))
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        patch_wise_dino.main(parse(data, tmp_path / "b", "--epochs", "2", *SEPARATE))
    monkeypatch.undo()
    resumed = patch_wise_dino.main(parse(data, tmp_path / "b", "--epochs", "2", *SEPARATE))
    for ours, theirs in ((resumed.teacher, uninterrupted.teacher), (resumed.loss_fn, uninterrupted.loss_fn)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name

    checkpoint = utils.load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    teacher = checkpoint["teacher"]
    assert teacher["head.last_layer.weight_v"].shape == (64, 32)  # DINO's keys and shapes for the CLS head
    assert teacher["patch_head.last_layer.weight_v"].shape == (48, 32)  # the patch head under its own key
    assert {key.split(".")[0] for key in teacher} == {"backbone", "head", "patch_head"}
    assert checkpoint["dino_loss"]["center"].shape == (1, 64)  # DINO's CLS center, --out_dim 64
    assert checkpoint["dino_loss"]["patch_center"].shape == (16, 48)  # one per patch position of a 16 px view

    knn = eval_knn.main(eval_knn.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--data_path", str(data.parent), "--pretrained_weights", str(tmp_path / "a" / "checkpoint.pth"),
                              "--resize_size", "16", "--crop_size", "16", "--num_workers", "0", "--device", "cpu",
                              "--nb_knn", "3", "--val_split", "train"]))
    assert 0 <= knn[3]["top1"] <= 100
    export_backbone.main(export_backbone.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--pretrained_weights", str(tmp_path / "a" / "checkpoint.pth"), "--format", "dino",
                              "--output", str(tmp_path / "backbone.pth")]))
    assert not any("head" in key for key in torch.load(tmp_path / "backbone.pth", weights_only=True))


@pytest.mark.parametrize("where", ["workers", "device"])
def test_patch_augmentation_trains_and_resumes_exactly(tmp_path, monkeypatch, where):
    data = write_images(tmp_path / "data", classes=("x", "y"), per_class=6, seed=4)
    options = ["--epochs", "2", "--save_every_iters", "1", "--num_workers", "1",
               "--gpu_augment", str(where == "device").lower()]
    augmented = ["--patch_augment", "true", "--patch_augment_p", "0.7"]
    uninterrupted = patch_wise_dino.main(parse(data, tmp_path / "a", *options, *augmented))
    without = patch_wise_dino.main(parse(data, tmp_path / "plain", *options))
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        patch_wise_dino.main(parse(data, tmp_path / "b", *options, *augmented))
    monkeypatch.undo()
    resumed = patch_wise_dino.main(parse(data, tmp_path / "b", *options, *augmented))
    same = [torch.equal(a, b) for a, b in zip(resumed.teacher.state_dict().values(),
                                               uninterrupted.teacher.state_dict().values())]
    assert all(same)
    changed = [not torch.equal(a, b) for a, b in zip(without.teacher.state_dict().values(),
                                                     uninterrupted.teacher.state_dict().values())]
    assert any(changed)  # the option reaches the views
    with pytest.raises(ValueError, match="--patch_augment_p must lie in"):
        patch_wise_dino.main(parse(data, tmp_path / "c", *options, "--patch_augment", "true", "--patch_augment_p", "2"))


def test_patch_blur_is_the_authors_kernel_by_default_and_reaches_both_paths(tmp_path, capsys):
    data = write_images(tmp_path / "data", per_class=2)
    assert parse(data, tmp_path / "run").patch_blur == "authors"
    with pytest.raises(SystemExit):
        parse(data, tmp_path / "run", "--patch_blur", "gaussian")
    error = capsys.readouterr().err
    assert re.search(r"--patch_blur: invalid choice: 'gaussian' \(choose from '?authors'?, '?isotropic'?\)", error)
    isotropic = parse(data, tmp_path / "run", "--patch_augment", "true", "--patch_blur", "isotropic")
    assert patch_wise_dino.build_loader(isotropic).dataset.transform.patch_photometric.blur == "isotropic"
    trainer = patch_wise_dino.main(parse(data, tmp_path / "device", "--epochs", "1", "--patch_augment", "true",
                                         "--patch_blur", "isotropic", "--gpu_augment", "true"))
    assert trainer.device_photometric.patch_blur == "isotropic"


def test_patch_augmented_checkpoints_from_before_patch_blur_resume_as_isotropic(tmp_path, monkeypatch):
    """Runs before --patch_blur blurred tiles isotropically: their checkpoints lack the argument."""
    data = write_images(tmp_path / "data", per_class=2)
    options = ["--patch_augment", "true", "--patch_blur", "isotropic"]
    step = patch_wise_dino.Trainer.step

    def crash_in_epoch_1(self, images, geometry, epoch, *rest):
        if epoch == 1:
            raise Crash
        return step(self, images, geometry, epoch, *rest)

    monkeypatch.setattr(patch_wise_dino.Trainer, "step", crash_in_epoch_1)
    with pytest.raises(Crash):
        patch_wise_dino.main(parse(data, tmp_path / "run", "--epochs", "2", *options))
    monkeypatch.undo()
    checkpoint_path = tmp_path / "run" / "checkpoint.pth"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    del checkpoint["args"]["patch_blur"]
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ValueError, match="--patch_blur: checkpoint isotropic, now authors"):
        patch_wise_dino.main(parse(data, tmp_path / "run", "--epochs", "2", "--patch_augment", "true"))
    patch_wise_dino.main(parse(data, tmp_path / "run", "--epochs", "2", *options))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1]  # continued after epoch 0, not restarted

    plain = parse(data, tmp_path / "run")  # without --patch_augment no tile is blurred: nothing to compare
    saved = {name: value for name, value in vars(plain).items() if name != "patch_blur"}
    assert patch_wise_dino.resume_differences({"args": saved}, plain, {}) == []
    authors = parse(data, tmp_path / "run", "--patch_augment", "true")
    assert patch_wise_dino.resume_differences({"args": vars(authors)}, parse(data, tmp_path / "run", *options),
                                              {}) == ["--patch_blur: checkpoint authors, now isotropic"]


def test_patch_head_arguments_are_checked(tmp_path):
    data = write_images(tmp_path / "data", per_class=2)
    with pytest.raises(ValueError) as error:
        patch_wise_dino.main(parse(data, tmp_path / "run", "--patch_head", "separate", "--patch_loss", "false",
                                   "--patch_out_dim", "0"))
    assert "--patch_head separate needs --patch_loss true" in str(error.value)
    assert "--patch_out_dim must be positive, got 0" in str(error.value)


# ----------------------------------------------------------------------------------------------
# The loss path.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_loss,fused_loss,expected", [
    ("true", "auto", True), ("false", "auto", False), ("false", "true", True), ("true", "false", False)])
def test_auto_picks_the_fused_loss_with_patch_tokens_only(tmp_path, patch_loss, fused_loss, expected):
    args = parse(tmp_path, tmp_path / "run", "--patch_loss", patch_loss, "--fused_loss", fused_loss)
    assert patch_wise_dino.uses_fused_loss(args) is expected


def test_fused_loss_flag_names_its_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(tmp_path, tmp_path / "run", "--fused_loss", "sometimes")
    assert "expected auto, true or false, got 'sometimes'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The shared-head default, bitwise as before.
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def trained_tensors(root: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    """Student, teacher and center after 2 epochs of the recorded tiny run."""
    data = write_images(root / "data", classes=("x", "y"), per_class=6, seed=3)
    patch_wise_dino.main(parse(data, root / "run", "--epochs", "2", "--seed", "5", *extra))
    checkpoint = torch.load(root / "run" / "checkpoint.pth", weights_only=False)
    return {f"{part}.{key}": value for part in ("student", "teacher", "dino_loss")
            for key, value in checkpoint[part].items()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        hasher.update(key.encode())
        hasher.update(tensors[key].detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()


@pytest.mark.parametrize("case", ["pwself_fused", "pwself_plain", "dino_fused", "dino_plain"])
def test_shared_head_training_is_bitwise_as_before(tmp_path, case):
    """The fixture holds what the code before the separate head and patch augmentation (commit 1d8d7ff) trained:
    bit for bit on the machine type that recorded it, and to float tolerance on other CPUs."""
    reference = json.loads(REFERENCE.read_text())
    method, path = case.split("_")
    tensors = trained_tensors(tmp_path, ["--patch_loss", str(method == "pwself").lower(),
                                         "--fused_loss", str(path == "fused").lower()])
    expected = reference["cases"][case]
    assert sorted(tensors) == sorted(expected["sums"])
    if (reference["cpu"], reference["torch"]) == (cpu_model(), torch.__version__):
        assert digest(tensors) == expected["sha256"]
    for key, value in expected["sums"].items():
        assert float(tensors[key].double().sum()) == pytest.approx(value, rel=1e-3, abs=1e-5), key
