"""DAVIS label propagation: the propagation core on synthetic videos, J and F by hand, the script end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_video_segmentation as ev
import utils
from conftest import TINY_BACKBONE_ARGS

SIZE, PATCH = 64, 4
SETTINGS = ev.PropagationSettings()  # DINO's defaults: top 5, 7 frames, window 12, T 0.1


# ----------------------------------------------------------------------------------------------
# Synthetic videos: a textured square moving over a static textured background.
# ----------------------------------------------------------------------------------------------
def synthetic_video(frames: int = 5, step: int = 4, side: int = 36, top: int = 16, left: int = 8,
                    seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(frames, masks)``: uint8 RGB ``[SIZE, SIZE, 3]`` and uint8 ids ``[SIZE, SIZE]`` (object 1). The square
    moves ``step`` px to the right per frame and carries its own texture (reddish noise) over a green one."""
    rng = np.random.default_rng(seed)
    background = np.stack([rng.integers(0, 90, (SIZE, SIZE)), rng.integers(110, 256, (SIZE, SIZE)),
                           rng.integers(0, 90, (SIZE, SIZE))], axis=-1).astype(np.uint8)
    texture = np.stack([rng.integers(170, 256, (side, side)), rng.integers(0, 120, (side, side)),
                        rng.integers(60, 160, (side, side))], axis=-1).astype(np.uint8)
    images, masks = [], []
    for index in range(frames):
        image, mask = background.copy(), np.zeros((SIZE, SIZE), dtype=np.uint8)
        x = left + index * step
        image[top:top + side, x:x + side] = texture
        mask[top:top + side, x:x + side] = 1
        images.append(image)
        masks.append(mask)
    return images, masks


