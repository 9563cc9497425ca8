"""Retrieval metrics by hand, and the retrieval and copy-detection scripts on tiny real-layout sets."""
import json
import pickle

import numpy as np
import pytest
import torch

import eval_copy_detection
import eval_image_retrieval
from conftest import PHOTOS, TINY_BACKBONE_ARGS
from eval_image_retrieval import average_precision, compute_map, protocol_ground_truth


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------
def test_average_precision_by_hand():
    # Positives found at ranks 0 and 2 of 3 in total:
    # (1 + 1) / 2 / 3 + (1/2 + 2/3) / 2 / 3 = 1/3 + 7/36.
    assert average_precision(np.array([0, 2]), 3) == pytest.approx(1 / 3 + 7 / 36)
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert average_precision(np.array([], dtype=int), 2) == 0.0
    # Found at ranks 1 and 3 of 2: (0 + 1/2) / 4 + (1/3 + 1/2) / 4.
    assert average_precision(np.array([1, 3]), 2) == pytest.approx(0.125 + 5 / 24)


def test_compute_map_with_junk_and_empty_queries():
    ranks = np.array([[3, 4, 0], [1, 1, 1], [4, 0, 2], [0, 2, 3], [2, 3, 4]])  # [n_database=5, n_queries=3]
    gnd = [
        {"ok": [1, 0], "junk": []},  # positives at ranks 1 and 3
        {"ok": [1], "junk": [4]},  # junk ranked first: the positive moves to rank 0
        {"ok": [], "junk": [0]},  # no positives: skipped
    ]
    mean_ap, aps, mean_pr, prs = compute_map(ranks, gnd, kappas=(1, 5, 10))
    assert aps[0] == pytest.approx(0.125 + 5 / 24) and aps[1] == pytest.approx(1.0) and np.isnan(aps[2])
    assert mean_ap == pytest.approx((0.125 + 5 / 24 + 1.0) / 2)
    # P@k caps k at the last positive's (1-based) position: query 0 has positives at 2 and 4.
    np.testing.assert_allclose(prs[0], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(prs[1], [1.0, 1.0, 1.0])  # k = 10 is beyond the database size
    np.testing.assert_allclose(mean_pr, [0.5, 0.75, 0.75])
    assert np.isnan(prs[2]).all()


def test_protocols_choose_positives_and_junk():
    gnd = [{"easy": [1], "hard": [2], "junk": [3], "bbx": [0, 0, 1, 1]}]
    easy, medium, hard = (protocol_ground_truth(gnd, p)[0] for p in ("easy", "medium", "hard"))
    assert easy["ok"].tolist() == [1] and sorted(easy["junk"].tolist()) == [2, 3]
    assert sorted(medium["ok"].tolist()) == [1, 2] and medium["junk"].tolist() == [3]
    assert hard["ok"].tolist() == [2] and sorted(hard["junk"].tolist()) == [1, 3]


# ----------------------------------------------------------------------------------------------
# Tiny data sets in the real layouts, made from natural photos.
# ----------------------------------------------------------------------------------------------
def retrieval_args(data, output, *extra):
    return eval_image_retrieval.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--data_path", str(data), "--dataset", "tinyox", "--imsize", "48", "--num_workers", "0",
                              "--device", "cpu", "--output_dir", str(output), *extra])


def test_retrieval_script_end_to_end(revisitop_set, trained_checkpoint, tmp_path, capsys):
    random = eval_image_retrieval.main(retrieval_args(revisitop_set, tmp_path, "--random_init"))
    assert set(random) == {"easy", "medium", "hard"}
    assert set(random["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    assert all(0 <= value <= 100 for protocol in random.values() for value in protocol.values())
    # Mildly compressed crops of the query photo are found first even by random features.
    assert random["easy"]["mAP"] > 80
    written = json.loads((tmp_path / "retrieval_tinyox.json").read_text())
    assert written["results"] == random and written["weights"] == "random_init"
    multiscale = eval_image_retrieval.main(retrieval_args(revisitop_set, tmp_path, "--random_init",
                                                          "--multiscale", "true", "--use_faiss"))
    assert multiscale.keys() == random.keys()
    trained = eval_image_retrieval.main(retrieval_args(revisitop_set, tmp_path, "--pretrained_weights",
                                                       str(trained_checkpoint)))
    assert 0 <= trained["hard"]["mAP"] <= 100
    assert "FINAL " in capsys.readouterr().out


def test_retrieval_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
        eval_image_retrieval.main(retrieval_args(tmp_path, tmp_path, "--random_init", "--dataset", "roxford5k"))


def copydays_args(root, output, *extra):
    return eval_copy_detection.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--data_path", str(root), "--imsize", "32", "--num_workers", "0", "--device", "cpu",
                              "--batch_size_per_gpu", "4", "--output_dir", str(output), *extra])


def test_copydays_layout_and_positives(copydays_set):
    originals, blocks = eval_copy_detection.read_copydays(copydays_set)
    assert list(blocks) == ["strong", "jpegqual/10", "jpegqual/50", "crops/20", "crops/50"]
    assert len(originals) == len(PHOTOS) and all(len(files) == len(PHOTOS) for files in blocks.values())
    strong_query = blocks["strong"][2]
    assert eval_copy_detection.positives_of(strong_query, "strong", originals).tolist() == [2]
    assert eval_copy_detection.positives_of(blocks["crops/50"][4], "crops/50", originals).tolist() == [4]


