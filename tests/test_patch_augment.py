"""Patch-level photometric augmentation (docs/method.md section 5): the tile ops, the CPU path in
MultiCropAugmentation, the device path in DevicePhotometric, and their agreement."""
import inspect
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import bench
import device_augment as da
import transforms_patch
from conftest import ROOT
from transforms_patch import MultiCropAugmentation, PatchPhotometric

IDENTITY = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
SMALL = dict(local_crops_number=2, global_crops_size=32, local_crops_size=16)  # with patch 8: 2x16 + 2x4 tiles


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(ROOT / "test.png").convert("RGB")


def photo_tiles(photo, size=32, count=4) -> torch.Tensor:
    """``count`` float views ``[count, 3, size, size]`` in [0, 1], resized from corners of the photo."""
    boxes = [(0, 0, 200, 200), (250, 0, 450, 200), (0, 100, 200, 300), (120, 50, 320, 250)]
    return torch.stack([TF.pil_to_tensor(photo.resize((size, size), Image.BICUBIC, box=box))
                        for box in boxes[:count]]).float() / 255


def test_tiles_are_the_patch_grid_and_round_trip():
    images = torch.rand(2, 3, 16, 24)
    tiles = da.to_tiles(images, 8)
    assert tiles.shape == (2 * 2 * 3, 3, 8, 8)
    assert torch.equal(tiles[3 + 2], images[0, :, 8:16, 16:24])  # view 0, tile row 1, column 2 (row-major)
    assert torch.equal(tiles[6], images[1, :, 0:8, 0:8])
    assert torch.equal(da.from_tiles(tiles, images.shape), images)


def test_each_output_tile_depends_on_its_own_input_tile_only(photo):
    images = photo_tiles(photo)
    changed = images.clone()
    changed[1, :, 8:16, 16:24] = torch.rand(3, 8, 8)
    outputs = []
    for batch in (images, changed):
        torch.manual_seed(0)
        outputs.append(da.patch_photometric(batch, 8))
    differs = (outputs[0] != outputs[1]).any(1)  # [B, H, W]
    assert differs[1, 8:16, 16:24].any()
    differs[1, 8:16, 16:24] = False
    assert not differs.any()


def test_colours_change_and_geometry_does_not(photo):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for image in (photo, noise):
        views = {}
        for p in (0.0, 1.0):
            torch.manual_seed(0)
            views[p] = MultiCropAugmentation(**SMALL, patch_augment_p=p, patch_size=8)(image)
        (plain, geometry), (augmented, augmented_geometry) = views[0.0], views[1.0]
        assert torch.equal(geometry, augmented_geometry)
        for before, after in zip(plain, augmented):
            assert before.shape == after.shape and after.dtype == torch.uint8
            tile_mean_change = da.to_tiles(after[None].float() - before[None].float(), 8).mean((1, 2, 3))
            assert (tile_mean_change.abs() > 1).float().mean() > 0.5  # most tiles change colour (> 1 level)
            if image is noise:  # not moved: the output lines up best with the input as it is, not shifted or mirrored
                assert best_alignment(before, after) == (0, 0, False)


def best_alignment(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, bool]:
    """The shift (rows, columns up to 2 pixels) and mirroring of ``before [3, S, S]`` best correlated with ``after``."""
    def correlation(a, b):
        a, b = a.float().flatten() - a.float().mean(), b.float().flatten() - b.float().mean()
        return (a @ b / (a.norm() * b.norm())).item()

    candidates = {(dy, dx, flip): correlation((before.flip(-1) if flip else before).roll((dy, dx), (-2, -1)), after)
                  for dy in range(-2, 3) for dx in range(-2, 3) for flip in (False, True)}
    return max(candidates, key=candidates.get)


