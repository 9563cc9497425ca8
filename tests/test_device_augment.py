"""DINO's photometric augmentation on device batches (--gpu_augment), on the CPU."""
import colorsys
import json

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

import device_augment as da
import patch_wise_dino
from conftest import TINY_ARGS, write_images

IDENTITY = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def uint8_views(batch=8, local_crops_number=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = [24, 24] + [12] * local_crops_number
    return [torch.randint(0, 256, (batch, 3, s, s), generator=generator, dtype=torch.uint8) for s in sizes]


def test_shapes_ranges_and_normalisation():
    views = uint8_views()
    torch.manual_seed(0)
    augmented = da.DevicePhotometric(2).augment(views[1], torch.full((8,), 0.5), torch.full((8,), 0.5))
    assert augmented.shape == views[1].shape and augmented.dtype == torch.float32
    assert augmented.min() >= 0 and augmented.max() <= 1
    out = da.DevicePhotometric(2)(views)
    assert [o.shape for o in out] == [v.shape for v in views] and all(o.dtype == torch.float32 for o in out)
    mean, std = torch.tensor(da.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(da.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(da.normalize(views[0]), (views[0].float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="expected 4 views"):
        da.DevicePhotometric(2)(views[:3])


def test_deterministic_under_a_seed_and_random_across_seeds():
    views = uint8_views()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(da.DevicePhotometric(2)(views))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][2], runs[2][2])


def test_probability_zero_is_identity():
    views = uint8_views()
    torch.manual_seed(0)
    photometric = da.DevicePhotometric(2, **IDENTITY)
    for view in views:
        assert torch.equal(photometric.augment(view, torch.zeros(8), torch.zeros(8)), view.float() / 255)
    for output, view in zip(photometric(views), views):
        torch.testing.assert_close(output, da.normalize(view))  # up to the rounding of the two normalisations


def test_views_get_their_own_blur_and_solarize_probabilities():
    views = uint8_views(batch=16, local_crops_number=2)
    torch.manual_seed(0)
    out = da.DevicePhotometric(2, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 1.0), solarize_p=1.0)(views)
    torch.testing.assert_close(out[0], da.normalize(views[0]))  # global 1: neither
    inverted = torch.where(views[1] >= 128, 255 - views[1], views[1])
    torch.testing.assert_close(out[1], da.normalize(inverted))  # global 2: solarized
    for output, view in zip(out[2:], views[2:]):  # locals: blurred, not solarized
        assert not torch.allclose(output, da.normalize(view))


def test_probability_one_changes_every_image_and_parameters_are_per_sample():
    images = uint8_views(batch=32)[0].float() / 255
    torch.manual_seed(0)
    gray = da.random_grayscale(images, 1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    solarized = da.random_solarize(images, 1.0)
    torch.testing.assert_close(solarized, torch.where(images >= 128 / 255, 1 - images, images))
    blurred = da.random_gaussian_blur(images, 1.0)
    detail, blurred_detail = (x.diff(dim=-1).abs().mean((1, 2, 3)) for x in (images, blurred))
    assert (blurred_detail <= detail + 1e-6).all() and (blurred_detail < 0.9 * detail).float().mean() > 0.7
    jittered = da.color_jitter(images, 1.0)
    assert ((jittered - images).abs().amax((1, 2, 3)) > 1e-3).all()
    half_gray = da.random_grayscale(images, 0.5)
    is_gray = (half_gray[:, 0] == half_gray[:, 1]).flatten(1).all(1)
    assert 0 < is_gray.sum() < len(images)  # each sample draws its own


@pytest.mark.parametrize("name,factor", [("brightness", 1.3), ("contrast", 0.7), ("saturation", 1.15), ("hue", 0.07),
                                         ("hue", -0.09)])
def test_colour_ops_equal_torchvision(name, factor):
    images = uint8_views(batch=3)[0].float() / 255
    ours = da._JITTER_OPS[name](images, torch.full((3,), factor))
    theirs = torch.stack([getattr(TF, f"adjust_{name}")(image, factor) for image in images])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_blur_equals_torchvision_per_sample():
    images = uint8_views(batch=3)[0].float() / 255
    sigma = torch.tensor([0.5, 1.7, 0.0])
    ours = da.gaussian_blur(images, sigma, radius=6)
    for image, s, out in zip(images, sigma.tolist(), ours):
        expected = image if s == 0 else TF.gaussian_blur(image, [13, 13], [s, s])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_rgb_hsv_round_trip_and_values():
    images = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure red: hue 0, saturation 1
    images[0, :, 0, 1] = 0.0  # black
    hsv = da.rgb_to_hsv(images)
    assert hsv[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0] and hsv[0, :, 0, 1].tolist() == [0.0, 0.0, 0.0]
    assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 1
    torch.testing.assert_close(da.hsv_to_rgb(hsv), images, rtol=0, atol=1e-6)
    np.testing.assert_allclose(hsv[1, :, 2, 3].numpy(), colorsys.rgb_to_hsv(*images[1, :, 2, 3].tolist()), atol=1e-6)


def test_training_with_gpu_augment_runs_on_the_cpu(tmp_path):
    data = write_images(tmp_path / "data")
    trainer = patch_wise_dino.main(patch_wise_dino.get_args_parser().parse_args(
        TINY_ARGS + ["--data_path", str(data), "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                     "--gpu_augment", "true"]))
    assert isinstance(trainer.device_photometric, da.DevicePhotometric)
    assert np.isfinite(json.loads((tmp_path / "run" / "log.txt").read_text())["loss"])
