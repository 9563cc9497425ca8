"""Dense patch correspondence: exact answers on hand-built views, chance levels, the script end to end."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_correspondence as ec
import vision_transformer as vits
from conftest import PHOTOS, TINY_BACKBONE_ARGS, write_images

PATCH = 4
CPU = torch.device("cpu")


# The earlier protocol's equal views: the query as large as the reference, no colour change.
EQUAL_VIEWS = ("--query_size", "16", "--photometric", "false")


def parse(*extra: str):
    return ec.get_args_parser().parse_args(TINY_BACKBONE_ARGS + ["--device", "cpu", "--size", "16", *extra])


def final_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("FINAL "))[len("FINAL "):])


@pytest.fixture(scope="module")
def square_photos(tmp_path_factory) -> Path:
    """The fixture photos, centre-cropped square and shrunk to 32 x 32, in a flat folder."""
    folder = tmp_path_factory.mktemp("square")
    for path in PHOTOS:
        with Image.open(path) as photo:
            side = min(photo.size)
            box = ((photo.width - side) // 2, (photo.height - side) // 2)
            square = photo.convert("RGB").crop((*box, box[0] + side, box[1] + side))
            square.resize((32, 32), Image.BICUBIC).save(folder / f"{path.stem}.png")
    return folder


@pytest.fixture(scope="module")
def random_images(tmp_path_factory) -> Path:
    """Twelve random 40 x 32 images in two class folders."""
    return write_images(tmp_path_factory.mktemp("random") / "data")


def pixel_means(images: torch.Tensor) -> torch.Tensor:
    """A feature function: each patch's token is its mean colour, ``[B, N, 3]``."""
    return F.avg_pool2d(images, PATCH).flatten(2).transpose(1, 2)