def test_reproducible_under_a_seed_and_random_across_seeds(photo):
    augmentation = MultiCropAugmentation(**SMALL, patch_augment_p=1.0, patch_size=8)
    device = da.DevicePhotometric(2, patch_augment_p=1.0, patch_size=8)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        views, _ = augmentation(photo)
        torch.manual_seed(seed)
        runs.append((views, device([v[None] for v in views])))
    for first, second in zip(runs[0], runs[1]):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    for first, other in zip(runs[0], runs[2]):
        assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_probability_zero_is_the_plain_recipe_bit_for_bit(photo):
    def run(make):
        torch.manual_seed(0)
        return make()(photo), torch.get_rng_state()

    for photometric in (True, False):  # False: the device does them, so the workers leave the views alone
        plain = run(lambda: MultiCropAugmentation(**SMALL, photometric=photometric))
        candidates = [run(lambda: MultiCropAugmentation(**SMALL, photometric=photometric, patch_size=8))]
        if not photometric:
            candidates.append(run(lambda: MultiCropAugmentation(**SMALL, photometric=False, patch_augment_p=1.0,
                                                                patch_size=8)))
        for ((views, geometry), state) in candidates:
            assert all(torch.equal(a, b) for a, b in zip(views, plain[0][0]))
            assert torch.equal(geometry, plain[0][1]) and torch.equal(state, plain[1])  # no extra draw

    batches = [torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8) for s in (32, 32, 16, 16)]
    outputs = [run(lambda: lambda _: device(batches)) for device in
               (da.DevicePhotometric(2), da.DevicePhotometric(2, patch_augment_p=0.0, patch_size=8))]
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][0], outputs[1][0]))
    assert torch.equal(outputs[0][1], outputs[1][1])
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(da.patch_photometric(images, 8, 0.0), images)


def test_views_are_augmented_with_their_probability():
    images = torch.rand(64, 3, 16, 16)
    torch.manual_seed(0)
    unchanged = (da.patch_photometric(images, 8, 0.5) == images).flatten(1).all(1)
    assert 10 < unchanged.sum() < 54  # each view draws its own; those not drawn come back bit for bit
    per_view = torch.tensor([0.0, 1.0]).repeat(32)
    unchanged = (da.patch_photometric(images, 8, per_view) == images).flatten(1).all(1)
    assert torch.equal(unchanged, per_view == 0)


def test_cpu_dispatch_and_masked_dispatch_agree(photo):
    """The CPU runs each op on the tiles that apply it, the device on all tiles with identity values for the
    others: the same draws, so the same result under one seed (the masked form run here on the CPU)."""
    images = torch.cat([photo_tiles(photo, size=32), photo_tiles(photo, size=16).repeat(1, 1, 2, 2)])  # 8 x 16 tiles
    for p in (1.0, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])):
        outputs, states = [], []
        for masked in (False, True):
            torch.manual_seed(3)
            outputs.append(da.patch_photometric(images, 8, p, masked=masked))
            states.append(torch.get_rng_state())
        torch.manual_seed(3)
        assert torch.equal(da.patch_photometric(images, 8, p), outputs[0])  # the CPU default is the indexed form
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
        assert torch.equal(states[0], states[1])  # the same numbers drawn
        assert (outputs[0] != images).flatten(1).any(1).sum() == (8 if isinstance(p, float) else 6)
        unchanged = p == 0 if isinstance(p, torch.Tensor) else torch.zeros(8, dtype=torch.bool)
        assert all(torch.equal(out[unchanged], images[unchanged]) for out in outputs)


def test_device_path_runs_them_after_the_dino_photometrics():
    views = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    probabilities = torch.full((4,), 0.5)
    torch.manual_seed(0)
    ours = da.DevicePhotometric(2, patch_augment_p=0.7, patch_size=8).augment(views, probabilities, probabilities)
    torch.manual_seed(0)
    expected = da.patch_photometric(da.DevicePhotometric(2).augment(views, probabilities, probabilities), 8, 0.7)
    assert torch.equal(ours, expected)
    assert "patch_augment_p=0.7" in repr(da.DevicePhotometric(2, patch_augment_p=0.7))


# ----------------------------------------------------------------------------------------------
# Each op against torchvision's functional op, on tiles.
# ----------------------------------------------------------------------------------------------
def tile_op(name: str, tiles: torch.Tensor, active: torch.Tensor, *values: torch.Tensor, masked: bool,
            blur: str = "authors"):
    """Op ``name`` of ``_tile_ops(blur)`` on the ``active`` tiles, dispatched as on the CPU or as on the device."""
    return da._apply_where(tiles, da._tile_ops(blur)[name], active, values, da._TILE_IDENTITY[name], masked)


