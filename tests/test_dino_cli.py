"""DINO's command lines run here: each evaluation line of DINO's README, with DINO's own flags (``--use_cuda``,
``--dist_url``, ``--local_rank``, ``--num_labels``, ``--bs``, ``--use_fp16``) in DINO's value syntax, on the checkpoint
DINO's main_dino.py wrote (``tests/fixtures/dino_main_checkpoint_tiny.pth``), and eval_knn.py under a real
``python -m torch.distributed.launch`` without ``--use_env`` (which passes ``--local-rank=0``)."""
import json
import os
import socket
import subprocess
import sys

import pytest

import eval_copy_detection
import eval_image_retrieval
import eval_knn
import eval_linear
import eval_video_segmentation
import patch_wise_dino
from conftest import ROOT, TINY_ARGS, write_images
from test_video_segmentation import write_davis

DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"
# The fixture's model (see tests/fixtures/README.md), its weights, and small sizes for a CPU.
DINO_MODEL = ["--arch", "vit_tiny", "--patch_size", "16", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
              "--pretrained_weights", str(DINO_CHECKPOINT)]
SMALL = ["--num_workers", "0", "--device", "cpu"]
KNN_SMALL = SMALL + ["--resize_size", "32", "--crop_size", "32", "--nb_knn", "1", "3"]


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """Each test starts without a launcher's variables, and the LOCAL_RANK that ``--local_rank`` sets is removed."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.pop("LOCAL_RANK", None)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """An ImageFolder root with train/ and val/ of three classes."""
    root = tmp_path_factory.mktemp("imagenet")
    write_images(root / "train", classes=("a", "b", "c"), per_class=3, size=(40, 36), seed=0)
    write_images(root / "val", classes=("a", "b", "c"), per_class=2, size=(40, 36), seed=1)
    return root


def final_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("FINAL ")][-1][len("FINAL "):])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# eval_knn.py: README "python -m torch.distributed.launch --nproc_per_node=1 eval_knn.py --pretrained_weights
# /path/to/checkpoint.pth --checkpoint_key teacher --data_path /path/to/imagenet".
# ----------------------------------------------------------------------------------------------
def test_knn_readme_line_runs_under_torch_distributed_launch(imagenet_like):
    line = DINO_MODEL + ["--checkpoint_key", "teacher", "--data_path", str(imagenet_like)] + KNN_SMALL
    single = eval_knn.main(eval_knn.get_args_parser().parse_args(line))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1",
                               f"--master_port={free_port()}", str(ROOT / "eval_knn.py"), *line],
                              env=env, capture_output=True, text=True, timeout=180)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert {int(k): v for k, v in final_line(launched.stdout)["results"].items()} == single


def test_knn_takes_dinos_use_cuda_local_rank_and_dist_url(imagenet_like, capsys):
    line = DINO_MODEL + ["--data_path", str(imagenet_like)] + KNN_SMALL
    plain = eval_knn.main(eval_knn.get_args_parser().parse_args(line))
    dino = eval_knn.main(eval_knn.get_args_parser().parse_args(
        line + ["--use_cuda", "false", "--local_rank", "0", "--dist_url", "env://"]))
    assert dino == plain
    assert "note: --use_cuda false (DINO's flag) is ignored: --device cpu decides" in capsys.readouterr().out
    assert os.environ["LOCAL_RANK"] == "0"  # what torch.distributed.launch's --local_rank stands for


def test_dino_launch_flags_that_cannot_hold_are_refused(imagenet_like, monkeypatch):
    line = DINO_MODEL + ["--data_path", str(imagenet_like)] + KNN_SMALL
    parser = eval_knn.get_args_parser()
    with pytest.raises(ValueError, match=r"--dist_url tcp://10.0.0.1:23456 is not supported.*env://.*torchrun "
                                         r"--nnodes N --node_rank R --master_addr HOST --master_port PORT"):
        eval_knn.main(parser.parse_args(line + ["--dist_url", "tcp://10.0.0.1:23456"]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--local_rank 0 disagrees with LOCAL_RANK=1 set by the launcher"):
        eval_knn.main(parser.parse_args(line + ["--local-rank=0"]))


def test_readme_line_without_weights_names_dinos_released_ones(imagenet_like):
    # DINO's README "eval_knn.py --data_path /path/to/imagenet" evaluates its released ViT-S/16: name it here.
    with pytest.raises(ValueError, match=r"--pretrained_weights dino_vits16"):
        eval_knn.main(eval_knn.get_args_parser().parse_args(["--data_path", str(imagenet_like)] + KNN_SMALL))


# ----------------------------------------------------------------------------------------------
# eval_linear.py: README "python -m torch.distributed.launch --nproc_per_node=8 eval_linear.py --data_path
# /path/to/imagenet", then "python eval_linear.py --evaluate --arch vit_small --patch_size 16 --data_path ...".
# ----------------------------------------------------------------------------------------------
def test_linear_readme_lines_train_then_evaluate_with_num_labels(imagenet_like, tmp_path):
    small = DINO_MODEL + ["--data_path", str(imagenet_like), "--output_dir", str(tmp_path / "linear"),
                          "--epochs", "1", "--n_last_blocks", "1", "--batch_size_per_gpu", "4", "--resize_size", "32",
                          "--crop_size", "32"] + SMALL
    parser = eval_linear.get_args_parser()
    trained = eval_linear.main(parser.parse_args(small + ["--local_rank", "0", "--dist_url", "env://",
                                                          "--num_labels", "3"]))
    evaluated = eval_linear.main(parser.parse_args(["--evaluate"] + small + ["--num_labels", "3"]))
    assert evaluated == trained  # the one epoch's validation is the saved heads' evaluation
    with pytest.raises(ValueError, match=r"--num_labels 1000, but .*train holds 3 classes.*leave out --num_labels "
                                         r"\(or set it to 3\)"):
        eval_linear.main(parser.parse_args(["--evaluate"] + small + ["--num_labels", "1000"]))


# ----------------------------------------------------------------------------------------------
# eval_video_segmentation.py: README "python eval_video_segmentation.py --data_path $HOME/davis-2017/DAVIS/
# --output_dir /path/to/saving_dir", with DINO's --bs.
# ----------------------------------------------------------------------------------------------
def test_video_segmentation_readme_line_with_dinos_bs(tmp_path, capsys):
    davis = write_davis(tmp_path / "davis")
    line = DINO_MODEL + ["--data_path", str(davis), "--output_dir", str(tmp_path / "out"), "--frame_size", "64",
                         "--device", "cpu"]
    with_bs = eval_video_segmentation.main(eval_video_segmentation.get_args_parser().parse_args(line + ["--bs", "6"]))
    assert "note: --bs 6 (DINO's flag, unused by DINO too) is ignored" in capsys.readouterr().out
    assert 0 <= with_bs["J&F"] <= 1 and with_bs["scored_videos"] == 1


# ----------------------------------------------------------------------------------------------
# eval_image_retrieval.py and eval_copy_detection.py: README "python -m torch.distributed.launch --use_env
# --nproc_per_node=1 eval_image_retrieval.py --imsize 512 --multiscale 1 --data_path ... --dataset rparis6k" and
# "... eval_copy_detection.py --data_path ... --whitening_path ... --distractors_path ...", with DINO's --use_cuda.
# ----------------------------------------------------------------------------------------------
def test_retrieval_and_copy_detection_readme_lines_with_dinos_flags(revisitop_set, copydays_set, tmp_path,
                                                                     capsys):
    dino_flags = ["--use_cuda", "true", "--dist_url", "env://", "--local_rank", "0"]
    retrieval = ["--imsize", "64", "--multiscale", "1", "--data_path", str(revisitop_set), "--dataset", "tinyox",
                 "--output_dir", str(tmp_path)] + DINO_MODEL + SMALL
    parser = eval_image_retrieval.get_args_parser()
    assert eval_image_retrieval.main(parser.parse_args(retrieval + dino_flags)) == \
        eval_image_retrieval.main(parser.parse_args(retrieval))
    copies = ["--data_path", str(copydays_set), "--whitening_path", str(copydays_set / "whitening"),
              "--distractors_path", str(copydays_set / "distractors"), "--imsize", "32",
              "--output_dir", str(tmp_path)] + DINO_MODEL + SMALL
    parser = eval_copy_detection.get_args_parser()
    assert eval_copy_detection.main(parser.parse_args(copies + dino_flags)) == \
        eval_copy_detection.main(parser.parse_args(copies))
    assert capsys.readouterr().out.count("note: --use_cuda true (DINO's flag) is ignored") == 2


# ----------------------------------------------------------------------------------------------
# Training: README "python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small --data_path
# /path/to/imagenet/train --output_dir /path/to/saving_dir", with --use_fp16 false.
# ----------------------------------------------------------------------------------------------
def test_main_dino_readme_line_trains_with_use_fp16_false(tmp_path):
    data = write_images(tmp_path / "train", per_class=4, size=(40, 40))
    line = ["--data_path", str(data), "--output_dir", str(tmp_path / "run"), "--use_fp16", "false",
            "--local_rank", "0", "--dist_url", "env://", "--epochs", "1"] + TINY_ARGS
    patch_wise_dino.main(patch_wise_dino.get_args_parser().parse_args(line))
    assert json.loads((tmp_path / "run" / "args.json").read_text())["precision"] == "fp32"
    assert (tmp_path / "run" / "checkpoint.pth").is_file()


@pytest.mark.parametrize("flags, precision", [(["--use_fp16", "true"], "fp16"), (["--use_fp16", "False"], "fp32"),
                                              (["--use_fp16", "1", "--precision", "fp16"], "fp16")])
def test_use_fp16_is_dinos_precision(tmp_path, flags, precision):
    args = patch_wise_dino.get_args_parser().parse_args(["--data_path", str(tmp_path)] + TINY_ARGS + flags)
    patch_wise_dino.validate_args(args)
    assert args.precision == precision


def test_use_fp16_contradicting_precision_is_refused(tmp_path):
    args = patch_wise_dino.get_args_parser().parse_args(
        ["--data_path", str(tmp_path), "--use_fp16", "true", "--precision", "bf16"] + TINY_ARGS)
    with pytest.raises(ValueError, match=r"--use_fp16 true \(DINO's flag for --precision fp16\) contradicts "
                                         r"--precision bf16: give only one of them"):
        patch_wise_dino.validate_args(args)
