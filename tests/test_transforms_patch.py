"""Geometry-recording crops and flips, the multi-crop recipe, and the collate function."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import patch_wise_dino
import transforms_patch
import utils
from transforms_patch import (MultiCropAugmentation, RandomGaussianBlur, RandomHorizontalFlipWithGeometry,
                              RandomResizedCropWithGeometry, ViewGeometry, collate_multicrop)


def coordinate_image(width=250, height=200):
    """RGB image whose red channel is the column and green channel the row of each pixel."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8))


def noise_image(width=120, height=90, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_recorded_box_is_the_region_that_was_cut():
    torch.manual_seed(0)
    image = noise_image()
    crop = RandomResizedCropWithGeometry(32, scale=(0.05, 1.0))
    for _ in range(20):
        view, geometry = crop(image)
        box = (geometry.left, geometry.top, geometry.left + geometry.width, geometry.top + geometry.height)
        expected = image.resize((32, 32), Image.BICUBIC, box=box)
        assert np.array_equal(np.asarray(view), np.asarray(expected))
        assert geometry.size == 32 and not geometry.flipped
        assert 0 <= geometry.top and geometry.top + geometry.height <= image.height
        assert 0 <= geometry.left and geometry.left + geometry.width <= image.width


def test_view_pixels_come_from_recorded_source_coordinates():
    # On a coordinate-encoding image, a view's pixels name the source pixels they were cut from.
    torch.manual_seed(1)
    crop, flip = RandomResizedCropWithGeometry(64, scale=(0.2, 0.6)), RandomHorizontalFlipWithGeometry(p=0.5)
    flipped_seen = set()
    for _ in range(30):
        view, geometry = flip(*crop(coordinate_image()))
        pixels = np.asarray(view).astype(float)
        cols = geometry.left + (np.arange(64) + 0.5) * geometry.width / 64
        rows = geometry.top + (np.arange(64) + 0.5) * geometry.height / 64
        if geometry.flipped:
            cols = cols[::-1]
        inner = slice(8, 56)  # bicubic rings at the border
        assert np.abs(pixels[32, inner, 0] - cols[inner]).max() < 1.5
        assert np.abs(pixels[inner, 32, 1] - rows[inner]).max() < 1.5
        flipped_seen.add(geometry.flipped)
    assert flipped_seen == {False, True}


def test_flip_mirrors_image_and_toggles_geometry():
    image, geometry = noise_image(), ViewGeometry(3, 4, 50, 60, False, 32)
    flipped_image, flipped = RandomHorizontalFlipWithGeometry(p=1.0)(image, geometry)
    assert np.array_equal(np.asarray(flipped_image), np.asarray(image)[:, ::-1])
    assert flipped == ViewGeometry(3, 4, 50, 60, True, 32)
    assert RandomHorizontalFlipWithGeometry(p=1.0)(flipped_image, flipped)[1] == geometry
    same_image, same = RandomHorizontalFlipWithGeometry(p=0.0)(image, geometry)
    assert same_image is image and same == geometry


def test_geometry_record_and_tensor_row_round_trip():
    geometry = ViewGeometry(top=5, left=7, height=40, width=30, flipped=True, size=96)
    row = geometry.to_tensor()
    assert row.dtype == torch.float64 and row.tolist() == [5, 7, 40, 30, 1, 96]
    assert ViewGeometry.from_sequence(row) == geometry
    assert ViewGeometry.from_sequence((5, 7, 40, 30, 1, 96)) == geometry
    with pytest.raises(ValueError, match="6 values"):
        ViewGeometry.from_sequence((1, 2, 3))
    with pytest.raises(ValueError, match="positive"):
        ViewGeometry.from_sequence((0, 0, 0, 10, 0, 96))


def test_multicrop_returns_views_and_geometry():
    torch.manual_seed(0)
    augmentation = MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), local_crops_number=3,
                                         global_crops_size=32, local_crops_size=16)
    image = noise_image(80, 60)
    views, geometry = augmentation(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.uint8 for v in views)  # normalised on the training device
    assert geometry.shape == (5, 6) and geometry.dtype == torch.float64
    assert geometry[:, 5].tolist() == [32, 32, 16, 16, 16]
    assert set(geometry[:, 4].tolist()) <= {0.0, 1.0}
    assert (geometry[:, 0] >= 0).all() and (geometry[:, 0] + geometry[:, 2] <= 60).all()
    assert (geometry[:, 1] >= 0).all() and (geometry[:, 1] + geometry[:, 3] <= 80).all()
    areas = geometry[:, 2] * geometry[:, 3] / (80 * 60)
    assert (areas[:2] >= 0.35).all() and (areas[2:] <= 0.45).all()  # scale ranges, up to box rounding


