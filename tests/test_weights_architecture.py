"""Checkpoints describe themselves: every evaluation, the export, the attention maps and the hub entries take the
architecture, patch size and sizes from the weights when none is given (``vits.resolve_backbone_args``), and
refuse a given one that the weights contradict, naming both."""
import argparse
import subprocess
import sys

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
import vision_transformer as vits
import visualize_attention
from conftest import ROOT, TINY_BACKBONE_ARGS, dino_backbone_state
from test_dino_checkpoint import classes  # noqa: F401 (the module's fixture: labelled images in train/ and val/)
from test_segmentation import write_voc
from test_video_segmentation import write_davis

DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"
CPU = ["--device", "cpu"]


def knn_top1(weights, data, *backbone_args) -> dict:
    """eval_knn.py's results for ``weights`` with ``backbone_args`` (none: the weights' own architecture)."""
    return eval_knn.main(eval_knn.get_args_parser().parse_args(
        [*backbone_args, "--pretrained_weights", str(weights), "--data_path", str(data), "--resize_size", "32",
         "--crop_size", "32", "--nb_knn", "1", "3", "--num_workers", "0", *CPU]))


def without_and_with(main, parser, argv, flags=TINY_BACKBONE_ARGS):
    """``main``'s results for ``argv`` without any backbone flag, then with ``flags`` (the training's)."""
    return main(parser.parse_args(argv)), main(parser.parse_args(flags + argv))


# ----------------------------------------------------------------------------------------------
# A checkpoint of a real training run, with no backbone flag, gives what its flags give.
# ----------------------------------------------------------------------------------------------
def test_knn_and_linear_read_the_architecture_from_a_training_checkpoint(trained_checkpoint, classes, tmp_path,
                                                                          capsys):
    common = ["--pretrained_weights", str(trained_checkpoint), "--data_path", str(classes), "--resize_size", "16",
              "--crop_size", "16", "--num_workers", "0", *CPU]
    knn = without_and_with(eval_knn.main, eval_knn.get_args_parser(), common + ["--nb_knn", "1", "3"])
    assert knn[0] == knn[1]
    assert (f"Backbone of the weights in {trained_checkpoint}: --arch vit_tiny --patch_size 4 --embed_dim 32 --depth 1 "
            "--num_heads 2") in capsys.readouterr().out
    linear = [eval_linear.main(eval_linear.get_args_parser().parse_args(
        flags + common + ["--epochs", "1", "--n_last_blocks", "1", "--batch_size_per_gpu", "4",
                          "--output_dir", str(tmp_path / name)]))
        for name, flags in (("without", []), ("with", TINY_BACKBONE_ARGS))]
    assert (linear[0]["top1"], linear[0]["top5"]) == (linear[1]["top1"], linear[1]["top5"])


def test_retrieval_and_copy_detection_read_the_architecture(trained_checkpoint, revisitop_set, copydays_set, tmp_path):
    common = ["--pretrained_weights", str(trained_checkpoint), "--num_workers", "0", *CPU]
    retrieval = [eval_image_retrieval.main(eval_image_retrieval.get_args_parser().parse_args(
        flags + common + ["--data_path", str(revisitop_set), "--dataset", "tinyox", "--imsize", "48",
                          "--output_dir", str(tmp_path / f"retrieval{index}")]))
        for index, flags in enumerate(([], TINY_BACKBONE_ARGS))]
    copies = [eval_copy_detection.main(eval_copy_detection.get_args_parser().parse_args(
        flags + common + ["--data_path", str(copydays_set), "--imsize", "32",
                          "--output_dir", str(tmp_path / f"copies{index}")]))
        for index, flags in enumerate(([], TINY_BACKBONE_ARGS))]
    assert retrieval[0]["hard"] == retrieval[1]["hard"] and retrieval[0]["medium"] == retrieval[1]["medium"]
    assert copies[0]["overall"] == copies[1]["overall"]


