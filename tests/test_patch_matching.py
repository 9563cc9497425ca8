"""Patch matching: hand-worked cases, reference vs batched agreement, centre-rule precision, demo."""
import statistics

import pytest
import torch
from PIL import Image

import patch_matching
import utils
from conftest import random_geometries
from test_transforms_patch import write_16_bit_gradient
from patch_matching import floor_linspace, match_patches, match_patches_batched, pairs_from_map
from transforms_patch import RandomHorizontalFlipWithGeometry, RandomResizedCropWithGeometry, ViewGeometry


def token(row, col, grid):
    return 1 + row * grid + col


@pytest.mark.parametrize("mode", ["upstream", "centre"])
def test_identical_views_match_every_patch_to_itself(mode):
    view = (10, 20, 160, 160, 0, 224)
    teacher, student = match_patches(view, view, 16, mode)
    assert teacher == student == list(range(1 + 14 * 14))


@pytest.mark.parametrize("mode", ["upstream", "centre"])
def test_flipped_copy_matches_mirrored_columns(mode):
    teacher, student = match_patches((0, 0, 96, 96, 0, 96), (0, 0, 96, 96, 1, 96), 16, mode)
    grid = 6
    expected = {token(r, c, grid): token(r, grid - 1 - c, grid) for r in range(grid) for c in range(grid)}
    assert teacher[0] == student[0] == 0
    assert dict(zip(student[1:], teacher[1:])) == expected


@pytest.mark.parametrize("mode", ["upstream", "centre"])
def test_disjoint_crops_give_cls_pair_only(mode):
    assert match_patches((0, 0, 100, 100, 0, 224), (0, 100, 100, 100, 0, 96), 16, mode) == ([0], [0])
    assert match_patches((0, 0, 100, 100, 1, 224), (150, 0, 50, 50, 1, 96), 16, mode) == ([0], [0])


def test_centred_sub_crop_upstream_by_hand():
    # Teacher: the whole 224x224 image at 224 px (14x14 grid of /16 patches).
    # Student: the centred box [56, 168) at 96 px (6x6 grid).
    # Teacher block: first = rnd(14 * 56/224) = rnd(3.5) = 4 (half to even), count = rnd(7.0) = 7,
    # i.e. cells 4..10. Student block: all 6 cells. Teacher is larger, so its cells are taken at
    # floor(linspace(0, 6, 6)) = [0, 1, 2, 3, 4, 6] -> cells [4, 5, 6, 7, 8, 10].
    teacher, student = match_patches((0, 0, 224, 224, 0, 224), (56, 56, 112, 112, 0, 96), 16)
    cells = [4, 5, 6, 7, 8, 10]
    assert student == [0] + list(range(1, 37))
    assert teacher == [0] + [token(r, c, 14) for r in cells for c in cells]


def test_round_half_to_even_and_slivers_by_hand():
    # Rows: intersection [0, 50) of teacher [0, 100) (P=6): first 0, count rnd(3.0)=3.
    # Student [0, 50) at P=6: first 0, count 6. Teacher smaller -> student rows floor(linspace(0,5,3)) = [0, 2, 5].
    # Columns: intersection [25, 100); teacher first rnd(6*0.25)=rnd(1.5)=2, count rnd(4.5)=4 -> 2..5;
    # student [25, 125): first 0, count rnd(6*0.75)=rnd(4.5)=4 -> 0..3. Equal sizes.
    teacher, student = match_patches((0, 0, 100, 100, 0, 96), (0, 25, 50, 100, 0, 96), 16)
    assert teacher == [0] + [token(r, c, 6) for r in (0, 1, 2) for c in (2, 3, 4, 5)]
    assert student == [0] + [token(r, c, 6) for r in (0, 2, 5) for c in (0, 1, 2, 3)]
    # A sliver under half a patch wide rounds to an empty block: count rnd(6*0.08) = 0.
    assert match_patches((0, 0, 100, 100, 0, 96), (0, 92, 100, 8, 0, 96), 16) == ([0], [0])


def test_floor_linspace_is_exact_integer_floor():
    assert floor_linspace(7, 6) == [0, 1, 2, 3, 4, 6]
    assert floor_linspace(5, 1) == [0]
    assert floor_linspace(5, 0) == []
    assert floor_linspace(3, 3) == [0, 1, 2]


def test_upstream_properties_on_random_views():
    generator = torch.Generator().manual_seed(0)
    teachers = random_geometries(generator, 300, 224)
    students = random_geometries(generator, 300, 96)
    for t_geom, s_geom in zip(teachers, students):
        t_tokens, s_tokens = match_patches(t_geom, s_geom, 16)
        assert len(set(t_tokens)) == len(t_tokens) and len(set(s_tokens)) == len(s_tokens)
        assert all(0 < t <= 196 for t in t_tokens[1:]) and all(0 < s <= 36 for s in s_tokens[1:])