def normalised(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> the script's frame normalisation ``[1, 3, H, W]``."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return (pixels - torch.tensor(ev.FRAME_MEAN).view(1, 3, 1, 1)) / torch.tensor(ev.FRAME_STD).view(1, 3, 1, 1)


def pixel_projection(seed: int = 0, dim: int = 64):
    """A feature function that sees texture: each patch's raw pixels times a fixed random matrix, ``[1, N, dim]``."""
    weights = torch.randn(3 * PATCH * PATCH, dim, generator=torch.Generator().manual_seed(seed))

    def features(frame: torch.Tensor) -> torch.Tensor:
        return F.unfold(frame, PATCH, stride=PATCH).transpose(1, 2) @ weights

    return features


def position_codes(frame: torch.Tensor) -> torch.Tensor:
    """A feature function blind to content: the one-hot code of each patch's position."""
    count = (frame.shape[-2] // PATCH) * (frame.shape[-1] // PATCH)
    return torch.eye(count)[None]


def propagated_masks(images: list[np.ndarray], first_mask: np.ndarray, feature_fn) -> list[np.ndarray]:
    """The masks of frames 1.. from ``propagate_video`` (the script's core), at full resolution."""
    grid = (SIZE // PATCH, SIZE // PATCH)
    labels = ev.first_frame_labels(first_mask, [1], grid)
    soft = ev.propagate_video((normalised(image) for image in images), labels, feature_fn, SETTINGS)
    return [ev.labels_to_mask(frame, PATCH, (SIZE, SIZE), [1]) for frame in soft]


def test_a_static_video_keeps_its_first_mask():
    # 11 patches wide, 1 px off the patch grid: the first mask at patch resolution is 1 px off.
    images, masks = synthetic_video(step=0, side=44, top=17, left=9)
    at_patch_resolution = ev.labels_to_mask(ev.first_frame_labels(masks[0], [1], (16, 16)), PATCH, (SIZE, SIZE), [1])
    for predicted in propagated_masks(images, masks[0], pixel_projection()):
        assert np.array_equal(predicted, at_patch_resolution)
        assert ev.region_similarity(masks[0] == 1, predicted == 1) > 0.9


def test_a_shape_on_the_patch_grid_is_kept_but_for_its_corners():
    images, masks = synthetic_video(step=0)
    # DINO's bilinear upsampling and argmax round a square's corners: the corner pixel holds 0.625^2 of the
    # object's label and 1 - 0.625^2 of the background's.
    expected = masks[0].copy()
    expected[[16, 16, 51, 51], [8, 43, 8, 43]] = 0
    for predicted in propagated_masks(images, masks[0], pixel_projection()):
        assert np.array_equal(predicted, expected)


def test_a_moving_shape_is_tracked_by_its_texture():
    images, masks = synthetic_video(step=PATCH)
    tracked = propagated_masks(images, masks[0], pixel_projection())
    blind = propagated_masks(images, masks[0], position_codes)
    for index, (seen, unseen) in enumerate(zip(tracked, blind), start=1):
        assert ev.region_similarity(masks[index] == 1, seen == 1) > 0.9
        # Features blind to content leave the mask where it was: it falls behind the square.
        assert ev.region_similarity(masks[0] == 1, unseen == 1) > 0.9
    assert ev.region_similarity(masks[4] == 1, blind[-1] == 1) < 0.5


def dense_propagation(target, sources, source_labels, grid, topk, radius, temperature):
    """DINO's label_propagation written densely (whole affinity matrix, window mask multiplied in), as reference."""
    height, width = grid
    rows, columns = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    window = ((rows[:, None] - rows[None]).abs() <= radius) & ((columns[:, None] - columns[None]).abs() <= radius)
    affinity = torch.exp(torch.einsum("td,msd->mst", target, sources) / temperature)  # [M, sources, targets]
    if radius > 0:
        affinity = affinity * window.T.float()[None]
    affinity = affinity.reshape(-1, height * width)
    kth = affinity.topk(topk, dim=0).values.min(dim=0).values
    affinity[affinity < kth] = 0
    affinity = affinity / affinity.sum(dim=0, keepdim=True)
    labels = source_labels.permute(1, 0, 2).reshape(source_labels.shape[1], -1)  # [C, M * sources]
    return labels @ affinity


@pytest.mark.parametrize("radius, topk, budget", [(1, 5, 10 ** 9), (2, 7, 300), (0, 4, 10 ** 9), (3, 3, 500)])
def test_banded_propagation_equals_dino_dense_form(radius, topk, budget, monkeypatch):
    monkeypatch.setattr(ev, "AFFINITY_BUDGET", budget)  # small budgets force bands of one or a few rows
    generator = torch.Generator().manual_seed(radius)
    grid, contexts, classes = (5, 7), 3, 3
    target = F.normalize(torch.randn(35, 8, generator=generator), dim=-1)
    sources = F.normalize(torch.randn(contexts, 35, 8, generator=generator), dim=-1)
    labels = torch.rand(contexts, classes, 35, generator=generator)
    settings = ev.PropagationSettings(topk=topk, radius=radius, temperature=0.1)
    banded = ev.propagate_labels(target, sources, labels, grid, settings)
    expected = dense_propagation(target, sources, labels, grid, topk, radius, 0.1)
    torch.testing.assert_close(banded, expected, rtol=1e-5, atol=1e-6)


def test_a_small_temperature_stays_finite():
    generator = torch.Generator().manual_seed(0)
    target, sources = F.normalize(torch.randn(12, 8, generator=generator), dim=-1), F.normalize(
        torch.randn(2, 12, 8, generator=generator), dim=-1)
    labels = F.one_hot(torch.randint(0, 2, (2, 12), generator=generator), 2).permute(0, 2, 1).float()
    # exp(1 / 0.001) overflows float32; DINO's form would give inf / inf here.
    out = ev.propagate_labels(target, sources, labels, (3, 4), ev.PropagationSettings(topk=3, radius=1,
                                                                                       temperature=0.001))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=0), torch.ones(12))


def test_the_context_is_the_first_frame_and_the_last_n(monkeypatch):
    seen, contexts = [], []
    features = pixel_projection()

    def recording_features(frame):
        seen.append(frame)
        return features(frame)

    def recording_propagation(target, sources, source_labels, grid, settings):
        contexts.append(sources)
        return propagate(target, sources, source_labels, grid, settings)

    propagate = ev.propagate_labels
    monkeypatch.setattr(ev, "propagate_labels", recording_propagation)
    images, masks = synthetic_video(frames=6, step=0)
    labels = ev.first_frame_labels(masks[0], [1], (16, 16))
    frames = [normalised(image) for image in images]
    settings = ev.PropagationSettings(n_last_frames=2)
    outputs = list(ev.propagate_video(iter(frames), labels, recording_features, settings))
    assert len(outputs) == 5 and len(seen) == 6  # each frame's features computed once
    assert [len(sources) for sources in contexts] == [1, 2, 3, 3, 3]
    first = F.normalize(features(frames[0])[0], dim=-1)
    for step, sources in enumerate(contexts, start=1):  # frame `step` sees frame 0, then frames step-2 and step-1
        expected = [0] + list(range(max(1, step - 2), step))
        torch.testing.assert_close(sources, torch.stack([F.normalize(features(frames[i])[0], dim=-1)
                                                         for i in expected]))
        torch.testing.assert_close(sources[0], first)


def test_first_frame_labels_follow_the_ids_and_ignore_void():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4, :4], mask[4:, 4:], mask[:4, 4:] = 7, 3, 255
    labels = ev.first_frame_labels(mask, ev.object_ids(mask), (2, 2))
    assert ev.object_ids(mask) == [3, 7]
    # channel 0 background (void counts as background), 1 object 3, 2 object 7; grid cells row-major
    assert labels.argmax(dim=0).tolist() == [[2, 0], [0, 1]]
    # Back to ids: each quadrant's outer corner is its own label; a channel constant over the frame wins.
    upsampled = ev.labels_to_mask(labels, 4, (8, 8), [3, 7])
    assert [upsampled[0, 0], upsampled[0, 7], upsampled[7, 0], upsampled[7, 7]] == [7, 0, 0, 3]
    everywhere = torch.zeros(3, 2, 2)
    everywhere[2] = 0.4
    assert (ev.labels_to_mask(everywhere, 4, (8, 8), [3, 7]) == 7).all()


