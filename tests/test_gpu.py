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
