"""Checks that need a CUDA device (skipped without one)."""
import pytest
import torch

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