def test_dense_evaluations_read_the_architecture(trained_checkpoint, classes, tmp_path):
    weights = ["--pretrained_weights", str(trained_checkpoint), *CPU]
    correspondence = without_and_with(eval_correspondence.main, eval_correspondence.get_args_parser(), weights + [
        "--data_path", str(classes / "train"), "--size", "16", "--num_images", "4"])
    assert correspondence[0]["all"] == correspondence[1]["all"]
    voc = write_voc(tmp_path / "voc", {"train": 3, "val": 2})
    segmentation = without_and_with(eval_segmentation.main, eval_segmentation.get_args_parser(), weights + [
        "--data_path", str(voc), "--size", "32", "--num_workers", "0", "--epochs", "1"])
    assert segmentation[0]["linear"] == segmentation[1]["linear"]
    davis = write_davis(tmp_path / "davis")
    video = [eval_video_segmentation.main(eval_video_segmentation.get_args_parser().parse_args(
        flags + weights + ["--data_path", str(davis), "--frame_size", "64", "--output_dir", str(tmp_path / name)]))
        for name, flags in (("without", []), ("with", TINY_BACKBONE_ARGS))]
    assert video[0]["J&F"] == video[1]["J&F"]


def test_export_and_attention_maps_read_the_architecture(trained_checkpoint, tmp_path):
    weights = ["--pretrained_weights", str(trained_checkpoint)]
    exports = [export_backbone.main(export_backbone.get_args_parser().parse_args(
        flags + weights + ["--format", "timm", "--output", str(tmp_path / f"{name}.pth")]))
        for name, flags in (("without", []), ("with", TINY_BACKBONE_ARGS))]
    assert exports[0]["img_size"] == exports[1]["img_size"] == 16 and exports[0]["patch_size"] == 4
    without, with_flags = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("without", "with"))
    assert without.keys() == with_flags.keys() and all(torch.equal(without[k], with_flags[k]) for k in without)
    maps = [visualize_attention.main(visualize_attention.get_args_parser().parse_args(
        flags + weights + ["--image_path", str(ROOT / "test.png"), "--image_size", "32",
                           "--output_dir", str(tmp_path / f"attention_{name}"), *CPU]))
        for name, flags in (("without", []), ("with", TINY_BACKBONE_ARGS))]
    assert maps[0]["patch_size"] == 4 and maps[0]["images"][0]["cls_to_cls"] == maps[1]["images"][0]["cls_to_cls"]


def test_hub_entry_reads_the_architecture_of_a_training_checkpoint(trained_checkpoint):
    model = hubconf.vit_tiny(pretrained_weights=str(trained_checkpoint))
    reference = hubconf.vit_tiny(pretrained_weights=str(trained_checkpoint), patch_size=4, embed_dim=32, depth=1,
                                 num_heads=2)
    assert (model.patch_size, model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (4, 32, 1, 2)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    with pytest.raises(ValueError, match=r"--arch vit_small contradicts the weights' vit_tiny \(.*checkpoint.pth, "
                                         r"from its stored args\): drop --arch or give vit_tiny"):
        hubconf.vit_small(pretrained_weights=str(trained_checkpoint))


# ----------------------------------------------------------------------------------------------
# DINO's checkpoints and backbone-only files.
# ----------------------------------------------------------------------------------------------
def test_dinos_own_checkpoint_needs_only_the_heads_its_args_do_not_record(classes):
    # main_dino.py's args record arch vit_tiny and patch 16; the fixture's width 32 and depth 1 are read from its
    # tensors. Its 2 heads are recorded nowhere (its sizes were shrunk in DINO's code), so they must be given.
    with pytest.raises(ValueError, match=r"cannot tell the number of attention heads of the weights in "
                                         r".*dino_main_checkpoint_tiny.pth: their width 32 is no standard "
                                         r"architecture's \(vit_tiny 192, vit_small 384, vit_base 768\).*give --num_heads"):
        knn_top1(DINO_CHECKPOINT, classes)
    full = ["--arch", "vit_tiny", "--patch_size", "16", "--embed_dim", "32", "--depth", "1", "--num_heads", "2"]
    assert knn_top1(DINO_CHECKPOINT, classes, "--num_heads", "2") == knn_top1(DINO_CHECKPOINT, classes, *full)


def write_dino_main_checkpoint(path, width: int, patch_size: int = 16) -> None:
    """A checkpoint in main_dino.py's layout (teacher ``backbone.*``, student ``module.backbone.*``, ``args`` as a
    Namespace recording only arch and patch size) of a one-block ViT-Tiny of the standard width 192."""
    backbone = {f"backbone.{key}": value for key, value in
                dino_backbone_state(patch_size=patch_size, embed_dim=width, depth=1, grid=2).items()}
    torch.save({"teacher": backbone, "student": {f"module.{key}": value for key, value in backbone.items()},
                "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=patch_size, out_dim=64)}, path)


def test_dino_checkpoint_of_a_standard_width_needs_no_flag(classes, tmp_path):
    write_dino_main_checkpoint(tmp_path / "dino.pth", width=192)
    flags = ["--arch", "vit_tiny", "--patch_size", "16", "--depth", "1"]
    assert knn_top1(tmp_path / "dino.pth", classes) == knn_top1(tmp_path / "dino.pth", classes, *flags)
    args = eval_knn.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "dino.pth")])
    vits.validate_backbone_args(args)
    assert (args.arch, args.patch_size, args.embed_dim, args.depth, args.num_heads) == ("vit_tiny", 16, None, 1, None)


