"""End-to-end training runs of a tiny model: outputs, exact resume, torchrun, bad input, real data."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patch_wise_dino
import utils
from conftest import TINY_ARGS, write_images
from patch_wise_dino import get_args_parser, main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def parse(data, output, *extra):
    return get_args_parser().parse_args(TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


@pytest.fixture
def image_folder(tmp_path):
    return write_images(tmp_path / "data")


def test_two_epoch_run_writes_outputs(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    main(parse(image_folder, output, "--epochs", "2", "--saveckp_freq", "1"))
    assert sorted(p.name for p in output.iterdir()) == ["args.json", "args_history.jsonl", "checkpoint.pth",
                                                        "checkpoint0000.pth", "checkpoint0001.pth", "log.txt"]
    assert json.loads((output / "args.json").read_text())["arch"] == "vit_tiny"
    lines = [json.loads(line) for line in (output / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    for key in ("loss", "loss_cls", "loss_patch", "lr", "wd", "teacher_temp", "matched_patches", "teacher_entropy"):
        assert all(np.isfinite(line[key]) for line in lines), key
    checkpoint = torch.load(output / "checkpoint.pth", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["dino_loss"]["center"].shape == (1 + 16, 64)
    assert "backbone.pos_embed" in checkpoint["teacher"] and "head.last_layer.weight_g" in checkpoint["teacher"]
    assert not torch.equal(checkpoint["dino_loss"]["center"], torch.zeros(17, 64))  # the center moved
    printed = capsys.readouterr().out
    assert "eta:" in printed and "data:" in printed and "Averaged stats:" in printed


def test_dino_baseline_run_and_flat_folder(tmp_path):
    flat = tmp_path / "flat"
    write_images(tmp_path / "tmp", classes=("x",))
    (tmp_path / "tmp" / "x").rename(flat)
    (flat / "notes.txt").write_text("not an image")
    trainer = main(parse(flat, tmp_path / "run", "--epochs", "1", "--patch_loss", "false"))
    assert trainer.loss_fn.center.shape == (1, 64)
    line = json.loads((tmp_path / "run" / "log.txt").read_text())
    assert "loss_patch" not in line and np.isfinite(line["loss_cls"])


class StopAfterFirstEpoch(Exception):
    pass


def test_resume_is_exact(image_folder, tmp_path, monkeypatch):
    uninterrupted = main(parse(image_folder, tmp_path / "full", "--epochs", "3")).teacher.state_dict()

    original = patch_wise_dino.write_epoch_outputs

    def write_then_stop(trainer, output_dir, epoch, stats):
        original(trainer, output_dir, epoch, stats)
        if epoch == 0:
            raise StopAfterFirstEpoch

    monkeypatch.setattr(patch_wise_dino, "write_epoch_outputs", write_then_stop)
    with pytest.raises(StopAfterFirstEpoch):
        main(parse(image_folder, tmp_path / "resumed", "--epochs", "3"))
    monkeypatch.setattr(patch_wise_dino, "write_epoch_outputs", original)
    resumed = main(parse(image_folder, tmp_path / "resumed", "--epochs", "3")).teacher.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    log = (tmp_path / "resumed" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]
    assert log == (tmp_path / "full" / "log.txt").read_text().splitlines()


def test_finished_run_is_not_retrained(image_folder, tmp_path, capsys):
    main(parse(image_folder, tmp_path / "run", "--epochs", "1"))
    main(parse(image_folder, tmp_path / "run", "--epochs", "1"))
    assert "Training already finished" in capsys.readouterr().out
    assert len((tmp_path / "run" / "log.txt").read_text().splitlines()) == 1


def test_bad_checkpoints_stop_with_clear_errors(image_folder, tmp_path):
    output = tmp_path / "run"
    main(parse(image_folder, output, "--epochs", "1"))
    with pytest.raises(ValueError, match=r"other settings .*\n  --embed_dim: checkpoint 32, now 48\n"):
        main(parse(image_folder, output, "--epochs", "2", "--embed_dim", "48"))
    with pytest.raises(RuntimeError, match="does not fit the model"):
        main(parse(image_folder, output, "--epochs", "1", "--embed_dim", "48", "--allow_args_change"))
    (output / "checkpoint.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*checkpoint.pth"):
        main(parse(image_folder, output, "--epochs", "2"))
    torch.save({"model": {}}, output / "checkpoint.pth")
    with pytest.raises(RuntimeError, match="not a PW-Self training checkpoint"):
        main(parse(image_folder, output, "--epochs", "2"))


def test_bad_arguments_and_data_are_named(tmp_path, image_folder):
    with pytest.raises(ValueError, match="--global_crops_size 18 is not a multiple of --patch_size 4"):
        main(parse(image_folder, tmp_path / "run", "--global_crops_size", "18"))
    with pytest.raises(ValueError, match="--data_path .* is not a folder"):
        main(parse(tmp_path / "missing", tmp_path / "run"))
    empty = tmp_path / "empty"
    (empty / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        main(parse(empty, tmp_path / "run"))
    with pytest.raises(ValueError, match="lower --batch_size_per_gpu"):
        main(parse(image_folder, tmp_path / "run", "--batch_size_per_gpu", "64"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        main(parse(image_folder, tmp_path / "run", "--precision", "fp16"))
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data_path", ".", "--patch_loss", "maybe"])


def test_non_finite_loss_stops_and_keeps_checkpoint(image_folder, tmp_path, monkeypatch):
    output = tmp_path / "run"
    main(parse(image_folder, output, "--epochs", "1"))
    before = (output / "checkpoint.pth").read_bytes()
    original_loss = patch_wise_dino.PatchWiseDINOLoss.forward

    def nan_loss(*args, **kwargs):
        loss, stats = original_loss(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(patch_wise_dino.PatchWiseDINOLoss, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, iteration 0 \(loss_cls=.*lr="):
        main(parse(image_folder, output, "--epochs", "2", "--allow_args_change"))
    assert (output / "checkpoint.pth").read_bytes() == before


def run_torchrun(root: Path, data: Path, output: Path, *options: str, succeeds: bool = True,
                 **environment: str) -> str:
    """Two processes of ``crash_launcher.py`` under torchrun, 3 iterations per epoch; their stdout and stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *options,
               str(root / "tests" / "crash_launcher.py"), *TINY_ARGS, "--data_path", str(data),
               "--output_dir", str(output), "--epochs", "2", "--batch_size_per_gpu", "2", "--depth", "2",
               "--save_every_iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **environment}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == succeeds, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_torchrun_keeps_identical_teachers_and_resumes_exactly_after_a_kill_or_a_stop(image_folder, tmp_path, root):
    def torchrun(output, *options, **environment):
        return run_torchrun(root, image_folder, output, *options, **environment)

    printed = torchrun(tmp_path / "ddp")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"teacher_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert any(key.startswith("module.backbone.") for key in checkpoint["student"])
    assert "Data: 12 images" in printed and "3 iterations per epoch" in printed

    # Rank 1 is SIGKILLed inside iteration 1 of epoch 1; torchrun restarts both processes, which resume.
    printed = torchrun(tmp_path / "restarted", "--max_restarts=1", PWSELF_KILL_AT="1:1", PWSELF_KILL_RANK="1",
                       TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see utils.warn_if_restarts_share_a_store
    assert "Resumed from" in printed and "next epoch 1, iteration 1" in printed and "warning: torchrun" not in printed
    restarted = torch.load(tmp_path / "restarted" / "teacher_rank0.pt", weights_only=True)
    assert all(torch.equal(restarted[key], rank0[key]) for key in rank0)

    # Only rank 1 gets SIGTERM, inside iteration 0 (after its vote): every rank stops after iteration 1, where
    # rank 0 saves; torchrun reports the stopped workers as failed. The same command then resumes exactly.
    stopped = tmp_path / "stopped"
    printed = torchrun(stopped, succeeds=False, PWSELF_SIGNAL_AT="0:0:SIGTERM", PWSELF_KILL_RANK="1")
    assert f"stopped on a signal received by another process: {stopped / 'checkpoint.pth'} is saved to continue " \
           "at epoch 0, iteration 2" in printed
    assert torch.load(stopped / "checkpoint.pth", weights_only=True)["iteration"] == 2
    printed = torchrun(stopped)
    assert "Resumed from" in printed and "next epoch 0, iteration 2" in printed
    resumed = torch.load(stopped / "teacher_rank0.pt", weights_only=True)
    assert all(torch.equal(resumed[key], rank0[key]) for key in rank0)


def test_torchrun_refused_on_rank_0_stops_every_rank(image_folder, tmp_path, root):
    output = tmp_path / "run"
    output.mkdir()
    with utils.folder_lock(output):  # another run holds the folder
        printed = run_torchrun(root, image_folder, output, succeeds=False)
    assert f"{output} is in use by another run (pid {os.getpid()} on host" in printed
    assert "rank 0 stopped at the start (its error is printed above); this process stops too" in printed


def read_fashion_mnist(count: int) -> np.ndarray:
    """The first ``count`` training images of the Debian package's IDX file, ``[count, 28, 28]`` uint8."""
    with gzip.open(FASHION_MNIST, "rb") as handle:
        header = np.frombuffer(handle.read(16), dtype=">i4")
        assert header[0] == 2051, "not an IDX image file"
        return np.frombuffer(handle.read(count * 28 * 28), dtype=np.uint8).reshape(count, 28, 28)


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs the Debian package dataset-fashion-mnist")
def test_loss_falls_on_fashion_mnist(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    for index, pixels in enumerate(read_fashion_mnist(256)):
        Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).save(data / f"{index:04}.png")
    args = ["--arch", "vit_tiny", "--patch_size", "4", "--embed_dim", "64", "--depth", "2", "--num_heads", "2",
            "--out_dim", "256", "--head_hidden_dim", "128", "--head_bottleneck_dim", "64",
            "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
            "--batch_size_per_gpu", "32", "--epochs", "4", "--warmup_epochs", "1", "--lr", "0.005",
            "--momentum_teacher", "0.99", "--num_workers", "0", "--print_freq", "100", "--device", "cpu",
            "--data_path", str(data), "--output_dir", str(tmp_path / "run")]
    main(get_args_parser().parse_args(args))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    losses, patch_losses = [line["loss"] for line in log], [line["loss_patch"] for line in log]
    assert losses[-1] < losses[0] and min(losses) < 0.92 * losses[0], losses
    assert patch_losses[-1] < 0.92 * patch_losses[0], patch_losses


@pytest.mark.parametrize("extra", [["--optimizer", "sgd"], ["--optimizer", "lars"], ["--matching", "centre"],
                                   ["--cls_weight", "0.9"], ["--local_crops_number", "0"],
                                   ["--use_bn_in_head", "true", "--norm_last_layer", "false"]])
def test_training_options_run(image_folder, tmp_path, extra):
    trainer = main(parse(image_folder, tmp_path / "run", "--epochs", "1", *extra))
    line = json.loads((tmp_path / "run" / "log.txt").read_text())
    assert np.isfinite(line["loss"]) and trainer.args.epochs == 1


def test_unreadable_images_in_a_row_name_the_last_file_tried(tmp_path, capsys):
    files = []
    for index in range(50):
        files.append(tmp_path / f"bad{index}.jpg")
        files[-1].write_bytes(b"not an image")
    dataset = patch_wise_dino.TrainingImages(files, transform=None)
    for seed in range(3):
        with pytest.raises(RuntimeError, match="10 unreadable images in a row") as error:
            dataset[(seed, seed)]
        tried = [line.split("cannot read image ")[1].split(":")[0] for line in capsys.readouterr().err.splitlines()]
        assert len(tried) == 10 and f"(the last {tried[-1]})" in str(error.value)


def test_every_bad_start_up_argument_is_named_at_once(image_folder, tmp_path):
    (tmp_path / "a_file").write_text("")
    bad = ["--lr", "-0.5", "--clip_grad", "-1", "--weight_decay", "-0.1", "--weight_decay_end", "nan",
           "--min_lr=-1e-6", "--patch_size", "0", "--seed", "-1", "--drop_path_rate", "1.5",
           "--momentum_teacher", "1.5", "--depth", "0"]
    with pytest.raises(ValueError) as error:
        main(parse(image_folder, tmp_path / "a_file", *bad))
    message = str(error.value)
    for problem in ("--lr must be a number >= 0, got -0.5", "--clip_grad must be a number >= 0, got -1.0",
                    "--weight_decay must be", "--weight_decay_end must be a number >= 0, got nan", "--min_lr must",
                    "--patch_size must be positive, got 0", "--seed must be >= 0, got -1",
                    "--drop_path_rate must lie in [0, 1), got 1.5", "--momentum_teacher must lie in [0, 1]",
                    "--depth must be positive", "a_file is a file; choose another --output_dir"):
        assert problem in message, problem
    with pytest.raises(ValueError, match=r"--embed_dim 33 is not a multiple of --num_heads 2"):
        main(parse(image_folder, tmp_path / "run", "--embed_dim", "33", "--num_heads", "2"))
    with pytest.raises(ValueError, match=r"--output_dir .*a_file/run cannot be a folder"):
        main(parse(image_folder, tmp_path / "a_file" / "run"))
    # Zero is meaningful for both (no clipping; a frozen student), so it stays allowed.
    patch_wise_dino.validate_args(parse(image_folder, tmp_path / "run", "--clip_grad", "0", "--lr", "0"))
