"""eval_segmentation.py and segmentation_data.py on tiny written datasets: the scores against hand-computed
confusion matrices, both protocols on features whose answer is known, the voc / ade20k / folder layouts,
masks and figures written, and bad input refused with its name."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_segmentation as es
import segmentation_data as sd
import utils
from conftest import TINY_BACKBONE_ARGS
from device_augment import IMAGENET_MEAN, IMAGENET_STD

PATCH = 4
SIZE = 16
GREY_STEP = 40  # image grey level = GREY_STEP * class: the features below read the class back from the pixels


def parse(*argv: str):
    return es.get_args_parser().parse_args(list(argv))


# ----------------------------------------------------------------------------------------------
# Tiny datasets written in each layout.
# ----------------------------------------------------------------------------------------------
def stripe_labels(rng: np.random.Generator, classes: int) -> np.ndarray:
    """``[SIZE, SIZE]`` labels constant over each column of patches (patch-aligned vertical stripes)."""
    columns = rng.integers(0, classes, SIZE // PATCH)
    return np.repeat(np.tile(columns, (SIZE, 1)), PATCH, axis=1)


def grey_image(labels: np.ndarray) -> np.ndarray:
    """An RGB image whose grey level encodes each pixel's class."""
    return np.repeat((GREY_STEP * labels).astype(np.uint8)[..., None], 3, axis=2)


def write_voc(root: Path, splits: dict[str, int], classes: int = 4, seed: int = 0,
              border: bool = False) -> Path:
    """A VOC2012 folder of striped images (JPEG is lossy: PNGs, which the layout reads too) with palette masks."""
    voc = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        stems = [f"{split}_{index:03}" for index in range(count)]
        for stem in stems:
            labels = stripe_labels(rng, classes)
            Image.fromarray(grey_image(labels)).save(voc / "JPEGImages" / f"{stem}.png")
            mask = labels.copy()
            if border:
                mask[0, :] = 255  # VOC's void border
            utils.write_indexed_png(voc / "SegmentationClass" / f"{stem}.png", mask)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
    (voc / "class_names.txt").write_text("".join(f"c{c}\n" for c in range(classes)))
    return root


def voc_layout(root: Path) -> sd.Layout:
    return sd.resolve_layout(root, "voc")


def grey_class_features(images: torch.Tensor) -> torch.Tensor:
    """Normalised grey images ``[B, 3, S, S]`` -> per patch, the one-hot of its majority class ``[B, N, 8]``."""
    grey = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    labels = torch.round(grey * 255 / GREY_STEP).long()
    counts = es.patch_label_counts(labels, PATCH, 8)
    return torch.nn.functional.one_hot(counts.argmax(dim=-1), 8).float()


def run_with_features(root: Path, feature_fn, *extra: str) -> dict:
    args = parse("--data_path", str(root), "--size", str(SIZE), "--patch_size", str(PATCH), "--num_workers", "0",
                 "--random_init", *extra)
    es.validate_args(args)
    layout, train, val = es.load_splits(args)
    results, _, _ = es.run_protocols(args, layout, train, val, feature_fn, torch.device("cpu"))
    return results


# ----------------------------------------------------------------------------------------------
# Scores.
# ----------------------------------------------------------------------------------------------
def test_scores_match_a_hand_computed_confusion_matrix():
    ignore = 4  # internal ignored label = num_classes
    truth = torch.tensor([[0, 0, 0, 1], [1, 1, 2, ignore]])
    prediction = torch.tensor([[0, 0, 1, 1], [1, 3, 2, 0]])
    confusion = es.confusion_matrix(truth, prediction, 4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)  # the ignored pixel (predicted 0) counted nowhere
    scores = es.segmentation_scores(confusion, ("a", "b", "c", "d"))
    # IoU: a 2/(3+2-2), b 2/(3+3-2), c 1/1, d 0/(0+1-0) (absent from truth, predicted once: counts as 0).
    ious = [2 / 3, 2 / 4, 1.0, 0.0]
    assert [row["iou"] for row in scores["per_class"]] == pytest.approx([100 * v for v in ious])
    assert scores["mIoU"] == pytest.approx(100 * sum(ious) / 4)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert scores["per_class"][3]["accuracy"] is None and scores["per_class"][3]["pixels"] == 0
    assert scores["mean_accuracy"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)


def test_a_class_in_neither_truth_nor_prediction_is_left_out_of_the_mean():
    truth = torch.tensor([0, 0, 1, 1])
    scores = es.segmentation_scores(es.confusion_matrix(truth, truth, 3), ("a", "b", "c"))
    assert scores["mIoU"] == 100.0 and scores["classes_scored"] == 2 and scores["per_class"][2]["iou"] is None