def test_processing_size_is_dinos():
    assert ev.processing_size(480, 854, 480, 16) == (480, 832)  # DAVIS 480p: 854 floored to a multiple of 64
    assert ev.processing_size(854, 480, 480, 8) == (832, 480)
    assert ev.processing_size(64, 64, 64, 4) == (64, 64)
    with pytest.raises(ValueError, match="a 100x32 frame at --frame_size 16 leaves a side under 64 px"):
        ev.processing_size(32, 100, 16, 4)


def test_palette_is_davis():
    palette = utils.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:8].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
                                    [0, 128, 128], [128, 128, 128]]
    assert palette[8].tolist() == [64, 0, 0] and palette[255].tolist() == [224, 224, 192]
    assert len({tuple(colour) for colour in palette.tolist()}) == 256


# ----------------------------------------------------------------------------------------------
# J and F against hand-computed values.
# ----------------------------------------------------------------------------------------------
def block(shape, rows, columns) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], columns[0]:columns[1]] = True
    return mask


def test_region_similarity_by_hand():
    truth = block((6, 6), (0, 4), (0, 3))  # 12 pixels
    prediction = block((6, 6), (2, 6), (0, 3))  # 12 pixels, 6 shared
    assert ev.region_similarity(truth, prediction) == pytest.approx(6 / 18)
    void = block((6, 6), (4, 6), (0, 6))  # hides 6 predicted-only pixels
    assert ev.region_similarity(truth, prediction, void) == pytest.approx(6 / 12)
    empty = np.zeros((6, 6), dtype=bool)
    assert ev.region_similarity(empty, empty) == 1.0 and ev.region_similarity(truth, empty) == 0.0


def test_boundary_map_of_a_square_by_hand():
    # A 2x2 square at rows/columns 1-2: the boundary is the 3x3 block at rows/columns 0-2 less its centre
    # (pixels whose right, lower or lower-right neighbour differs).
    expected = block((6, 6), (0, 3), (0, 3))
    expected[1, 1] = False
    assert np.array_equal(ev.boundary_map(block((6, 6), (1, 3), (1, 3))), expected)


