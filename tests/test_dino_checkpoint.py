"""A training checkpoint written by DINO's own main_dino.py (``tests/fixtures/dino_main_checkpoint_tiny.pth``, see
tests/fixtures/README.md) is read by every evaluation, the export, the hub entries and ``--resume_from``."""
import json
import zipfile

import numpy as np
import pytest
import torch

import eval_copy_detection
import eval_correspondence
import eval_image_retrieval
import eval_knn
import eval_linear
import eval_segmentation
import eval_video_segmentation
import export_backbone
import hubconf
import patch_wise_dino
import utils
import visualize_attention
from conftest import ROOT, write_images
from test_segmentation import write_voc
from test_video_segmentation import write_davis

DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"
# How the fixture's model was shrunk (its args say vit_tiny/16; width, depth and heads were changed in the code).
DINO_BACKBONE = ["--arch", "vit_tiny", "--patch_size", "16", "--embed_dim", "32", "--depth", "1", "--num_heads", "2"]
WEIGHTS = ["--pretrained_weights", str(DINO_CHECKPOINT)]


def dino_teacher_backbone() -> dict[str, torch.Tensor]:
    """The fixture's teacher backbone tensors, ``backbone.`` stripped, read without our loader."""
    raw = torch.load(DINO_CHECKPOINT, map_location="cpu", weights_only=False)  # our own fixture: trusted
    return {key[len("backbone."):]: value for key, value in raw["teacher"].items() if key.startswith("backbone.")}