def test_multicrop_global_views_only_and_non_rgb_input():
    augmentation = MultiCropAugmentation(local_crops_number=0, global_crops_size=16)
    views, geometry = augmentation(noise_image().convert("L"))
    assert len(views) == 2 and geometry.shape == (2, 6) and views[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropAugmentation(local_crops_number=-1)
    with pytest.raises(ValueError, match="crop scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop size"):
        MultiCropAugmentation(global_crops_size=0)


def _find(compose, kind):
    return [t for t in compose.transforms if isinstance(t, kind)]


def test_photometric_recipe_is_dinos():
    augmentation = MultiCropAugmentation(local_crops_number=2)
    pipelines = augmentation.pipelines()
    assert [crop.size for crop, _ in pipelines] == [(224, 224)] * 2 + [(96, 96)] * 2
    assert pipelines[0][0].scale == (0.4, 1.0) and pipelines[2][0].scale == (0.05, 0.4)
    assert pipelines[0][0].ratio == pytest.approx((3 / 4, 4 / 3))
    assert pipelines[0][0].interpolation == transforms.InterpolationMode.BICUBIC
    assert augmentation.flip.p == 0.5
    expected = {0: (1.0, 0.0), 1: (0.1, 0.2), 2: (0.5, 0.0)}  # view -> (blur p, solarize p)
    for view, (blur_p, solarize_p) in expected.items():
        photometric = pipelines[view][1]
        jitter_apply = _find(photometric, transforms.RandomApply)[0]
        jitter = jitter_apply.transforms[0]
        assert jitter_apply.p == 0.8 and isinstance(jitter, transforms.ColorJitter)
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
            (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert _find(photometric, transforms.RandomGrayscale)[0].p == 0.2
        blur = _find(photometric, RandomGaussianBlur)[0]
        assert (blur.p, blur.radius_min, blur.radius_max) == (blur_p, 0.1, 2.0)
        solarize = _find(photometric, transforms.RandomSolarize)[0]
        assert (solarize.p, solarize.threshold) == (solarize_p, 128)
        # Order: colour, grayscale, blur, solarize, to a uint8 tensor (normalised on the device).
        kinds = [type(t) for t in photometric.transforms]
        assert kinds == [transforms.RandomApply, transforms.RandomGrayscale, RandomGaussianBlur,
                         transforms.RandomSolarize, transforms.PILToTensor]


def test_without_photometrics_views_are_the_crops():
    torch.manual_seed(3)
    image = noise_image(80, 60)
    views, geometry = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16,
                                            photometric=False)(image)
    for view, row in zip(views, geometry):
        top, left, height, width, flipped, size = row.tolist()
        crop = image.resize((int(size),) * 2, Image.BICUBIC, box=(left, top, left + width, top + height))
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
        assert torch.equal(view, expected.flip(-1) if flipped else expected)


def test_blur_applies_with_its_probability():
    image = noise_image()
    assert RandomGaussianBlur(p=0.0)(image) is image
    blurred = np.asarray(RandomGaussianBlur(p=1.0)(image)).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(np.asarray(image).astype(float), axis=1)).mean()


class ConstantImages(Dataset):
    """The same photo ``length`` times, as an ImageFolder would yield it: (transform(image), label)."""

    def __init__(self, length, transform):
        self.length, self.transform, self.image = length, transform, noise_image(64, 48)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.transform(self.image), index % 3


def test_collate_stacks_views_geometry_and_labels():
    augmentation = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    batch = [ConstantImages(4, augmentation)[i] for i in range(4)]
    images, geometry, labels = collate_multicrop(batch)
    assert [tuple(x.shape) for x in images] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert geometry.shape == (4, 4, 6) and geometry.dtype == torch.float64
    assert labels.tolist() == [0, 1, 2, 0]
    torch.testing.assert_close(images[3][1], batch[1][0][0][3])
    torch.testing.assert_close(geometry[2], batch[2][0][1])


def test_every_image_and_every_worker_draws_its_own_views():
    augmentation = MultiCropAugmentation(local_crops_number=1, global_crops_size=16, local_crops_size=16)
    torch.manual_seed(0)
    loader = DataLoader(ConstantImages(16, augmentation), batch_size=4, num_workers=2,
                        collate_fn=collate_multicrop)
    geometries = torch.cat([geometry for _, geometry, _ in loader])  # [16, V, 6]
    boxes = {tuple(g[0, :4].tolist()) for g in geometries}
    assert len(boxes) >= 14  # distinct per sample and per worker (a few collisions are chance)
    first_worker, second_worker = geometries[:4], geometries[4:8]  # batches 0 and 1 come from workers 0 and 1
    assert not torch.equal(first_worker, second_worker)