def test_boundary_f_by_hand():
    assert ev.disk(1).sum() == 5 and ev.disk(2).sum() == 13
    # 8x8: tolerance ceil(0.008 * hypot(8, 8)) = 1 px, a plus-shaped disk.
    square = block((8, 8), (1, 3), (1, 3))
    assert ev.boundary_f_measure(square, square) == 1.0
    # Shifted by one pixel: every boundary pixel has a partner within 1 px, so F is 1 although J is 1/3.
    shifted = block((8, 8), (1, 3), (2, 4))
    assert ev.boundary_f_measure(square, shifted) == 1.0
    assert ev.region_similarity(square, shifted) == pytest.approx(1 / 3)
    # A second, far square in the prediction: its 8 boundary pixels match nothing -> precision 8/16, recall 1.
    two = square | block((8, 8), (5, 7), (5, 7))
    assert ev.boundary_f_measure(square, two) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert ev.region_similarity(square, two) == pytest.approx(0.5)
    # Nothing predicted: precision 1, recall 0 -> F 0; nothing anywhere -> 1.
    empty = np.zeros((8, 8), dtype=bool)
    assert ev.boundary_f_measure(square, empty) == 0.0 and ev.boundary_f_measure(empty, empty) == 1.0


def test_statistics_are_davis():
    result = ev.statistics([1.0, 0.4, 0.8, 0.2])
    # bin edges round(linspace(1, 4, 5) + 1e-10) - 1 = [0, 1, 2, 2, 3]: first bin [0:2], last bin [2:4]
    assert result["mean"] == pytest.approx(0.6) and result["recall"] == pytest.approx(0.5)
    assert result["decay"] == pytest.approx((1.0 + 0.4) / 2 - (0.8 + 0.2) / 2)


# ----------------------------------------------------------------------------------------------
# The script on a synthetic DAVIS folder.
# ----------------------------------------------------------------------------------------------
def write_davis(root: Path, name: str = "square", annotate: str = "all", frames: int = 5, stem: str = "{:05d}",
                step: int = PATCH, **video) -> Path:
    """A DAVIS-layout folder with one synthetic video (JPEG frames, indexed PNG masks) listed in val.txt; frame i
    is ``stem.format(i)``."""
    images, masks = synthetic_video(frames=frames, step=step, **video)
    frame_folder = root / "JPEGImages" / "480p" / name
    mask_folder = root / "Annotations" / "480p" / name
    frame_folder.mkdir(parents=True)
    mask_folder.mkdir(parents=True)
    for index, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(frame_folder / f"{stem.format(index)}.jpg", quality=95)
        if annotate == "all" or (annotate == "first" and index == 0):
            utils.write_indexed_png(mask_folder / f"{stem.format(index)}.png", mask)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    with open(sets / "val.txt", "a") as listing:
        listing.write(name + "\n")
    return root


def parse(*extra: str):
    return ev.get_args_parser().parse_args(TINY_BACKBONE_ARGS + ["--device", "cpu", "--frame_size", str(SIZE),
                                                                 *extra])


def final_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("FINAL "))[len("FINAL "):])