def test_copy_detection_script_end_to_end(copydays_set, trained_checkpoint, tmp_path):
    random = eval_copy_detection.main(copydays_args(copydays_set, tmp_path, "--random_init"))
    assert set(random) == {"strong", "jpegqual/10", "jpegqual/50", "crops/20", "crops/50", "overall"}
    assert all(0 <= value <= 100 for value in random.values())
    assert random["jpegqual/50"] > 80  # near-duplicates are found first
    assert json.loads((tmp_path / "copydays.json").read_text())["mAP"] == random
    extras = eval_copy_detection.main(copydays_args(
        copydays_set, tmp_path, "--pretrained_weights", str(trained_checkpoint),
        "--distractors_path", str(copydays_set / "distractors"), "--whitening_path", str(copydays_set / "whitening")))
    assert extras.keys() == random.keys()
    summary = json.loads((tmp_path / "copydays.json").read_text())
    assert summary["whitening"] and summary["distractors"] == len(PHOTOS)


def test_gem_features_and_whitening():
    model = eval_copy_detection.vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features = eval_copy_detection.cls_gem_features(model, images)
        tokens = model.forward_features(images)
    assert features.shape == (3, 64)
    torch.testing.assert_close(features[:, :32], tokens[:, 0])
    torch.testing.assert_close(features[:, 32:], tokens[:, 1:].clamp(min=1e-6).pow(4).mean(1).pow(0.25))
    samples = torch.randn(200, 8) @ torch.randn(8, 8)
    whitened = eval_copy_detection.PCAWhitening(samples)(samples)
    torch.testing.assert_close(whitened.T @ whitened / 200, torch.eye(8), atol=1e-3, rtol=1e-3)
    few = eval_copy_detection.PCAWhitening(samples[:5])  # fewer samples than dimensions
    assert few.projection.shape == (8, 4) and torch.isfinite(few(samples)).all()


# ----------------------------------------------------------------------------------------------
# Settings and inputs that are refused at the start (docs/troubleshooting.md).
# ----------------------------------------------------------------------------------------------
def with_boxes(revisitop_set, folder, boxes: dict):
    """A copy of the revisitop set's ground truth (same images) with some query boxes replaced."""
    with open(revisitop_set / "tinyox" / "gnd_tinyox.pkl", "rb") as handle:
        ground_truth = pickle.load(handle)
    for query, box in boxes.items():
        ground_truth["gnd"][query]["bbx"] = box
    (folder / "tinyox").mkdir(parents=True)
    (folder / "tinyox" / "jpg").symlink_to(revisitop_set / "tinyox" / "jpg")
    with open(folder / "tinyox" / "gnd_tinyox.pkl", "wb") as handle:
        pickle.dump(ground_truth, handle)
    return folder


@pytest.mark.parametrize("box, message", [
    ([10, 5, 10, 30], r"query 1 \(\w+_query\) in gnd_tinyox.pkl has the box \[10, 5, 10, 30\], which crops to 0x25 "
                      r"pixels \(x2 <= x1 or y2 <= y1\): fix that box, or drop the query"),
    ([10.2, 5, 10.4, 30], r"query 1 .* has the box \[10.2, 5, 10.4, 30\], which crops to 0x25"),  # PIL rounds
    ([30, 5, 10, 30], r"query 1 .* which crops to 0x25"),
    ([0, 0, 200, 3], r"query 1 .*\(200x3 pixels\): resized to --imsize 48 its shorter side is 1 pixels, under one "
                     r"patch \(--patch_size 4\); raise --imsize"),
])
def test_degenerate_query_boxes_are_named(revisitop_set, tmp_path, box, message):
    data = with_boxes(revisitop_set, tmp_path / "data", {1: box})
    with pytest.raises(ValueError, match=message):
        eval_image_retrieval.main(retrieval_args(data, tmp_path, "--random_init"))


@pytest.mark.parametrize("extra, message", [
    (["--imsize", "3"], r"--imsize 3 gives images of 3 pixels, smaller than one patch \(--patch_size 4\)"),
    (["--imsize", "6", "--multiscale", "true"], r"--imsize 6 gives images of 3 pixels at the 1/2 scale of "),
])
def test_retrieval_imsize_below_a_patch_is_refused_at_start(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):  # before the (absent) ground truth is even looked for
        eval_image_retrieval.main(retrieval_args(tmp_path, tmp_path, "--random_init", *extra))


@pytest.mark.parametrize("extra, message", [
    (["--topk", "0"], r"--topk must be at least 1 \(results retrieved per query\), got 0"),
    (["--imsize", "30"], r"--imsize 30 must be a positive multiple of --patch_size 4"),
])
def test_copy_detection_bad_arguments_are_named_at_start(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):  # before the (absent) Copydays folder is even looked for
        eval_copy_detection.main(copydays_args(tmp_path, tmp_path, "--random_init", *extra))


def test_non_finite_weights_are_refused_by_retrieval_and_copy_detection(revisitop_set, copydays_set,
                                                                        trained_checkpoint, tmp_path):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["teacher"]["backbone.patch_embed.proj.weight"].view(-1)[3] = float("nan")
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    weights = ["--pretrained_weights", str(tmp_path / "checkpoint.pth")]
    diverged = r"not finite: tensor patch_embed.proj.weight holds NaN or infinity; this is a training checkpoint"
    with pytest.raises(RuntimeError, match=diverged):
        eval_image_retrieval.main(retrieval_args(revisitop_set, tmp_path, *weights))
    with pytest.raises(RuntimeError, match=diverged):
        eval_copy_detection.main(copydays_args(copydays_set, tmp_path, *weights))
    assert not (tmp_path / "copydays.json").exists() and not (tmp_path / "retrieval_tinyox.json").exists()