def _assert_batched_agrees(teachers, students, patch_size, mode):
    patch_map = match_patches_batched(teachers, students, patch_size, mode)
    grid_s = int(students[0, 5]) // patch_size
    assert patch_map.shape == (len(students), 1 + grid_s * grid_s) and patch_map.dtype == torch.int64
    for row, t_geom, s_geom in zip(patch_map, teachers, students):
        t_ref, s_ref = match_patches(t_geom, s_geom, patch_size, mode)
        expected = torch.full_like(row, -1)
        expected[s_ref] = torch.tensor(t_ref)
        if not torch.equal(row, expected):
            raise AssertionError(f"{mode} p{patch_size}: {t_geom.tolist()} vs {s_geom.tolist()}\n"
                                 f"batched {row.tolist()}\nreference {expected.tolist()}")


@pytest.mark.parametrize("mode", ["upstream", "centre"])
@pytest.mark.parametrize("patch_size", [8, 16, 32])
def test_batched_agrees_with_reference_on_random_geometries(mode, patch_size):
    generator = torch.Generator().manual_seed(patch_size)
    count = 600
    globals_a = random_geometries(generator, count, 224)
    globals_b = random_geometries(generator, count, 224)
    locals_ = random_geometries(generator, count, 96)
    _assert_batched_agrees(globals_a, globals_b, patch_size, mode)  # global-global
    _assert_batched_agrees(globals_a, locals_, patch_size, mode)  # global-local
    _assert_batched_agrees(locals_, globals_a, patch_size, mode)  # student larger than teacher


def _augmentation_geometries(count, size, scale):
    """``[count, 6]`` geometries drawn by the training crop and flip on a 256 x 256 image."""
    image = Image.new("RGB", (256, 256))
    crop, flip = RandomResizedCropWithGeometry(size, scale=scale), RandomHorizontalFlipWithGeometry()
    return torch.stack([flip(*crop(image))[1].to_tensor() for _ in range(count)])


@pytest.mark.parametrize("mode", ["upstream", "centre"])
def test_batched_agrees_on_training_like_views(mode):
    torch.manual_seed(1)
    globals_ = _augmentation_geometries(500, 224, (0.4, 1.0))
    locals_ = _augmentation_geometries(500, 96, (0.05, 0.4))
    _assert_batched_agrees(globals_, locals_, 16, mode)
    _assert_batched_agrees(globals_, globals_.roll(1, 0), 16, mode)


def test_typical_pair_counts_match_method():
    # docs/method.md section 3: about 131 global-global and 29 global-local pairs at patch 16.
    torch.manual_seed(0)
    globals_a, globals_b = (_augmentation_geometries(1500, 224, (0.4, 1.0)) for _ in range(2))
    locals_ = _augmentation_geometries(1500, 96, (0.05, 0.4))
    global_pairs = (match_patches_batched(globals_a, globals_b, 16)[:, 1:] >= 0).sum(1).double().mean()
    local_pairs = (match_patches_batched(globals_a, locals_, 16)[:, 1:] >= 0).sum(1).double().mean()
    assert 124 < global_pairs < 138 and 26.5 < local_pairs < 31.5


def _patch_centre(geometry, token_index, patch_size):
    """Source-image centre (y, x) of a token of a view."""
    geometry = ViewGeometry.from_sequence(geometry)
    grid = geometry.size // patch_size
    row, col = divmod(token_index - 1, grid)
    col = grid - 1 - col if geometry.flipped else col
    return (geometry.top + (row + 0.5) * geometry.height / grid,
            geometry.left + (col + 0.5) * geometry.width / grid)


def test_centre_mode_pairs_lie_within_half_a_teacher_patch():
    generator = torch.Generator().manual_seed(3)
    teachers = random_geometries(generator, 200, 224)
    students = random_geometries(generator, 200, 96)
    checked = 0
    for t_geom, s_geom in zip(teachers, students):
        t_tokens, s_tokens = match_patches(t_geom, s_geom, 16, "centre")
        half_h, half_w = t_geom[2].item() / 14 / 2, t_geom[3].item() / 14 / 2
        for t_token, s_token in zip(t_tokens[1:], s_tokens[1:]):
            (ty, tx), (sy, sx) = _patch_centre(t_geom, t_token, 16), _patch_centre(s_geom, s_token, 16)
            assert abs(ty - sy) <= half_h + 1e-9 and abs(tx - sx) <= half_w + 1e-9
            checked += 1
    assert checked > 1000


def _centre_errors(teacher, student, patch_size):
    """Per matched pair: distance of the two patch centres, in patches of the coarser grid, worst axis."""
    grid_t, grid_s = teacher[5].item() // patch_size, student[5].item() // patch_size
    errors = []
    for t_token, s_token in zip(*(tokens[1:] for tokens in match_patches(teacher, student, patch_size))):
        t_centre, s_centre = _patch_centre(teacher, t_token, patch_size), _patch_centre(student, s_token, patch_size)
        errors.append(max(abs(t_centre[axis] - s_centre[axis]) / max(teacher[extent] / grid_t, student[extent] / grid_s)
                          for axis, extent in ((0, 2), (1, 3))).item())
    return errors