def test_script_writes_davis_pngs_and_scores(tmp_path, capsys):
    data = write_davis(tmp_path / "davis")
    write_davis(data, name="unlabelled", annotate="first")
    output = tmp_path / "out"
    result = ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(output)))
    printed = capsys.readouterr().out
    assert final_line(printed) == json.loads((output / "results.json").read_text()) == json.loads(json.dumps(result))
    assert "video unlabelled: only the first frame is annotated" in printed
    assert result["scored_videos"] == 1 and result["scored_objects"] == 1
    assert result["J&F"] == pytest.approx((result["J_mean"] + result["F_mean"]) / 2)
    square = result["videos"]["square"]
    assert square["scored"] and square["scored_frames"] == 3 and square["objects"] == [1]  # frames 1-3
    assert 0 <= square["J_mean"] <= 1 and 0 <= square["F_mean"] <= 1
    assert not result["videos"]["unlabelled"]["scored"]
    for video in ("square", "unlabelled"):
        written = sorted((output / video).glob("*.png"))
        assert [path.name for path in written] == [f"{index:05d}.png" for index in range(5)]
        for path in written:
            with Image.open(path) as mask:
                assert mask.mode == "P" and mask.size == (SIZE, SIZE)
                assert mask.getpalette()[:768] == utils.voc_palette().ravel().tolist()
                assert set(np.unique(np.array(mask))) <= {0, 1}
    first = np.array(Image.open(output / "square" / "00000.png"))
    assert np.array_equal(first, np.array(Image.open(data / "Annotations" / "480p" / "square" / "00000.png")))


def test_script_with_trained_weights_and_a_video_option(trained_checkpoint, tmp_path, capsys):
    data = write_davis(tmp_path / "davis")
    result = ev.main(parse("--pretrained_weights", str(trained_checkpoint), "--data_path", str(data), "--videos",
                           "square", "--output_dir", str(tmp_path / "out"), "--output_json", str(tmp_path / "r.json"),
                           "--topk", "30", "--size_mask_neighborhood", "2"))
    assert "note: --topk 30 exceeds the 9 candidates of a corner patch" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["J&F"] == result["J&F"]
    assert result["weights"] == str(trained_checkpoint) and result["settings"]["topk"] == 30


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------
def test_a_missing_first_mask_is_named(tmp_path):
    data = write_davis(tmp_path / "davis", annotate="none")
    with pytest.raises(FileNotFoundError, match=r"video square: the first frame's mask .*square/00000.png is missing"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))


def test_frames_of_another_size_are_named(tmp_path):
    data = write_davis(tmp_path / "davis")
    Image.new("RGB", (48, 64)).save(data / "JPEGImages" / "480p" / "square" / "00002.jpg")
    with pytest.raises(ValueError, match=r"video square: frame 00002.jpg is 48x64 but the first frame is 64x64"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))


def test_an_annotation_of_another_size_is_named(tmp_path):
    data = write_davis(tmp_path / "davis")
    utils.write_indexed_png(data / "Annotations" / "480p" / "square" / "00003.png", np.zeros((32, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"video square: annotation 00003.png is 64x32 but the first frame is 64x64"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))


def test_missing_folders_and_lists_are_named(tmp_path):
    data = write_davis(tmp_path / "davis")
    with pytest.raises(FileNotFoundError, match=r"video nowhere: frames folder .*JPEGImages/480p/nowhere not found"):
        ev.main(parse("--random_init", "--data_path", str(data), "--videos", "square", "nowhere"))
    (data / "ImageSets" / "2017" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"video list .*ImageSets/2017/val.txt not found: give --video_list"):
        ev.main(parse("--random_init", "--data_path", str(data)))
    with pytest.raises(FileNotFoundError, match=r"--data_path .* is not a folder"):
        ev.main(parse("--random_init", "--data_path", str(tmp_path / "missing")))


def test_a_first_mask_without_objects_and_colour_masks_are_refused(tmp_path):
    data = write_davis(tmp_path / "davis")
    first = data / "Annotations" / "480p" / "square" / "00000.png"
    utils.write_indexed_png(first, np.full((SIZE, SIZE), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"video square: the first mask .* holds no object"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))
    Image.new("RGB", (SIZE, SIZE)).save(first)
    with pytest.raises(ValueError, match=r"square are colour images \(00000.png \(RGB\)\); annotations must be "
                                         r"indexed .* map each colour to its id"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))