def test_backbone_only_files_give_what_their_tensors_determine(classes, tmp_path):
    # DINO's released files, timm state dicts and export_backbone.py's output hold no args: patch, width and depth
    # come from the tensors, and the heads from the architecture of that width.
    torch.save(dino_backbone_state(patch_size=8, embed_dim=192, depth=2, grid=4), tmp_path / "standard.pth")
    flags = ["--arch", "vit_tiny", "--patch_size", "8", "--depth", "2"]
    assert knn_top1(tmp_path / "standard.pth", classes) == knn_top1(tmp_path / "standard.pth", classes, *flags)
    torch.save(dino_backbone_state(patch_size=4, embed_dim=32, depth=1), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"heads of the weights in .*narrow.pth: their width 32 .*give --num_heads"):
        knn_top1(tmp_path / "narrow.pth", classes)
    assert knn_top1(tmp_path / "narrow.pth", classes, "--num_heads", "2") == \
        knn_top1(tmp_path / "narrow.pth", classes, *TINY_BACKBONE_ARGS)


# ----------------------------------------------------------------------------------------------
# A given value the weights contradict is refused, naming both.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, expected, source", [
    ("--patch_size", "16", "4", "from its patch embedding patch_embed.proj.weight"),
    ("--depth", "2", "1", r"from its blocks.\{i\}"),
    ("--num_heads", "4", "2", "from its stored args"),
    ("--arch", "vit_base", "vit_tiny", "from its stored args"),
])
def test_a_flag_the_weights_contradict_is_refused_naming_both(trained_checkpoint, classes, flag, value, expected,
                                                              source):
    message = (rf"{flag} {value} contradicts the weights' {expected} \({trained_checkpoint}, {source}\): drop {flag} "
               rf"or give {expected}")
    with pytest.raises(ValueError, match=message):
        knn_top1(trained_checkpoint, classes, flag, value)


def test_a_contradiction_stops_the_script_with_one_line(trained_checkpoint, classes):
    result = subprocess.run([sys.executable, str(ROOT / "eval_knn.py"), "--pretrained_weights", str(trained_checkpoint),
                             "--patch_size", "16", "--data_path", str(classes), "--crop_size", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"error: --patch_size 16 contradicts the weights' 4 ({trained_checkpoint}, from its patch embedding "
        "patch_embed.proj.weight): drop --patch_size or give 4")


def test_random_init_and_training_keep_their_defaults(tmp_path):
    random = eval_knn.get_args_parser().parse_args(["--random_init"])
    vits.validate_backbone_args(random)
    training = patch_wise_dino.get_args_parser().parse_args(["--data_path", str(tmp_path)])
    assert (random.arch, random.patch_size) == (training.arch, training.patch_size) == ("vit_small", 16)
    assert vits.size_overrides(random) == vits.size_overrides(training) == {}