def test_upstream_accuracy_matches_method():
    # docs/method.md section 3: over pairs drawn like training views, matched centres lie a median
    # ~0.48 and at most ~1.6 coarser-grid patches apart.
    torch.manual_seed(2)
    num_images, num_locals = 120, 8
    teachers, others = (_augmentation_geometries(num_images, 224, (0.4, 1.0)) for _ in range(2))
    locals_ = _augmentation_geometries(num_images * num_locals, 96, (0.05, 0.4)).view(num_images, num_locals, 6)
    errors = []
    for teacher, other, local_views in zip(teachers, others, locals_):
        for student in [other, *local_views]:
            errors += _centre_errors(teacher, student, 16)
    assert len(errors) > 30000
    assert 0.42 < statistics.median(errors) < 0.54 and 1.2 < max(errors) < 1.7


def test_pairs_from_map_round_trips():
    teacher, student = (0, 0, 224, 224, 1, 224), (40, 30, 100, 120, 0, 96)
    patch_map = match_patches_batched(torch.tensor([teacher]), torch.tensor([student]), 16)
    t_list, s_list = pairs_from_map(patch_map[0])
    assert sorted(zip(s_list, t_list)) == sorted(zip(*reversed(match_patches(teacher, student, 16))))


def test_batched_checks_its_inputs():
    empty = torch.zeros(0, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        match_patches_batched(empty, empty, 16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        match_patches_batched(torch.tensor([[0, 0, 10, 10, 0, 100.0]]), torch.tensor([[0, 0, 10, 10, 0, 96.0]]), 16)
    with pytest.raises(ValueError, match="share one size"):
        student = torch.tensor([[0, 0, 10, 10, 0, 96.0], [0, 0, 10, 10, 0, 64.0]])
        match_patches_batched(student, student, 16)
    with pytest.raises(ValueError, match="unknown matching mode"):
        match_patches((0, 0, 1, 1, 0, 16), (0, 0, 1, 1, 0, 16), 16, mode="nearest")
    with pytest.raises(ValueError, match="\\[B, 6\\]"):
        match_patches_batched(torch.zeros(3, 5), torch.zeros(3, 5), 16)


def test_demo_writes_png_and_prints_lists(root, tmp_path, capsys):
    output = tmp_path / "result.png"
    args = patch_matching.get_args_parser().parse_args(["--image", str(root / "test.png"), "--output", str(output)])
    teacher, student = patch_matching.main(args)
    printed = capsys.readouterr().out
    assert f"teacher tokens: {teacher}" in printed and f"student tokens: {student}" in printed
    assert teacher[0] == student[0] == 0 and len(teacher) == len(student) > 1
    with Image.open(output) as image:
        assert image.format == "PNG" and image.width > 224 * 2
        image.verify()


def test_demo_rejects_missing_image_and_bad_patch_size(tmp_path):
    parser = patch_matching.get_args_parser()
    with pytest.raises(FileNotFoundError, match="--image"):
        patch_matching.main(parser.parse_args(["--image", str(tmp_path / "missing.png")]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_matching.main(parser.parse_args(["--patch_size", "20"]))


def test_demo_reads_16_bit_images_and_checks_its_output_first(tmp_path):
    path, output = write_16_bit_gradient(tmp_path / "deep.png"), tmp_path / "out" / "result.png"
    parser = patch_matching.get_args_parser()
    sizes = ["--global_size", "64", "--local_size", "32", "--patch_size", "32"]  # 2 x 2 teacher patches, 1 student
    teacher, _ = patch_matching.main(parser.parse_args(["--image", str(path), "--output", str(output), *sizes]))
    torch.manual_seed(8)  # the demo's default --seed
    (view, _), _ = patch_matching.draw_views(utils.read_rgb_image(path), 64, 32, (0.4, 1.0), (0.05, 0.4))
    zoomed = view.resize((128, 128), Image.NEAREST)
    with Image.open(output) as drawing:
        drawn = drawing.convert("RGB")
    unmatched = sorted({1, 2, 3, 4} - set(teacher))
    assert unmatched
    for token in unmatched:  # a patch without a match is drawn as is: compare its corner away from number and grid
        row, col = divmod(token - 1, 2)
        box = (64 * col + 32, 64 * row + 32, 64 * col + 60, 64 * row + 60)
        corner = drawn.crop((12 + box[0], 28 + box[1], 12 + box[2], 28 + box[3]))
        assert corner.tobytes() == zoomed.crop(box).tobytes()
    assert zoomed.convert("L").getextrema()[0] < 200  # the view is the gradient, not white
    (tmp_path / "a_file").write_text("")
    missing = ["--image", str(tmp_path / "missing.png")]  # the output is checked before the image is read
    with pytest.raises(IsADirectoryError, match=rf"--output {tmp_path} is a folder; give a file name"):
        patch_matching.main(parser.parse_args(missing + ["--output", str(tmp_path)]))
    with pytest.raises(NotADirectoryError, match=r"--output .*a_file/x.png .*a_file cannot be a "
                                                 r"folder: .*a_file is a file"):
        patch_matching.main(parser.parse_args(missing + ["--output", str(tmp_path / "a_file" / "x.png")]))