def test_unpadded_frame_names_are_propagated_in_numeric_order(tmp_path):
    # 0.jpg ... 11.jpg sort as 0, 1, 10, 11, 2, ... by name: the order must be the numbers', as when padded.
    video = dict(frames=12, step=2, side=24, left=4)
    padded = write_davis(tmp_path / "padded", **video)
    unpadded = write_davis(tmp_path / "unpadded", stem="{}", **video)
    results = [ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / data.name
                                                                                          / "out")))
               for data in (padded, unpadded)]
    for result in results:
        del result["videos"]["square"]["seconds_per_frame"]
    assert results[0]["videos"] == results[1]["videos"] and results[0]["J&F"] == results[1]["J&F"]
    assert results[0]["videos"]["square"]["scored_frames"] == 10
    for index in range(12):
        masks = [np.array(Image.open(tmp_path / name / "out" / "square" / f"{stem.format(index)}.png"))
                 for name, stem in (("padded", "{:05d}"), ("unpadded", "{}"))]
        assert np.array_equal(*masks)


def test_frames_and_masks_that_do_not_pair_up_are_refused(tmp_path):
    data = write_davis(tmp_path / "davis")
    masks = data / "Annotations" / "480p" / "square"
    for index in range(5):  # masks named unlike their frames (00000.jpg): unpadded
        (masks / f"{index:05d}.png").rename(masks / f"{index}.png")
    with pytest.raises(ValueError, match=r"video square: 5 file\(s\) in .*square match no frame \(0.png, 1.png, "
                                         r"2.png and 2 more\); an annotation is named after its frame, as a PNG "
                                         r"\(00000.jpg -> 00000.png\)"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))
    frames = data / "JPEGImages" / "480p" / "square"
    Image.new("RGB", (SIZE, SIZE)).save(frames / "00001.png")  # two frames 00001: one mask, one output name
    with pytest.raises(ValueError, match=r"00001.jpg and 00001.png in .*square share the stem '00001'"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(tmp_path / "out")))


def test_every_video_is_checked_before_the_first_is_segmented(tmp_path):
    data = write_davis(tmp_path / "davis", name="good")
    write_davis(data, name="colour")
    Image.new("RGB", (SIZE, SIZE)).save(data / "Annotations" / "480p" / "colour" / "00000.png")
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"colour.*00000\.png"):
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(output)))
    assert not output.exists()  # the good video, listed first, was not segmented either


def test_the_problems_of_all_videos_are_named_in_one_error(tmp_path):
    data = write_davis(tmp_path / "davis", name="good")
    for name in ("colour", "void", "late_colour"):
        write_davis(data, name=name)
    write_davis(data, name="unmasked", annotate="none")
    masks = data / "Annotations" / "480p"
    Image.new("RGB", (SIZE, SIZE)).save(masks / "colour" / "00000.png")
    Image.new("L", (SIZE, SIZE), 255).save(masks / "void" / "00000.png")  # a binary mask with 255 for the object
    Image.new("RGB", (SIZE, SIZE)).save(masks / "late_colour" / "00003.png")  # scored frames are checked too
    output = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        ev.main(parse("--random_init", "--data_path", str(data), "--output_dir", str(output)))
    message = str(raised.value)
    assert message.startswith("4 of 5 videos cannot be segmented (nothing was computed): ")
    assert "video colour: 1 annotation(s)" in message and "colour images (00000.png (RGB))" in message
    assert "video late_colour: 1 annotation(s)" in message and "(00003.png (RGB))" in message
    assert "video void: the first mask" in message and "write it as 1 (e.g. mask // 255)" in message
    assert "video unmasked: the first frame's mask" in message and "unmasked/00000.png is missing" in message
    assert "video good" not in message and not output.exists()


def test_a_video_named_twice_is_refused(tmp_path):
    data = write_davis(tmp_path / "davis")
    with pytest.raises(ValueError, match=r"the videos square are named more than once"):
        ev.main(parse("--random_init", "--data_path", str(data), "--videos", "square", "square"))