@pytest.mark.parametrize("masked", [False, True])
def test_colour_jitter_is_torchvisions_brightness_and_hue_in_either_order(photo, masked):
    tiles = da.to_tiles(photo_tiles(photo, count=2), 16)  # [8, 3, 16, 16]
    brightness, hue = torch.linspace(0.9, 1.1, 8), torch.linspace(-0.1, 0.1, 8)
    first = torch.arange(8) % 2 == 0
    active = torch.arange(8) < 6
    ours = tile_op("jitter", tiles, active, brightness, hue, first, masked=masked)
    for tile, out, b, h, f, a in zip(tiles, ours, brightness.tolist(), hue.tolist(), first, active):
        if not a:
            assert torch.equal(out, tile)
            continue
        expected = (TF.adjust_hue(TF.adjust_brightness(tile, b), h) if f
                    else TF.adjust_brightness(TF.adjust_hue(tile, h), b))
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_sharpness_is_torchvisions_with_factor_two(photo, masked):
    tiles = da.to_tiles(photo_tiles(photo, count=2), 8)
    chosen = torch.arange(len(tiles)) % 3 != 0
    ours = tile_op("sharpness", tiles, torch.ones(len(tiles), dtype=torch.bool), chosen, masked=masked)
    for tile, out, c in zip(tiles, ours, chosen):
        torch.testing.assert_close(out, TF.adjust_sharpness(tile, 2.0) if c else tile, rtol=0, atol=1e-6)
    assert torch.equal(tile_op("sharpness", tiles, torch.zeros(len(tiles), dtype=torch.bool), chosen,
                               masked=masked), tiles)


@pytest.mark.parametrize("masked", [False, True])
def test_posterize_is_torchvisions_with_three_bits(masked):
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    ours = tile_op("posterize", levels.float() / 255, torch.tensor([True, True]), torch.tensor([True, False]),
                   masked=masked)
    assert torch.equal((ours[0] * 255).round().to(torch.uint8), TF.posterize(levels[0], 3))
    assert torch.equal(ours[1], levels[1].float() / 255)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("patch_size", [16, 8])
@pytest.mark.parametrize("blur,kernel_size", [("authors", [1, 5]), ("isotropic", [13, 13])])
def test_blur_is_torchvisions_inside_each_tile(photo, patch_size, masked, blur, kernel_size):
    tiles = da.to_tiles(photo_tiles(photo, size=32, count=1), patch_size)[:3]
    sigma = torch.tensor([0.3, 1.9, 1.0])
    ours = tile_op("blur", tiles, torch.tensor([True, True, False]), sigma, masked=masked, blur=blur)
    for tile, out, s in zip(tiles[:2], ours, sigma.tolist()):
        torch.testing.assert_close(out, TF.gaussian_blur(tile, kernel_size, [s, s]), rtol=0, atol=1e-5)
    assert torch.equal(ours[2], tiles[2])