def test_box_distribution_is_torchvisions():
    torch.manual_seed(0)
    crop = RandomResizedCropWithGeometry(32, scale=(0.05, 0.4))
    image = noise_image(400, 300)
    ours = torch.tensor([crop.draw_box(300, 400) for _ in range(4000)], dtype=torch.float64)
    theirs = torch.tensor([transforms.RandomResizedCrop.get_params(image, (0.05, 0.4), crop.ratio)
                           for _ in range(4000)], dtype=torch.float64)
    for boxes in (ours, theirs):
        assert ((boxes[:, 0] >= 0) & (boxes[:, 0] + boxes[:, 2] <= 300)).all()
        assert ((boxes[:, 1] >= 0) & (boxes[:, 1] + boxes[:, 3] <= 400)).all()
    statistics = lambda b: torch.stack([b[:, 2] * b[:, 3] / 120000, (b[:, 3] / b[:, 2]).log(),
                                        b[:, 0] / (300 - b[:, 2] + 1), b[:, 1] / (400 - b[:, 3] + 1)])
    torch.testing.assert_close(statistics(ours).mean(1), statistics(theirs).mean(1), rtol=0, atol=0.02)
    torch.testing.assert_close(statistics(ours).std(1), statistics(theirs).std(1), rtol=0, atol=0.02)
    for height, width in ((10, 1000), (1000, 10), (50, 60)):  # no box fits: torchvision's centred fallback
        fallback = transforms.RandomResizedCrop.get_params(noise_image(width, height), (1.0, 1.0), (0.99, 1.0))
        assert RandomResizedCropWithGeometry(8, scale=(1.0, 1.0), ratio=(0.99, 1.0)).draw_box(height, width) == fallback


# ----------------------------------------------------------------------------------------------
# 16-bit images, and the drawing script's output.
# ----------------------------------------------------------------------------------------------
def write_16_bit_gradient(path, width=96, height=80):
    """A 16-bit grayscale PNG (PIL mode I;16) whose values rise from 0 to 65535 across it; returns the path."""
    values = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I") and image.getextrema()[1] > 255
    return path


def test_16_bit_images_reach_the_training_views_as_read_rgb_image_reads_them(tmp_path):
    path = write_16_bit_gradient(tmp_path / "deep.png")
    expected = utils.read_rgb_image(path)
    assert np.asarray(expected).mean() < 200  # scaled to 8 bits, not clipped to white
    augmentation = MultiCropAugmentation(local_crops_number=1, global_crops_size=16, local_crops_size=8,
                                         photometric=False)
    with utils.seeded_cpu_rng(3):
        reference, reference_geometry = augmentation(expected)
    with Image.open(path) as image, utils.seeded_cpu_rng(3):
        views, geometry = augmentation(image)  # an image not read by utils.read_rgb_image
    assert torch.equal(geometry, reference_geometry) and all(map(torch.equal, views, reference))
    (sample, _), replaced = patch_wise_dino.TrainingImages([path], augmentation)[(0, 3)]
    assert replaced == 0 and all(map(torch.equal, sample, reference))


def test_drawing_reads_16_bit_images_and_checks_its_output_first(tmp_path):
    path, output = write_16_bit_gradient(tmp_path / "deep.png"), tmp_path / "out" / "drawing.png"
    parse = transforms_patch.get_args_parser().parse_args
    transforms_patch.main(parse(["--image", str(path), "--output", str(output), "--size", "32", "--patch_size", "8"]))
    torch.manual_seed(0)
    crop, flip = RandomResizedCropWithGeometry(32, (0.4, 1.0)), RandomHorizontalFlipWithGeometry(p=0.5)
    view, _ = flip(*crop(utils.read_rgb_image(path)))
    expected = np.asarray(transforms_patch.with_tile_grid(transforms.functional.pil_to_tensor(view), 8))
    with Image.open(output) as drawing:
        panel = np.asarray(drawing.convert("RGB"))[16:16 + expected.shape[0], 8:8 + expected.shape[1]]
    assert np.array_equal(panel, expected)  # the left panel: the view as read_rgb_image reads the file
    (tmp_path / "a_file").write_text("")
    missing = ["--image", str(tmp_path / "missing.png")]  # the output is checked before the image is read
    with pytest.raises(IsADirectoryError, match=rf"--output {tmp_path} is a folder; give a file name"):
        transforms_patch.main(parse(missing + ["--output", str(tmp_path)]))
    with pytest.raises(NotADirectoryError, match=r"--output .*a_file/x.png .*a_file cannot be a "
                                                 r"folder: .*a_file is a file"):
        transforms_patch.main(parse(missing + ["--output", str(tmp_path / "a_file" / "x.png")]))