@pytest.mark.parametrize("extra, error, message", [
    (["--frame_size", "66"], ValueError, r"--frame_size 66 must be a positive multiple of --patch_size 4"),
    (["--topk", "0"], ValueError, r"--topk must be positive"),
    (["--n_last_frames", "-1"], ValueError, r"--n_last_frames must be 0 or more"),
    (["--videos", "a", "--video_list", "list.txt"], ValueError, r"either --videos or --video_list"),
])
def test_bad_arguments_are_named(extra, error, message, tmp_path):
    with pytest.raises(error, match=message):
        ev.main(parse("--random_init", "--data_path", str(tmp_path), *extra))


# ----------------------------------------------------------------------------------------------
# Void pixels (255): davis2017-evaluation's semi-supervised rule (background) against --void ignore.
# ----------------------------------------------------------------------------------------------
def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """davis2017-evaluation's ``_seg2bmap``, pixel by pixel: on the boundary where the right, lower or lower-right
    neighbour differs; the last row looks right only, the last column down only, the bottom-right pixel never is."""
    height, width = mask.shape
    boundary = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            if y == height - 1 and x == width - 1:
                continue
            if y == height - 1:
                neighbours = [(y, x + 1)]
            elif x == width - 1:
                neighbours = [(y + 1, x)]
            else:
                neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
            boundary[y, x] = any(mask[y, x] != mask[point] for point in neighbours)
    return boundary


def reference_j(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None) -> float:
    """davis2017-evaluation's ``db_eval_iou``: IoU outside ``void`` (none by default); 1 when the union is empty."""
    keep = np.ones_like(annotation) if void is None else ~void
    union = np.sum((annotation | segmentation) & keep)
    return 1.0 if union == 0 else np.sum(annotation & segmentation & keep) / union


def reference_f(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None,
                bound_th: float = 0.008) -> float:
    """davis2017-evaluation's ``f_measure``: boundary pixels of one mask match when a boundary pixel of the other
    lies within ``ceil(bound_th * diagonal)`` (``bound_th`` px from 1 on; Euclidean, the disk); F = 2PR / (P + R),
    with its conventions for empty boundaries."""
    keep = np.ones_like(annotation) if void is None else ~void
    radius = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(annotation.shape))
    predicted = np.argwhere(reference_boundary(segmentation & keep))
    true = np.argwhere(reference_boundary(annotation & keep))
    if len(predicted) == 0 or len(true) == 0:
        precision, recall = (1.0 if len(predicted) == 0 else 0.0), (1.0 if len(true) == 0 else 0.0)
    else:
        close = np.linalg.norm(predicted[:, None, :] - true[None, :, :], axis=-1) <= radius
        precision, recall = close.any(axis=1).mean(), close.any(axis=0).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def void_band_frame() -> tuple[np.ndarray, np.ndarray]:
    """``(truth, prediction)`` uint8 ``[12, 12]`` (tolerance ceil(0.008 * 17) = 1 px): object 1 at rows 2-5,
    columns 2-7 (24 px), a void band at rows 6-7 across the frame; object 2 at rows 9-10, columns 1-3, far from
    it. The prediction reaches rows 2-7 at columns 2-6: 20 of its 30 object-1 pixels are true, 10 lie on void."""
    truth = np.zeros((12, 12), dtype=np.uint8)
    truth[2:6, 2:8], truth[6:8, :], truth[9:11, 1:4] = 1, ev.VOID_LABEL, 2
    prediction = np.zeros_like(truth)
    prediction[2:8, 2:7], prediction[9:11, 1:4] = 1, 2
    return truth, prediction


def test_void_counts_as_background_by_default_as_in_davis2017_evaluation():
    truth, prediction = void_band_frame()
    background = ev.score_frame(truth, prediction, [1, 2], 0.008, "background")
    ignore = ev.score_frame(truth, prediction, [1, 2], 0.008, "ignore")
    # Official: the annotation maps 255 to 0 and no void mask is passed; J = 20 / (24 + 10) for object 1.
    official = np.where(truth == ev.VOID_LABEL, 0, truth)
    assert background[1][0] == pytest.approx(20 / 34) == pytest.approx(reference_j(official == 1, prediction == 1))
    assert background[1][1] == pytest.approx(reference_f(official == 1, prediction == 1))
    # Ignore: the band is left out of both masks; J = 20 / 24.
    void = truth == ev.VOID_LABEL
    assert ignore[1][0] == pytest.approx(20 / 24) == pytest.approx(reference_j(truth == 1, prediction == 1, void))
    assert ignore[1][1] == pytest.approx(reference_f(truth == 1, prediction == 1, void))
    assert background[1][0] < ignore[1][0] and background[1][1] < ignore[1][1]
    assert background[2] == ignore[2] == (1.0, 1.0)  # an object away from the band is scored alike