# ----------------------------------------------------------------------------------------------
# Reading: the numpy scalars DINO's schedules leave, and nothing more.
# ----------------------------------------------------------------------------------------------
def test_the_dino_checkpoint_reads_with_its_numpy_learning_rates_as_numbers():
    checkpoint = utils.load_checkpoint(DINO_CHECKPOINT)
    groups = checkpoint["optimizer"]["param_groups"]
    raw = torch.load(DINO_CHECKPOINT, map_location="cpu", weights_only=False)["optimizer"]["param_groups"]
    assert isinstance(raw[0]["lr"], np.float64)  # what main_dino.py writes
    assert [(type(g["lr"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (float, float(r["lr"]), float(r["weight_decay"])) for r in raw]
    assert checkpoint["args"]["arch"] == "vit_tiny" and checkpoint["args"]["global_crops_scale"] == (0.4, 1.0)
    assert checkpoint["epoch"] == 1 and set(checkpoint) >= {"student", "teacher", "dino_loss", "fp16_scaler"}


def with_numpy1_spelling(source, target):
    """``source`` rewritten as numpy 1 names its scalars (``numpy.core.multiarray``), as older DINO files do."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data  # protocol 2 names globals as text lines
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            new.writestr(item, data)


def test_numpy1_spelling_reads_and_other_numpy_types_are_still_refused(tmp_path):
    with_numpy1_spelling(DINO_CHECKPOINT, tmp_path / "numpy1.pth")
    assert utils.load_checkpoint(tmp_path / "numpy1.pth")["optimizer"]["param_groups"][0]["lr"] == \
        utils.load_checkpoint(DINO_CHECKPOINT)["optimizer"]["param_groups"][0]["lr"]
    torch.save({"teacher": {}, "step": np.int64(3)}, tmp_path / "int64.pth")
    with pytest.raises(RuntimeError, match=r"int64.pth holds Python objects of type numpy.dtypes.Int64DType; they are "
                                           r"not loaded"):
        utils.load_checkpoint(tmp_path / "int64.pth")
    torch.save({"teacher": {}, "anything": np.array([1.0])}, tmp_path / "array.pth")
    with pytest.raises(RuntimeError, match=r"holds Python objects of type .*numpy"):
        utils.load_checkpoint(tmp_path / "array.pth")


# ----------------------------------------------------------------------------------------------
# Every evaluation, the export and the hub entries read it.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    for split in ("train", "val"):
        write_images(root / split, per_class=3, size=(40, 36), seed=split == "val")
    return root


def test_knn_and_linear_read_the_dino_checkpoint(classes, tmp_path):
    common = DINO_BACKBONE + WEIGHTS + ["--data_path", str(classes), "--resize_size", "32", "--crop_size", "32",
                                        "--num_workers", "0", "--device", "cpu"]
    knn = eval_knn.main(eval_knn.get_args_parser().parse_args(common + ["--nb_knn", "1"]))
    linear = eval_linear.main(eval_linear.get_args_parser().parse_args(
        common + ["--epochs", "1", "--n_last_blocks", "1", "--batch_size_per_gpu", "4",
                  "--output_dir", str(tmp_path / "linear")]))
    assert 0 <= knn[1]["top1"] <= 100 and 0 <= linear["top1"] <= 100


def test_retrieval_and_copy_detection_read_the_dino_checkpoint(revisitop_set, copydays_set, tmp_path):
    common = DINO_BACKBONE + WEIGHTS + ["--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path)]
    retrieval = eval_image_retrieval.main(eval_image_retrieval.get_args_parser().parse_args(
        common + ["--data_path", str(revisitop_set), "--dataset", "tinyox", "--imsize", "48"]))
    copies = eval_copy_detection.main(eval_copy_detection.get_args_parser().parse_args(
        common + ["--data_path", str(copydays_set), "--imsize", "32"]))
    assert 0 <= retrieval["hard"]["mAP"] <= 100 and 0 <= copies["overall"] <= 100


def test_dense_evaluations_read_the_dino_checkpoint(classes, tmp_path):
    correspondence = eval_correspondence.main(eval_correspondence.get_args_parser().parse_args(
        DINO_BACKBONE + WEIGHTS + ["--data_path", str(classes / "train"), "--size", "64", "--num_images", "4",
                                   "--device", "cpu"]))
    voc = write_voc(tmp_path / "voc", {"train": 3, "val": 2})
    segmentation = eval_segmentation.main(eval_segmentation.get_args_parser().parse_args(
        DINO_BACKBONE + WEIGHTS + ["--data_path", str(voc), "--size", "32", "--num_workers", "0", "--epochs", "1",
                                   "--device", "cpu"]))
    davis = write_davis(tmp_path / "davis")
    video = eval_video_segmentation.main(eval_video_segmentation.get_args_parser().parse_args(
        DINO_BACKBONE + WEIGHTS + ["--data_path", str(davis), "--frame_size", "64", "--device", "cpu",
                                   "--output_dir", str(tmp_path / "video")]))
    assert 0 <= correspondence["all"]["accuracy"] <= 100
    assert 0 <= segmentation["linear"]["mIoU"] <= 100 and 0 <= video["J&F"] <= 1


def test_attention_maps_export_and_hub_read_the_dino_checkpoint(tmp_path):
    visualize_attention.main(visualize_attention.get_args_parser().parse_args(
        DINO_BACKBONE + WEIGHTS + ["--image_path", str(ROOT / "test.png"), "--image_size", "32",
                                   "--output_dir", str(tmp_path / "attention"), "--device", "cpu"]))
    assert (tmp_path / "attention" / "attn-head1.png").is_file()
    for form in ("timm", "dino"):
        export_backbone.main(export_backbone.get_args_parser().parse_args(
            DINO_BACKBONE + WEIGHTS + ["--format", form, "--output", str(tmp_path / f"{form}.pth")]))
    exported = torch.load(tmp_path / "dino.pth", weights_only=True)
    teacher = dino_teacher_backbone()
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    model = hubconf.vit_tiny(patch_size=16, embed_dim=32, depth=1, num_heads=2,
                             pretrained_weights=str(DINO_CHECKPOINT))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in teacher.items())


# ----------------------------------------------------------------------------------------------
# --resume_from: DINO's run continues; the patch loss is refused with what to do instead.
# ----------------------------------------------------------------------------------------------
# The fixture's training arguments (checkpoint["args"]), at the fixture's model size and small crops.
DINO_RUN = DINO_BACKBONE + ["--out_dim", "64", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
                            "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
                            "--batch_size_per_gpu", "2", "--warmup_epochs", "0", "--num_workers", "0",
                            "--device", "cpu", "--resume_from", str(DINO_CHECKPOINT)]


def resume(data, output, *extra):
    return patch_wise_dino.main(patch_wise_dino.get_args_parser().parse_args(
        DINO_RUN + ["--data_path", str(data), "--output_dir", str(output), *extra]))


def test_resume_from_the_dino_checkpoint_starts_from_its_exact_state(tmp_path, capsys):
    data = write_images(tmp_path / "data", per_class=2, size=(40, 40))
    resume(data, tmp_path / "run", "--patch_loss", "false", "--epochs", "1")  # its own schedule: nothing to train
    assert "Training already finished" in capsys.readouterr().out
    ours, dino = utils.load_checkpoint(tmp_path / "run" / "checkpoint.pth"), utils.load_checkpoint(DINO_CHECKPOINT)
    for part in ("student", "teacher"):  # DINO's 14x14 position grid kept (resampled for 32 px at forward time)
        expected = utils.strip_prefixes(dino[part])
        assert ours[part].keys() == expected.keys()
        assert all(torch.equal(ours[part][key], expected[key]) for key in expected)
    assert torch.equal(ours["dino_loss"]["center"], dino["dino_loss"]["center"])
    for ours_state, dino_state in zip(ours["optimizer"]["state"].values(), dino["optimizer"]["state"].values()):
        assert all(torch.equal(ours_state[name], dino_state[name]) for name in ("exp_avg", "exp_avg_sq", "step"))
    assert ours["epoch"] == dino["epoch"] == 1

    resume(data, tmp_path / "longer", "--patch_loss", "false", "--epochs", "2", "--allow_args_change")
    log = [json.loads(line) for line in (tmp_path / "longer" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [1] and np.isfinite(log[0]["loss"])


def test_resume_from_the_dino_checkpoint_with_the_patch_loss_says_what_to_do(tmp_path):
    data = write_images(tmp_path / "data", per_class=2, size=(40, 40))
    with pytest.raises(ValueError, match=r"holds DINO's loss state \(one CLS centre, \[1, 64\]\), but --patch_loss "
                                         r"true needs a centre per token \(\[5, 64\]\).*--patch_loss false to continue "
                                         r"DINO's training exactly.*--init_weights"):
        resume(data, tmp_path / "run", "--patch_loss", "true", "--epochs", "1")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()