def test_patch_label_counts_and_rare_class_scores():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 3], [1, 1, 1, 1], [1, 1, 3, 3]]])  # 3 = ignored (3 classes)
    counts = es.patch_label_counts(labels, 2, 3)
    assert counts.tolist() == [[[3, 0, 1], [0, 3, 0], [0, 4, 0], [0, 2, 0]]]
    scores = es.rare_class_scores(counts, torch.ones(1, 4))
    # class 0 is in 1 patch, class 1 in 3, class 2 in 1: patch 0 holds 0 and 2 -> 2; the others hold 1 -> 3
    assert scores.tolist() == [[2.0, 3.0, 3.0, 3.0]]
    empty = es.rare_class_scores(torch.zeros(1, 2, 3, dtype=torch.long), torch.ones(1, 2))
    assert torch.isinf(empty).all()


# ----------------------------------------------------------------------------------------------
# Both protocols on features with a known answer.
# ----------------------------------------------------------------------------------------------
def test_majority_label_one_hot_features_segment_perfectly(tmp_path):
    root = write_voc(tmp_path, {"train": 12, "val": 6})
    results = run_with_features(root, grey_class_features, "--epochs", "30", "--lrs", "0.3",
                                "--linear_batch_size", "4", "--augment_epochs", "0", "--k", "5")
    for protocol in ("linear", "retrieval"):
        assert results[protocol]["mIoU"] == pytest.approx(100.0), protocol
        assert results[protocol]["pixel_accuracy"] == pytest.approx(100.0)