def test_without_void_both_rules_agree():
    truth, prediction = void_band_frame()
    truth[truth == ev.VOID_LABEL] = 0
    background = ev.score_frame(truth, prediction, [1, 2], 0.008, "background")
    assert background == ev.score_frame(truth, prediction, [1, 2], 0.008, "ignore")
    assert background[1][0] == pytest.approx(reference_j(truth == 1, prediction == 1))
    assert background[1][1] == pytest.approx(reference_f(truth == 1, prediction == 1))
    with pytest.raises(ValueError, match=r"void_rule must be one of"):
        ev.score_frame(truth, prediction, [1], 0.008, "drop")


def test_the_reference_f_agrees_with_the_hand_values():
    square = block((8, 8), (1, 3), (1, 3))
    assert reference_f(square, square | block((8, 8), (5, 7), (5, 7))) == pytest.approx(2 * 0.5 / 1.5)
    assert reference_f(square, block((8, 8), (1, 3), (2, 4))) == 1.0
    assert np.array_equal(reference_boundary(square), ev.boundary_map(square))


def test_void_defaults_to_background_and_refuses_other_values(capsys):
    assert parse().void == "background"
    assert parse("--void", "ignore").void == "ignore"
    with pytest.raises(SystemExit):
        parse("--void", "drop")
    assert "invalid choice: 'drop'" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["background", "ignore"])
def test_the_script_scores_void_by_its_rule_and_records_it(rule, tmp_path):
    data = write_davis(tmp_path / "davis")
    masks = data / "Annotations" / "480p" / "square"
    for index in (1, 2, 3):  # a void band across the object's middle in the scored frames
        truth = np.array(Image.open(masks / f"{index:05d}.png"))
        truth[28:36, :] = ev.VOID_LABEL
        utils.write_indexed_png(masks / f"{index:05d}.png", truth)
    output = tmp_path / "out"
    args = ("--random_init", "--data_path", str(data), "--output_dir", str(output))
    result = ev.main(parse(*args) if rule == "background" else parse(*args, "--void", rule))
    assert result["void"] == rule == json.loads((output / "results.json").read_text())["void"]
    scores = {name: [] for name in ev.VOID_RULES}
    for index in (1, 2, 3):
        truth, predicted = (np.array(Image.open(folder / f"{index:05d}.png")) for folder in (masks, output / "square"))
        for name in ev.VOID_RULES:
            scores[name].append(ev.score_frame(truth, predicted, [1], 0.008, name)[1])
    j_values, f_values = zip(*scores[rule])
    assert result["J_mean"] == pytest.approx(np.mean(j_values))
    assert result["F_mean"] == pytest.approx(np.mean(f_values))
    assert scores["background"] != scores["ignore"]


def test_unwritable_outputs_are_named_before_the_model_is_built(tmp_path, weights_not_to_load):
    data = write_davis(tmp_path / "davis")
    (tmp_path / "a_file").write_text("in the way\n")
    given = ("--pretrained_weights", str(weights_not_to_load), "--data_path", str(data))
    with pytest.raises(NotADirectoryError, match=r"--output_dir .*a_file cannot be a folder: .*a_file is a file"):
        ev.main(parse(*given, "--output_dir", str(tmp_path / "a_file")))
    with pytest.raises(NotADirectoryError, match=r"the folder of --output_json .*a_file/r.json .*a_file cannot be a folder"):
        ev.main(parse(*given, "--output_dir", str(tmp_path / "out"), "--output_json", str(tmp_path / "a_file/r.json")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "davis"]
