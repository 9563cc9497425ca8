"""Checks that need a CUDA device (skipped without one)."""
import pytest
import torch
from torch.utils.data import DataLoader

import vision_transformer as vits
from conftest import random_geometries
from patch_matching import match_patches_batched

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["upstream", "centre"])
def test_batched_matching_on_cuda_equals_cpu(mode):
    generator = torch.Generator().manual_seed(0)
    teachers, students = random_geometries(generator, 4096, 224), random_geometries(generator, 4096, 96)
    on_cpu = match_patches_batched(teachers, students, 16, mode)
    on_gpu = match_patches_batched(teachers.cuda(), students.cuda(), 16, mode)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_vit_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16, depth=2).eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model.forward_features(images)
        actual = model.cuda().forward_features(images.cuda()).cpu()
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_runs_on_cuda(tmp_path, precision):
    from conftest import TINY_ARGS, write_images
    import patch_wise_dino

    data = write_images(tmp_path / "data")
    args = [a if a != "cpu" else "cuda" for a in TINY_ARGS]
    trainer = patch_wise_dino.main(patch_wise_dino.get_args_parser().parse_args(
        args + ["--data_path", str(data), "--output_dir", str(tmp_path / "run"), "--epochs", "2",
                "--precision", precision]))
    assert next(trainer.teacher.parameters()).device.type == "cuda"
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def _trainer_losses(tmp_path, extra, steps=2):
    from conftest import TINY_ARGS
    from test_fused_loss import synthetic_batch
    from patch_wise_dino import build_trainer, get_args_parser

    args = [a if a != "cpu" else "cuda" for a in TINY_ARGS]
    args = get_args_parser().parse_args(args + ["--data_path", str(tmp_path), "--drop_path_rate", "0"] + extra)
    trainer = build_trainer(args, torch.device("cuda"), DataLoader(range(4 * steps), batch_size=4))
    images, geometry = synthetic_batch(4, 4, torch.Generator().manual_seed(0))
    return [trainer.step(images, geometry, 0, i, i)["loss"] for i in range(steps)]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("head", ["shared", "separate", "ibot"])
def test_fused_step_equals_reference_step_on_cuda(tmp_path, precision, head):
    extra = ["--precision", precision, "--patch_head", head, "--patch_out_dim", "48"]
    fused = _trainer_losses(tmp_path, extra + ["--fused_loss", "true"])
    reference = _trainer_losses(tmp_path, extra + ["--fused_loss", "false"])
    assert fused == pytest.approx(reference, rel=2e-2 if precision == "bf16" else 1e-4)


def test_compiled_step_equals_eager_step_on_cuda(tmp_path):
    compiled = _trainer_losses(tmp_path, ["--precision", "fp32", "--compile", "true"])
    eager = _trainer_losses(tmp_path, ["--precision", "fp32", "--compile", "false"])
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_device_photometric_on_cuda_is_seeded_and_in_range():
    import device_augment as da

    views = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda") for _ in range(2)]
    views += [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, device="cuda") for _ in range(2)]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(da.DevicePhotometric(2)(views))
    assert all(torch.equal(a, b) and a.device.type == "cuda" for a, b in zip(*runs))


def test_patch_photometric_on_cuda_is_seeded_tile_local_and_in_range():
    import device_augment as da

    views = torch.rand(4, 3, 32, 32, device="cuda")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(da.patch_photometric(views, 8, p=torch.tensor([1.0, 1.0, 0.0, 1.0], device="cuda")))
    assert torch.equal(runs[0], runs[1]) and runs[0].device.type == "cuda"
    assert torch.equal(runs[0][2], views[2]) and not torch.equal(runs[0][0], views[0])
    assert 0 <= runs[0].min() and runs[0].max() <= 1
    changed = views.clone()
    changed[:, :, :8, :8] = 0.5  # one tile of every view
    torch.manual_seed(0)
    other = da.patch_photometric(changed, 8, p=torch.tensor([1.0, 1.0, 0.0, 1.0], device="cuda"))
    assert torch.equal(other[:, :, 8:, :], runs[0][:, :, 8:, :]) and torch.equal(other[:, :, :8, 8:], runs[0][:, :, :8, 8:])


def test_training_with_the_2024_options_runs_on_cuda(tmp_path):
    losses = _trainer_losses(tmp_path, ["--precision", "bf16", "--patch_head", "separate", "--gpu_augment", "true",
                                        "--patch_augment", "true"])
    assert all(abs(loss) < float("inf") for loss in losses)  # finite: not NaN, not infinite


def test_bench_runs_on_cuda(tmp_path):
    import bench
    from test_bench import TINY

    args = [a if a != "cpu" else "cuda" for a in TINY]
    rows = bench.main(bench.get_args_parser().parse_args(args + ["--precision", "bf16", "--parts", "step", "matching"]))
    assert rows[0]["peak_gib"] > 0 and all(row["img_per_s"] > 0 for row in rows)