def test_constant_features_predict_the_majority_class_everywhere(tmp_path):
    root = write_voc(tmp_path, {"train": 10, "val": 5})
    layout = voc_layout(root)
    train_truth = np.concatenate([sd.read_labels(s.mask, layout).ravel() for s in sd.list_samples(layout, "train")])
    majority = int(np.bincount(train_truth, minlength=4).argmax())
    val_truth = np.concatenate([sd.read_labels(s.mask, layout).ravel() for s in sd.list_samples(layout, "val")])
    present = set(np.unique(val_truth).tolist()) | {majority}
    expected = 100 * np.mean(val_truth == majority) / len(present)  # the majority's IoU; 0 for the rest
    results = run_with_features(root, lambda images: torch.zeros(len(images), (SIZE // PATCH) ** 2, 8),
                                "--epochs", "20", "--lrs", "0.3", "--augment_epochs", "0", "--k", "100000")
    for protocol in ("linear", "retrieval"):
        assert results[protocol]["mIoU"] == pytest.approx(expected), protocol


def test_the_learning_rate_is_chosen_on_a_holdout_part_of_the_training_split(tmp_path):
    root = write_voc(tmp_path, {"train": 10, "val": 4})
    results = run_with_features(root, grey_class_features, "--protocol", "linear", "--epochs", "3",
                                "--lrs", "0.001", "0.5", "--holdout_fraction", "0.3")
    linear = results["linear"]
    assert set(linear["holdout_mIoU"]) == {"0.001", "0.5"}
    assert linear["lr"] == float(max(linear["holdout_mIoU"], key=linear["holdout_mIoU"].get))
    fit, held = es.holdout_split(10, 0.3, seed=0)
    assert len(held) == 3 and not set(fit.tolist()) & set(held.tolist())


def test_faiss_and_torch_find_the_same_neighbours():
    generator = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
    faiss_result = es.NearestNeighbours(memory, "faiss", torch.device("cpu")).search(queries, 7)
    torch_result = es.NearestNeighbours(memory, "torch", torch.device("cpu")).search(queries, 7)
    assert torch.equal(faiss_result[1], torch_result[1])
    assert torch.allclose(faiss_result[0], torch_result[0], atol=1e-5)


def test_memory_above_the_available_patches_is_capped_with_a_note(capsys):
    assert es.memory_plan(images=10, passes=2, patches=16, memory_size=1000) == 16
    assert "at least the 320 training patches available" in capsys.readouterr().out
    assert es.memory_plan(images=10, passes=2, patches=16, memory_size=100) == 5


def test_augmented_memory_crops_are_seeded_and_paired_with_their_masks(tmp_path):
    root = write_voc(tmp_path, {"train": 3, "val": 1})
    layout = voc_layout(root)
    samples = sd.list_samples(layout, "train")
    first = sd.SegmentationSamples(samples, layout, SIZE, augment_pass=0, scale=(0.3, 0.6), seed=1)
    again = sd.SegmentationSamples(samples, layout, SIZE, augment_pass=0, scale=(0.3, 0.6), seed=1)
    other = sd.SegmentationSamples(samples, layout, SIZE, augment_pass=1, scale=(0.3, 0.6), seed=1)
    image, labels, _ = first[0]
    assert torch.equal(image, again[0][0]) and not torch.equal(image, other[0][0])
    # the grey level of every pixel of the crop still names its mask's class (crop and flip applied to both)
    decoded = torch.round(image[0].float() / GREY_STEP).long()
    assert (decoded == labels).float().mean() > 0.9  # bilinear image vs nearest mask differ only at edges


# ----------------------------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------------------------
def test_voc_layout_reads_palette_masks_with_a_void_border(tmp_path):
    root = write_voc(tmp_path, {"train": 2, "val": 1}, border=True)
    layout = sd.resolve_layout(root / "VOC2012", "voc")  # the VOC2012 folder itself works too
    assert (layout.num_classes, layout.ignore_value, layout.class_names[0]) == (4, 255, "c0")
    sample = sd.list_samples(layout, "val")[0]
    with Image.open(sample.mask) as mask:
        assert mask.mode == "P"
    labels = sd.read_labels(sample.mask, layout)
    assert (labels[0] == 4).all() and (labels[1:] < 4).all()
    assert np.array_equal(layout.to_value(labels)[0], np.full(SIZE, 255))


def test_voc_without_class_names_has_its_21_classes(tmp_path):
    root = write_voc(tmp_path, {"val": 1})
    (root / "VOC2012" / "class_names.txt").unlink()
    layout = sd.resolve_layout(root, "voc")
    assert layout.num_classes == 21 and layout.class_names[15] == "person"


def test_ade20k_layout_ignores_zero_and_shifts_the_classes(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(ade / "images" / split / "ADE_1.jpg")
        Image.fromarray(np.array([[0, 1, 150, 7]] * 6, np.uint8).repeat(2, axis=1)).save(
            ade / "annotations" / split / "ADE_1.png")
    layout = sd.resolve_layout(tmp_path, "ade20k")
    assert (layout.num_classes, layout.ignore_value, layout.label_offset) == (150, 0, 1)
    sample, = sd.list_samples(layout, "validation")
    assert sd.read_labels(sample.mask, layout)[0].tolist() == [150, 150, 0, 0, 149, 149, 6, 6]


def test_folder_layout_with_its_own_ignore_index(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / split / "a.jpg")
        Image.fromarray(np.array([[0, 1, 2, 9]] * 4, np.uint8)).save(tmp_path / "masks" / split / "a.png")
    layout = sd.resolve_layout(tmp_path, "folder", num_classes=3, ignore_index=9)
    sample, = sd.list_samples(layout, "train")
    assert sd.read_labels(sample.mask, layout)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="holds the value 9 .* with 3 classes"):
        sd.read_labels(sample.mask, sd.resolve_layout(tmp_path, "folder", num_classes=3))
    with pytest.raises(ValueError, match="--ignore_index 1 is one of the 3 classes"):
        sd.resolve_layout(tmp_path, "folder", num_classes=3, ignore_index=1)
    with pytest.raises(ValueError, match="needs --num_classes"):
        sd.resolve_layout(tmp_path, "folder")


# ----------------------------------------------------------------------------------------------
# The script end to end, and bad input.
# ----------------------------------------------------------------------------------------------
def test_script_end_to_end_writes_json_masks_and_figures(tmp_path, capsys):
    root = write_voc(tmp_path / "data", {"train": 6, "val": 3}, border=True)
    output = tmp_path / "result.json"
    summary = es.main(parse(*TINY_BACKBONE_ARGS, "--random_init", "--data_path", str(root), "--size", str(SIZE),
                            "--num_workers", "0", "--epochs", "2", "--lrs", "0.1", "0.3", "--memory_size", "50",
                            "--output_json", str(output), "--save_masks", str(tmp_path / "masks"),
                            "--visualize", "2", str(tmp_path / "figures"), "--device", "cpu"))
    assert json.loads(output.read_text())["linear"]["mIoU"] == summary["linear"]["mIoU"]
    printed = capsys.readouterr().out
    assert "FINAL {" in printed
    assert re.search(r"epoch 1/2: loss lr 0\.1: [0-9.]+, lr 0\.3: [0-9.]+  elapsed: \S+  eta: \S+", printed)
    assert (summary["retrieval"]["per_image"], summary["retrieval"]["memory_patches"]) == (8, 48)  # 50 // 6 images
    for protocol in ("linear", "retrieval"):
        masks = sorted((tmp_path / "masks" / protocol).glob("*.png"))
        assert [path.stem for path in masks] == ["val_000", "val_001", "val_002"]
        with Image.open(masks[0]) as mask:
            assert mask.mode == "P" and mask.size == (SIZE, SIZE) and np.array(mask).max() < 4
    figures = sorted((tmp_path / "figures").glob("segmentation_*.png"))
    assert len(figures) == 2 and Image.open(figures[0]).size[0] > 4 * 128


def test_bad_mask_value_is_named_with_file_value_and_class_count(tmp_path):
    root = write_voc(tmp_path, {"train": 2, "val": 1})
    bad = root / "VOC2012" / "SegmentationClass" / "train_001.png"
    utils.write_indexed_png(bad, np.full((SIZE, SIZE), 7))
    with pytest.raises(ValueError, match=r"train_001.png holds the value 7 in 256 pixel\(s\); with 4 classes"):
        run_with_features(root, grey_class_features)


def test_image_and_mask_of_different_sizes_are_refused(tmp_path):
    root = write_voc(tmp_path, {"train": 2, "val": 1})
    utils.write_indexed_png(root / "VOC2012" / "SegmentationClass" / "val_000.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="val_000.png is 16x16 but its mask .* is 8x8"):
        run_with_features(root, grey_class_features)


def test_missing_mask_and_missing_listed_files_are_named(tmp_path):
    root = write_voc(tmp_path, {"train": 3, "val": 1})
    (root / "VOC2012" / "SegmentationClass" / "train_002.png").unlink()
    with open(root / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt", "a") as listing:
        listing.write("not_there\n")
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 names .* train_002 \(mask\), not_there \(image\)"):
        sd.list_samples(voc_layout(root), "train")
    with pytest.raises(FileNotFoundError, match="lists there: train, val"):
        sd.list_samples(voc_layout(root), "trainaug")


def test_folder_layout_image_without_mask_is_named(tmp_path):
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "train" / "lonely.jpg")
    layout = sd.resolve_layout(tmp_path, "folder", num_classes=2)
    with pytest.raises(FileNotFoundError, match="have no mask .* lonely"):
        sd.list_samples(layout, "train")


def test_unknown_layout_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected JPEGImages, ImageSets/Segmentation.*found no folder"):
        sd.resolve_layout(tmp_path, "voc")
    with pytest.raises(FileNotFoundError, match=r"expected images, masks .*found pictures/"):
        sd.resolve_layout(tmp_path, "folder", num_classes=2)
    with pytest.raises(SystemExit):
        parse("--dataset", "cityscapes")


def test_rgb_masks_are_refused(tmp_path):
    root = write_voc(tmp_path, {"train": 1, "val": 1})
    path = root / "VOC2012" / "SegmentationClass" / "val_000.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="is a RGB image; masks must be indexed"):
        sd.read_labels(path, voc_layout(root))


@pytest.mark.parametrize("extra, match", [
    (["--size", "18"], "--size 18 must be a positive multiple of --patch_size 4"),
    (["--k", "0"], "--k must be positive"),
    (["--lrs", "0.1", "0.2", "--holdout_fraction", "1"], "--holdout_fraction must lie in"),
    (["--visualize", "x", "dir"], "positive number of figures"),
])
def test_bad_arguments_are_refused_early(extra, match):
    with pytest.raises(ValueError, match=match):
        es.validate_args(parse(*TINY_BACKBONE_ARGS, "--random_init", "--data_path", "x", *extra))


def test_bad_mask_read_by_a_worker_is_raised_by_the_main_process_as_the_same_message(tmp_path):
    root = write_voc(tmp_path, {"train": 2, "val": 1})
    utils.write_indexed_png(root / "VOC2012" / "SegmentationClass" / "train_001.png", np.full((SIZE, SIZE), 7))
    args = parse("--data_path", str(root), "--size", str(SIZE), "--patch_size", str(PATCH), "--num_workers", "2",
                 "--random_init")
    with pytest.raises(ValueError) as raised:
        es.load_splits(args)  # reads every mask before any model runs
    assert str(raised.value).startswith("mask ") and "DataLoader worker" not in str(raised.value)
    assert "train_001.png holds the value 7" in str(raised.value)


@pytest.mark.parametrize("option, value, what", [
    ("--output_json", "a_file/s.json", "the folder of --output_json"), ("--save_masks", "a_file/masks", "--save_masks"),
    ("--visualize", "a_file/figures", "the folder of --visualize N DIR")])
def test_unwritable_outputs_are_named_before_any_data_or_model_is_read(tmp_path, option, value, what,
                                                                      weights_not_to_load):
    (tmp_path / "a_file").write_text("in the way\n")
    write_voc(tmp_path / "data", {"train": 2, "val": 1})
    values = ["2", str(tmp_path / value)] if option == "--visualize" else [str(tmp_path / value)]
    with pytest.raises(NotADirectoryError, match=rf"{what} .*{value} (.*a_file )?cannot be a folder: .*a_file is a file"):
        es.main(parse(*TINY_BACKBONE_ARGS, "--pretrained_weights", str(weights_not_to_load), "--data_path",
                      str(tmp_path / "data"), "--size", str(SIZE), option, *values, "--device", "cpu"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "data"]