def position_codes(images: torch.Tensor) -> torch.Tensor:
    """A feature function blind to content: each patch's token is the one-hot code of its position."""
    num_patches = (images.shape[-1] // PATCH) ** 2
    return torch.eye(num_patches).expand(len(images), -1, -1)


def colour_block_pair(grid: int) -> ec.PairBatch:
    """A reference view of flat, distinct colour blocks (one per patch) and the same view flipped as query."""
    colours = torch.randint(0, 256, (3, grid, grid), generator=torch.Generator().manual_seed(grid), dtype=torch.uint8)
    reference = colours.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[None]
    size = grid * PATCH
    geometry = torch.tensor([[0.0, 0.0, size, size, 0.0, size]], dtype=torch.float64)
    flipped = geometry.clone()
    flipped[:, 4] = 1.0
    return ec.PairBatch(reference, reference.flip(-1), geometry, flipped, ["blocks"])


# ----------------------------------------------------------------------------------------------
# Exact answers.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["random_init", "trained"])
def test_identical_views_match_every_patch(weights, square_photos, request, capsys):
    weight_args = ["--random_init"] if weights == "random_init" else \
        ["--pretrained_weights", str(request.getfixturevalue("trained_checkpoint"))]
    result = ec.main(parse("--data_path", str(square_photos), "--reference_scale", "1", "1", "--query_scale", "1", "1",
                           "--flip_p", "0", *EQUAL_VIEWS, *weight_args))
    assert result["all"]["pairs"] == len(PHOTOS) * 16
    assert result["all"]["accuracy"] == 100.0 and result["all"]["within_one"] == 100.0
    assert result["all"]["mean_error"] == 0.0


@pytest.mark.parametrize("grid", [3, 4])
def test_flipped_query_gives_the_analytic_answers(grid):
    pair = colour_block_pair(grid)
    predicted, truth, textured = ec.evaluate_batch(pair, pixel_means, PATCH, 10.0, CPU)
    columns = torch.arange(grid)
    assert torch.equal(truth.view(grid, grid) % grid, (grid - 1 - columns).expand(grid, grid))  # the mirror
    metrics = ec.correspondence_metrics(predicted, truth, textured, grid)
    assert metrics["all"]["accuracy"] == 100.0 and metrics["all"]["mean_error"] == 0.0
    assert not textured.any()  # flat blocks have no texture: an empty block with nulls
    without_floors = [name for name in ec.METRIC_NAMES if not name.startswith(ec.FLOORS)]  # none were given
    assert json.loads(json.dumps(metrics["textured"])) == {"pairs": 0, **{name: None for name in without_floors}}

    # Content-blind tokens predict the query's own position; only the middle column (odd grids) is its mirror.
    predicted, truth, textured = ec.evaluate_batch(pair, position_codes, PATCH, 10.0, CPU)
    metrics = ec.correspondence_metrics(predicted, truth, textured, grid)["all"]
    offsets = (grid - 1 - 2 * columns).abs().double()
    assert metrics["pairs"] == grid * grid
    assert metrics["accuracy"] == pytest.approx(100.0 / grid if grid % 2 else 0.0)
    assert metrics["within_one"] == pytest.approx(100.0 * (offsets <= 1).double().mean().item())
    assert metrics["mean_error"] == pytest.approx(offsets.mean().item())


def test_texture_is_the_pixel_spread_of_the_true_reference_patch():
    pair = colour_block_pair(4)
    stripes = torch.tensor([[0], [40]], dtype=torch.uint8).repeat(PATCH // 2, PATCH)  # standard deviation 20
    pair.reference[0, :, :PATCH, :PATCH] = stripes + torch.tensor([0, 100, 200], dtype=torch.uint8).view(3, 1, 1)
    # Cell 0: striped, on a different level per channel; cell 1: flat colour, which is no texture.
    assert ec.patch_pixel_std(pair.reference, PATCH)[0, :2].tolist() == pytest.approx([20.0, 0.0])
    _, truth, textured = ec.evaluate_batch(pair, pixel_means, PATCH, 19.5, CPU)
    assert torch.equal(textured, truth == 0)  # only the query patch whose partner is cell 0
    assert not ec.evaluate_batch(pair, pixel_means, PATCH, 20.5, CPU)[2].any()


def test_backbone_features_concatenate_normalised_blocks():
    args = ec.get_args_parser().parse_args(TINY_BACKBONE_ARGS + ["--depth", "2", "--random_init"])
    model = vits.build_frozen_backbone(args, img_size=16)
    tokens = ec.backbone_patch_features(model, 2)(torch.randn(3, 3, 16, 16))
    assert tokens.shape == (3, 16, 64)
    assert torch.allclose(tokens.view(3, 16, 2, 32).norm(dim=-1), torch.ones(3, 16, 2))


def test_predictions_take_the_most_cosine_similar_reference_token():
    reference = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    query = torch.tensor([[[5.0, 0.2], [0.1, 3.0], [-1.0, -0.5], [-0.2, -1.0]]])  # scale does not matter
    assert ec.correspondence_predictions(reference, query).tolist() == [[0, 1, 2, 2]]


# ----------------------------------------------------------------------------------------------
# Metrics and chance levels.
# ----------------------------------------------------------------------------------------------
def brute_force_chance(truth: list[int], grid: int) -> tuple[float, float, float]:
    """Exact, within-one (percent) and mean error of a uniform guess, by listing every guess."""
    exact = within = error = 0.0
    for true_cell in truth:
        row, col = divmod(true_cell, grid)
        for guess in range(grid * grid):
            guess_row, guess_col = divmod(guess, grid)
            exact += guess == true_cell
            within += max(abs(guess_row - row), abs(guess_col - col)) <= 1
            error += ((guess_row - row) ** 2 + (guess_col - col) ** 2) ** 0.5
    count = len(truth) * grid * grid
    return 100 * exact / count, 100 * within / count, error / count


@pytest.mark.parametrize("grid", [1, 3, 4])
def test_chance_levels_match_brute_force(grid):
    truth = torch.tensor(list(range(grid * grid)) + [0, grid * grid - 1, grid // 2])
    metrics = ec.block_metrics(torch.zeros_like(truth), truth, grid)
    expected = brute_force_chance(truth.tolist(), grid)
    actual = (metrics["chance_accuracy"], metrics["chance_within_one"], metrics["chance_mean_error"])
    assert actual == pytest.approx(expected)


def test_metrics_of_known_predictions():
    # 3x3 grid: right, a side neighbour, a corner neighbour, two cells off diagonally, and one not evaluated.
    predicted = torch.tensor([[4, 5, 0, 8, 3]])
    truth = torch.tensor([[4, 4, 4, 0, -1]])
    textured = torch.tensor([[True, False, True, False, True]])
    metrics = ec.correspondence_metrics(predicted, truth, textured, 3)
    assert metrics["all"]["pairs"] == 4
    assert metrics["all"]["accuracy"] == 25.0 and metrics["all"]["within_one"] == 75.0
    assert metrics["all"]["mean_error"] == pytest.approx((0 + 1 + 2 ** 0.5 + 8 ** 0.5) / 4)
    assert metrics["textured"]["pairs"] == 2 and metrics["textured"]["accuracy"] == 50.0


# ----------------------------------------------------------------------------------------------
# The script.
# ----------------------------------------------------------------------------------------------
def test_script_writes_json_final_line_and_figures(random_images, tmp_path, capsys):
    output, figures = tmp_path / "out" / "corr.json", tmp_path / "figures"
    result = ec.main(parse("--random_init", "--data_path", str(random_images), "--num_images", "5", "--batch_size",
                           "2", "--output_json", str(output), "--visualize", "2", str(figures)))
    printed = capsys.readouterr().out
    assert final_line(printed) == json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert {"eval", "weights", "settings", "images", "all", "textured"} <= set(result)
    assert result["eval"] == "correspondence" and result["weights"] == "random_init" and result["images"] == 5
    assert set(result["all"]) == {"pairs", *ec.METRIC_NAMES} == set(result["textured"])
    assert result["settings"]["size"] == 16 and result["settings"]["reference_scale"] == [0.4, 1.0]
    assert 0 < result["all"]["pairs"] <= 5 * 16 and "chance" in printed
    written = sorted(figures.glob("*.png"))
    assert [path.name for path in written] == ["correspondence_000.png", "correspondence_001.png"]
    for path in written:  # the 16 px reference upscaled to 256 px, the 8 px query by the same factor
        with Image.open(path) as figure:
            assert figure.width >= 256 + 128 and figure.height >= 256


@pytest.mark.parametrize("extra, message", [
    (["--size", "18"], r"--size 18 is not a multiple of --patch_size 4"),
    (["--size", "2"], r"--size 2 is smaller than one patch"),
    (["--query_scale", "0.6", "0.2"], r"--query_scale 0.6 0.2 must satisfy 0 < MIN <= MAX <= 1"),
    (["--reference_scale", "0", "1"], r"--reference_scale 0.0 1.0 must satisfy"),
    (["--flip_p", "1.5"], r"--flip_p must lie in \[0, 1\]"),
    (["--num_images", "0"], r"--num_images must be positive"),
    (["--visualize", "two", "figures"], r"--visualize N DIR needs a positive number"),
])
def test_bad_arguments_are_named(extra, message, random_images):
    with pytest.raises(ValueError, match=message):
        ec.main(parse("--random_init", "--data_path", str(random_images), *extra))


def test_a_folder_without_images_is_named(tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=r"no images found in .*empty"):
        ec.main(parse("--random_init", "--data_path", str(tmp_path / "empty")))


def test_weights_of_another_model_are_refused(trained_checkpoint, random_images):
    argv = list(TINY_BACKBONE_ARGS)
    argv[argv.index("--embed_dim") + 1] = "48"  # the checkpoint's backbone is 32 wide
    args = ec.get_args_parser().parse_args(argv + ["--device", "cpu", "--size", "16", "--data_path",
                                                   str(random_images), "--pretrained_weights", str(trained_checkpoint)])
    with pytest.raises(ValueError, match=r"--embed_dim 48 contradicts the weights' 32 .*: drop --embed_dim or give 32"):
        ec.main(args)


# ----------------------------------------------------------------------------------------------
# Every model sees the same pairs.
# ----------------------------------------------------------------------------------------------
def recorded_run(args, images) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Summary plus every reference and query view the feature function was given, in order."""
    seen = []

    def recording_pixel_means(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch)
        return pixel_means(batch)

    summary = ec.run_evaluation(args, images, recording_pixel_means, CPU)
    if ec.query_size_of(args.size, args.patch_size, args.query_size) == args.size:  # both views in one pass
        references, queries = zip(*(batch.chunk(2) for batch in seen))
    else:  # a pass per view size, the reference's first
        references, queries = seen[0::2], seen[1::2]
    return summary, torch.cat(references), torch.cat(queries)


def test_pairs_do_not_depend_on_batch_size_or_subset(random_images):
    images = ec.select_images(random_images, 7, seed=0)
    assert len(images) == 7 and len({path.parent.name for _, path in images}) == 2  # spans both classes
    one_by_one = recorded_run(parse("--data_path", str(random_images), "--batch_size", "1"), images)
    in_threes = recorded_run(parse("--data_path", str(random_images), "--batch_size", "3"), images)
    assert one_by_one[0] == in_threes[0]
    assert torch.equal(one_by_one[1], in_threes[1]) and torch.equal(one_by_one[2], in_threes[2])

    # An image's views depend on (seed, image) only: the same in a smaller subset, other with another seed.
    sampler = ec.ViewPairSampler.from_args(parse())
    alone = ec.build_view_pairs(images[3:4], sampler)
    together = ec.build_view_pairs(images, sampler)
    assert torch.equal(alone.reference[0], together.reference[3]) and torch.equal(alone.query[0], together.query[3])
    other_seed = ec.build_view_pairs(images[3:4], ec.ViewPairSampler.from_args(parse("--seed", "1")))
    assert not torch.equal(other_seed.reference_geometry, alone.reference_geometry)


def test_photometrics_leave_the_geometry_alone(random_images):
    images = ec.select_images(random_images, 3, seed=0)
    plain = ec.build_view_pairs(images, ec.ViewPairSampler.from_args(parse("--photometric", "false")))
    coloured = ec.build_view_pairs(images, ec.ViewPairSampler.from_args(parse()))
    assert torch.equal(plain.reference_geometry, coloured.reference_geometry)
    assert torch.equal(plain.query_geometry, coloured.query_geometry)
    assert not torch.equal(plain.reference, coloured.reference)
    assert np.isfinite(ec.correspondence_metrics(*ec.evaluate_batch(coloured, pixel_means, PATCH, 10.0, CPU), 4)
                       ["all"]["accuracy"])


def test_non_finite_weights_are_refused(trained_checkpoint, random_images, tmp_path):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["teacher"]["backbone.cls_token"][0, 0, 5] = float("-inf")
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(RuntimeError, match=r"checkpoint.pth are not finite: tensor cls_token holds NaN or infinity; "
                                           r"this is a training checkpoint \(epoch 1\): the training run diverged"):
        ec.main(parse("--data_path", str(random_images), "--pretrained_weights", str(tmp_path / "checkpoint.pth")))


# ----------------------------------------------------------------------------------------------
# Position-only floors and query views of their own size.
# ----------------------------------------------------------------------------------------------
def brute_force_floor(reference_geometry, query_geometry, reference_grid: int, query_grid: int,
                      flip_aware: bool) -> list[list[int]]:
    """Per pair, the reference cell under each query cell's relative place, by explicit loops."""
    answers = []
    for ref, qry in zip(reference_geometry.tolist(), query_geometry.tolist()):
        mirrored = flip_aware and (ref[4] > 0) != (qry[4] > 0)
        cells = []
        for row in range(query_grid):
            for col in range(query_grid):
                ref_row = math.floor((row + 0.5) / query_grid * reference_grid)
                ref_col = math.floor((col + 0.5) / query_grid * reference_grid)
                cells.append(ref_row * reference_grid + (reference_grid - 1 - ref_col if mirrored else ref_col))
        answers.append(cells)
    return answers


def brute_force_scores(predicted: list[list[int]], truth: list[list[int]], grid: int) -> tuple[float, float, float]:
    exact = within = error = count = 0
    for guesses, answers in zip(predicted, truth):
        for guess, answer in zip(guesses, answers):
            if answer < 0:
                continue
            (g_row, g_col), (t_row, t_col) = divmod(guess, grid), divmod(answer, grid)
            count += 1
            exact += guess == answer
            within += max(abs(g_row - t_row), abs(g_col - t_col)) <= 1
            error += math.hypot(g_row - t_row, g_col - t_col)
    return 100 * exact / count, 100 * within / count, error / count


@pytest.mark.parametrize("query_size", [16, 8, 24])
def test_position_floors_match_a_brute_force_count(random_images, query_size):
    sampler = ec.ViewPairSampler(16, (0.3, 1.0), (0.05, 0.5), 0.5, False, seed=3, query_size=query_size)
    pairs = ec.build_view_pairs(ec.select_images(random_images, 12, 0), sampler)
    truth = ec.ground_truth_cells(pairs.reference_geometry, pairs.query_geometry, PATCH)
    assert pairs.query.shape[-1] == query_size and truth.shape == (12, (query_size // PATCH) ** 2)
    floors = ec.position_floors(pairs, PATCH)
    metrics = ec.correspondence_metrics(torch.zeros_like(truth), truth, torch.ones_like(truth, dtype=torch.bool),
                                        4, floors)["all"]
    for name in ec.FLOORS:
        expected = brute_force_floor(pairs.reference_geometry, pairs.query_geometry, 4, query_size // PATCH,
                                     flip_aware=name == "flip_aware")
        assert floors[name].tolist() == expected
        actual = tuple(metrics[f"{name}_{score}"] for score in ec.SCORES)
        assert actual == pytest.approx(brute_force_scores(expected, truth.tolist(), 4))


def test_floors_on_a_mirrored_pair_same_cell_misses_and_flip_aware_is_exact():
    pair = colour_block_pair(4)  # identical crops, only the query is flipped
    truth = ec.ground_truth_cells(pair.reference_geometry, pair.query_geometry, PATCH)
    floors = ec.position_floors(pair, PATCH)
    assert torch.equal(floors["flip_aware"], truth)
    assert torch.equal(floors["same_cell"], torch.arange(16)[None])  # the query's own cell, never the mirror here


def test_query_view_of_its_own_size_matches_identical_crops_exactly(square_photos):
    result = ec.main(parse("--data_path", str(square_photos), "--reference_scale", "1", "1", "--query_scale", "1", "1",
                           "--flip_p", "0", "--query_size", "8", "--random_init"))
    assert result["all"]["pairs"] == len(PHOTOS) * 4  # the 2 x 2 query grid
    assert result["settings"]["query_size"] == 8
    # Without crops or flips, the relative place is the answer: both floors are exact.
    assert result["all"]["same_cell_accuracy"] == result["all"]["flip_aware_accuracy"] == 100.0


def test_summary_table_prints_chance_and_both_floors(random_images, capsys):
    ec.main(parse("--random_init", "--data_path", str(random_images), "--num_images", "4"))
    printed = capsys.readouterr().out
    assert "same cell" in printed and "flip-aware cell" in printed and "chance" in printed


def test_query_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="--query_size 10 is not a positive multiple of --patch_size 4"):
        ec.validate_args(parse("--random_init", "--data_path", ".", "--query_size", "10"))


@pytest.mark.parametrize("size, patch, expected", [(224, 16, 112), (32, 8, 16), (8, 8, 8), (36, 4, 16), (48, 16, 16)])
def test_default_query_is_half_the_reference_in_whole_patches(size, patch, expected):
    assert ec.query_size_of(size, patch, None) == expected
    assert ec.query_size_of(size, patch, size) == size  # the earlier protocol's equal views, when asked for


def test_default_protocol_cuts_the_query_like_a_local_view_and_records_it(random_images):
    args = parse("--random_init", "--data_path", str(random_images))
    assert (args.query_scale, args.photometric, args.query_size) == ((0.05, 0.4), True, None)
    sampler = ec.ViewPairSampler.from_args(args)
    pairs = ec.build_view_pairs(ec.select_images(random_images, 2, seed=0), sampler)
    assert pairs.reference.shape[-1] == 16 and pairs.query.shape[-1] == 8
    assert ec.settings_of(args)["query_size"] == 8
    old = ec.ViewPairSampler.from_args(parse("--query_scale", "0.2", "0.6", *EQUAL_VIEWS))
    assert ec.build_view_pairs(ec.select_images(random_images, 2, seed=0), old).query.shape[-1] == 16


def test_unwritable_outputs_are_named_before_the_model_is_built(tmp_path, weights_not_to_load):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    (tmp_path / "data").mkdir()
    given = ("--pretrained_weights", str(weights_not_to_load), "--data_path", str(tmp_path / "data"))
    with pytest.raises(NotADirectoryError,
                       match=r"the folder of --output_json .*a_file/c.json .*a_file cannot be a folder"):
        ec.main(parse(*given, "--output_json", str(blocker / "c.json")))
    with pytest.raises(NotADirectoryError, match=r"the folder of --visualize N DIR .*a_file/figures cannot be a "
                                                 r"folder: .*a_file is a file"):
        ec.main(parse(*given, "--visualize", "2", str(blocker / "figures")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "data"]