def impulse_tiles(side: int, count: int = 1) -> torch.Tensor:
    """``count`` tiles ``[count, 3, side, side]``, 0 but for a 1 in the middle pixel ``(side // 2, side // 2)``."""
    tiles = torch.zeros(count, 3, side, side)
    tiles[..., side // 2, side // 2] = 1.0
    return tiles


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("side", [16, 8])
def test_authors_blur_spreads_an_impulse_over_five_rows_of_its_column(side, masked):
    """torchvision's kernel_size (1, 5) is (width, height): vertical only, 5 taps, torchvision's weights."""
    tiles, middle = impulse_tiles(side), side // 2
    for s in (0.6, 1.0, 2.0):
        out = tile_op("blur", tiles, torch.tensor([True]), torch.tensor([s]), masked=masked)[0]
        rows, columns = out.abs().amax(0).nonzero().unbind(1)
        assert rows.tolist() == list(range(middle - 2, middle + 3)) and set(columns.tolist()) == {middle}
        torch.testing.assert_close(out, TF.gaussian_blur(tiles[0], [1, 5], [s, s]), rtol=0, atol=1e-6)


def test_isotropic_blur_spreads_an_impulse_both_ways():
    tiles = impulse_tiles(16)
    out = tile_op("blur", tiles, torch.tensor([True]), torch.tensor([1.0]), masked=False, blur="isotropic")[0]
    rows, columns = out.abs().amax(0).nonzero().unbind(1)
    assert len(set(rows.tolist())) > 5 and len(set(columns.tolist())) > 5  # 3 sigma each way, both ways
    torch.testing.assert_close(out, TF.gaussian_blur(tiles[0], [13, 13], [1.0, 1.0]), rtol=0, atol=1e-6)


def textured_views(count: int = 4, size: int = 64) -> torch.Tensor:
    """Natural-ish views ``[count, 3, size, size]`` in [0, 1]: per channel, sums of gratings of random
    frequency, orientation and phase (edges and texture at many scales and directions), a little noise."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    frequency, angle, phase = (torch.rand(count, 3, 6, 1, 1, generator=generator) * scale
                               for scale in (0.5, math.pi, 2 * math.pi))
    gratings = torch.sin((0.05 + frequency) * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    noise = 0.01 * torch.randn(count, 3, size, size, generator=generator)
    return (gratings.mean(2) / 2 + 0.5 + noise).clamp(0, 1)


def test_authors_blur_changes_pixels_less_than_the_isotropic_one():
    tiles = da.to_tiles(textured_views(), 8)
    sigma = torch.empty(len(tiles)).uniform_(*da.PATCH_BLUR_SIGMA, generator=torch.Generator().manual_seed(1))
    change = {blur: (tile_op("blur", tiles, torch.ones(len(tiles), dtype=torch.bool), sigma, masked=False,
                             blur=blur) - tiles).abs().mean().item() for blur in da.PATCH_BLURS}
    assert 0 < change["authors"] < 0.75 * change["isotropic"]  # about half, measured on this image


def without_other_tile_ops(monkeypatch) -> None:
    """Leave only the blur of the patch-level photometrics: jitter by identity factors, the coin flips never."""
    monkeypatch.setitem(da.PATCH_JITTER, "brightness", (1.0, 1.0))
    monkeypatch.setitem(da.PATCH_JITTER, "hue", (0.0, 0.0))
    monkeypatch.setattr(da, "PATCH_SHARPNESS_P", 0.0)
    monkeypatch.setattr(da, "PATCH_POSTERIZE_P", 0.0)


@pytest.mark.parametrize("path", ["workers", "device"])
def test_both_paths_blur_tiles_with_the_chosen_kernel_the_authors_by_default(monkeypatch, path):
    """An impulse in the middle of every 8-px tile: with the authors' kernel (the default) only its column
    changes, at most 2 rows away; with the isotropic one the neighbouring columns too."""
    without_other_tile_ops(monkeypatch)
    tiles = impulse_tiles(8, count=4 * 4 * 4)
    views = (da.from_tiles(tiles, (4, 3, 32, 32)) * 255).to(torch.uint8)
    changed = {}
    for blur in (None, *da.PATCH_BLURS):
        option = {} if blur is None else {"blur" if path == "workers" else "patch_blur": blur}
        torch.manual_seed(0)
        if path == "workers":
            out = PatchPhotometric(8, **option)(views)
        else:
            out = da.DevicePhotometric(2, **IDENTITY, patch_augment_p=1.0, patch_size=8, **option)([views] * 4)[0]
        changed[blur] = da.to_tiles((out != (views if path == "workers" else da.normalize(views)))[:, :1], 8)[:, 0]
    assert torch.equal(changed[None], changed["authors"])
    rows, columns = changed["authors"].any(0).nonzero().unbind(1)
    assert set(columns.tolist()) == {4} and set(rows.tolist()) == {2, 3, 4, 5, 6}
    assert changed["isotropic"][:, :, [3, 5]].any()


# ----------------------------------------------------------------------------------------------
# The CPU path (data workers) and the device path draw from the same distribution.
# ----------------------------------------------------------------------------------------------
SAMPLES = 15  # x 40 tiles


def tile_statistics(before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
    """Per tile (patch 8) of views in [0, 1], ``[4, T]``: change of the mean (brightness, posterize), of the
    std (blur, sharpness), of the mean neighbour difference (blur, sharpness) and of red minus blue (hue)."""
    def stats(views):
        tiles = torch.cat([da.to_tiles(v.float(), 8) for v in views])
        return torch.stack([tiles.mean((1, 2, 3)), tiles.std((1, 2, 3)), tiles.diff(dim=-1).abs().mean((1, 2, 3)),
                            (tiles[:, 0] - tiles[:, 2]).mean((1, 2))])

    return stats(after) - stats(before)


def cpu_and_plain_views(photo) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Views with (CPU path) and without the patch-level photometrics, same seeds: float in [0, 1]."""
    augmented, plain = [], []
    for seed in range(SAMPLES):
        for p, out in ((1.0, augmented), (0.0, plain)):
            torch.manual_seed(seed)
            views, _ = MultiCropAugmentation(**SMALL, patch_augment_p=p, patch_size=8)(photo)
            out.extend(v[None].float() / 255 for v in views)
    return augmented, plain


def device_views(plain: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same plain views through DevicePhotometric (its own photometrics off), unnormalised to [0, 1].

    One batch per view index, as training stacks them; returned in that order (``device_plain``).
    """
    batches = [(torch.cat(plain[v::4]) * 255).round().to(torch.uint8) for v in range(4)]
    torch.manual_seed(1000)
    outputs = da.DevicePhotometric(2, **IDENTITY, patch_augment_p=1.0, patch_size=8)(batches)
    mean, std = (torch.tensor(x).view(1, 3, 1, 1) for x in (da.IMAGENET_MEAN, da.IMAGENET_STD))
    return [(batch * std + mean)[i:i + 1] for batch in outputs for i in range(len(batch))]


def device_plain(plain: list[torch.Tensor]) -> list[torch.Tensor]:
    """``plain`` in the order of ``device_views``."""
    return [view for v in range(4) for view in plain[v::4]]


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between samples ``a [n]`` and ``b [m]``."""
    values = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, values, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, values, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def same_distribution(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every statistic ``[S, T]`` passes the KS test at level 1e-3 (Bonferroni over S) and has matching means."""
    n, m = a.shape[1], b.shape[1]
    critical = math.sqrt(-0.5 * math.log(1e-3 / len(a) / 2)) * math.sqrt((n + m) / (n * m))
    for x, y in zip(a, b):
        mean_error = math.sqrt(x.var().item() / n + y.var().item() / m)
        if ks_statistic(x, y) > critical or abs(x.mean() - y.mean()).item() > 4 * mean_error:
            return False
    return True


@pytest.fixture(scope="module")
def cpu_sample(photo):
    augmented, plain = cpu_and_plain_views(photo)
    return tile_statistics(plain, augmented), plain


def test_cpu_and_device_paths_agree_in_distribution(cpu_sample):
    cpu, plain = cpu_sample
    device = tile_statistics(device_plain(plain), device_views(plain))
    assert cpu.shape == device.shape == (4, SAMPLES * 40)
    assert same_distribution(cpu, device)


@pytest.mark.parametrize("break_it", ["posterize never", "blur never", "hue never"])
def test_the_agreement_test_sees_a_broken_device_path(cpu_sample, monkeypatch, break_it):
    """The test above has the power to see one op missing on one side (sharpness p=0.5 vs 1 it does not)."""
    cpu, plain = cpu_sample
    if break_it == "posterize never":
        monkeypatch.setattr(da, "PATCH_POSTERIZE_P", 0.0)
    elif break_it == "blur never":  # the default kernel, the one both paths run
        monkeypatch.setitem(da._TILE_BLURS, "authors", lambda tiles, sigma: tiles)
    else:
        monkeypatch.setitem(da.PATCH_JITTER, "hue", (0.0, 0.0))
    device = tile_statistics(device_plain(plain), device_views(plain))
    assert not same_distribution(cpu, device)


# ----------------------------------------------------------------------------------------------
# Validation, description, figure.
# ----------------------------------------------------------------------------------------------
def test_arguments_are_validated():
    with pytest.raises(ValueError, match="does not divide the 96x96 views"):
        MultiCropAugmentation(patch_augment_p=1.0, patch_size=14)
    with pytest.raises(ValueError, match="needs patch_size"):
        MultiCropAugmentation(patch_augment_p=0.5)
    with pytest.raises(ValueError, match=r"patch_augment_p is a probability"):
        MultiCropAugmentation(patch_augment_p=1.5, patch_size=16)
    with pytest.raises(ValueError, match="does not divide the 30x30 views"):
        da.patch_photometric(torch.rand(1, 3, 30, 30), 8)
    with pytest.raises(ValueError, match="RGB views"):
        da.patch_photometric(torch.rand(3, 32, 32), 8)
    with pytest.raises(ValueError, match="positive int"):
        da.DevicePhotometric(2, patch_augment_p=1.0, patch_size=0)
    with pytest.raises(ValueError, match="is a probability"):
        PatchPhotometric(16, p=-0.1)
    with pytest.raises(TypeError, match="uint8"):
        PatchPhotometric(8)(torch.rand(1, 3, 16, 16))
    allowed = r"patch_blur must be one of 'authors', 'isotropic' \('authors': vertical only, 5 taps.*got 'gaussian'"
    for make in (lambda: da.DevicePhotometric(2, patch_augment_p=1.0, patch_size=8, patch_blur="gaussian"),
                 lambda: MultiCropAugmentation(patch_augment_p=1.0, patch_size=16, patch_blur="gaussian"),
                 lambda: PatchPhotometric(8, blur="gaussian"),
                 lambda: da.patch_photometric(torch.rand(1, 3, 16, 16), 8, blur="gaussian")):
        with pytest.raises(ValueError, match=allowed):
            make()
    MultiCropAugmentation(local_crops_number=0, patch_augment_p=1.0, patch_size=32)  # no local view to divide


def test_the_authors_kernel_is_the_default():
    assert da.DevicePhotometric(2).patch_blur == PatchPhotometric(8).blur == "authors"
    assert MultiCropAugmentation(**SMALL, patch_augment_p=1.0, patch_size=8).patch_photometric.blur == "authors"
    for function in (da.patch_photometric, da.random_tile_photometric):
        assert inspect.signature(function).parameters["blur"].default == "authors"


def test_descriptions_say_where_they_run():
    assert "patch photometrics p=1.0 on 8px tiles here (authors blur)" in repr(
        MultiCropAugmentation(**SMALL, patch_augment_p=1.0, patch_size=8))
    assert "patch_blur='isotropic'" in repr(da.DevicePhotometric(2, patch_augment_p=1.0, patch_blur="isotropic"))
    assert "blur='authors'" in repr(PatchPhotometric(8))
    assert "on 8px tiles on the device" in repr(
        MultiCropAugmentation(**SMALL, photometric=False, patch_augment_p=1.0, patch_size=8))
    assert "patch" not in repr(MultiCropAugmentation(**SMALL))


def test_script_draws_a_view_before_and_after(tmp_path):
    args = transforms_patch.get_args_parser().parse_args(
        ["--image", str(ROOT / "test.png"), "--output", str(tmp_path / "patch.png"), "--size", "64",
         "--patch_size", "8"])
    output = transforms_patch.main(args)
    with Image.open(output) as drawing:
        assert drawing.width > 2 * 64 and drawing.height > 64


def test_bench_times_the_recipe_with_and_without_them(tmp_path):
    photos = bench.make_photos(tmp_path, 2, (64, 48))
    args = bench.get_args_parser().parse_args(["--patch_size", "8", "--global_crops_size", "32", "--local_crops_size",
                                               "16", "--local_crops_number", "2", "--augment_images", "2",
                                               "--repeats", "1", "--patch_augment", "true"])
    rows = bench.augment_rows(args, photos)
    names = [row["setting"] for row in rows]
    assert len(rows) == 4 and "ours: full recipe + patch photometrics on 8px tiles, 2x32+2x16px" in names[1]
    assert all(row["views_per_s"] == pytest.approx(4 * row["img_per_s"]) for row in rows)
