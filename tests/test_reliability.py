"""Crashes and bad input (docs/troubleshooting.md): killed and resumed runs end bitwise like an
uninterrupted one; bad images, arguments and checkpoints give clear errors or are handled."""
import argparse
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_linear
import patch_wise_dino
import utils
import vision_transformer as vits
from conftest import TINY_ARGS, TINY_BACKBONE_ARGS, small_tmpfs, write_images
from patch_wise_dino import get_args_parser, main

RUN = ["--epochs", "2", "--save_every_iters", "1", "--depth", "2"]  # 3 iterations per epoch; depth 2 has drop-path
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}  # conftest's thread count


def parse(data, output, *extra):
    return get_args_parser().parse_args(TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its data folder, output folder and final teacher."""
    root = tmp_path_factory.mktemp("reference")
    data = write_images(root / "data")
    teacher = main(parse(data, root / "run", *RUN)).teacher.state_dict()
    return data, root / "run", teacher


def assert_same_run(output: Path, teacher: dict, reference) -> None:
    """Bitwise the reference's teacher and, line for line, its log."""
    _, reference_output, reference_teacher = reference
    assert teacher.keys() == reference_teacher.keys()
    assert all(torch.equal(teacher[key], reference_teacher[key]) for key in teacher)
    assert (output / "log.txt").read_text() == (reference_output / "log.txt").read_text()


def read_until(process: subprocess.Popen, text: str) -> str:
    """The process's output up to and including the first line containing ``text``."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never printed; output:\n{''.join(seen)[-3000:]}")


def next_step(path: Path) -> tuple[int, int]:
    checkpoint = utils.load_checkpoint(path)
    return checkpoint["epoch"], checkpoint["iteration"]


# ----------------------------------------------------------------------------------------------
# Crashes.
# ----------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_at_epoch_1_iteration_2(monkeypatch) -> None:
    """Make training raise ``Crash`` in iteration 2 of epoch 1 (checkpoint.pth then continues at (1, 2) with
    --save_every_iters 1)."""
    step = patch_wise_dino.Trainer.step

    def crashing_step(self, images, geometry, epoch, iteration, iteration_in_epoch):
        if (epoch, iteration_in_epoch) == (1, 2):
            raise Crash
        return step(self, images, geometry, epoch, iteration, iteration_in_epoch)

    monkeypatch.setattr(patch_wise_dino.Trainer, "step", crashing_step)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_mid_epoch_resume_is_exact(reference, tmp_path, monkeypatch, capsys, workers):
    data, _, _ = reference
    output = tmp_path / "run"
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        main(parse(data, output, *RUN, "--num_workers", workers))
    monkeypatch.undo()
    assert next_step(output / "checkpoint.pth") == (1, 2)
    with open(output / "log.txt", "a") as log:  # as if killed after logging an epoch, before its checkpoint
        log.write(json.dumps({"epoch": 1, "loss": 0.0}) + "\n" + '{"epoch": 1, "lo')
    capsys.readouterr()
    teacher = main(parse(data, output, *RUN, "--num_workers", workers)).teacher.state_dict()
    printed = capsys.readouterr().out
    assert "Resumed from" in printed and "next epoch 1, iteration 2" in printed and "Dropped 2 line(s)" in printed
    assert_same_run(output, teacher, reference)


def test_sigkill_at_any_moment_then_resume(reference, tmp_path, root):
    data, _, _ = reference
    output = tmp_path / "run"
    command = [sys.executable, str(root / "patch_wise_dino.py"), *TINY_ARGS, "--data_path", str(data),
               "--output_dir", str(output), *RUN]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        read_until(process, "next epoch 0, iteration 2")
        os.kill(process.pid, signal.SIGKILL)  # wherever it is now: mid-iteration, mid-save, ...
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert next_step(output / "checkpoint.pth") >= (0, 2)  # a complete checkpoint, at least that far
    assert (output / utils.LOCK_NAME).exists()  # left locked by a dead process: the OS released it
    teacher = main(parse(data, output, *RUN)).teacher.state_dict()
    assert_same_run(output, teacher, reference)
    assert not (output / utils.LOCK_NAME).exists()


def test_sigkill_inside_checkpoint_write_keeps_the_previous_one(reference, tmp_path, root, capsys):
    data, _, _ = reference
    output = tmp_path / "run"
    command = [sys.executable, str(root / "tests" / "crash_launcher.py"), *TINY_ARGS, "--data_path", str(data),
               "--output_dir", str(output), *RUN]
    # Writes of checkpoint.pth: at the start, after iterations 0 and 1, at the end of epoch 0 (the 4th).
    result = subprocess.run(command, env={**SUBPROCESS_ENV, "PWSELF_KILL_IN_SAVE": "4"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]
    temporaries = list(output.glob(".checkpoint.pth.tmp.*"))
    assert len(temporaries) == 1 and next_step(temporaries[0]) == (1, 0)  # the new one was complete ...
    assert next_step(output / "checkpoint.pth") == (0, 2)  # ... but not in place: the previous one holds
    assert len((output / "log.txt").read_text().splitlines()) == 1  # epoch 0 was logged before the kill
    teacher = main(parse(data, output, *RUN)).teacher.state_dict()
    assert f"Removed {temporaries[0]}" in capsys.readouterr().out and not temporaries[0].exists()
    assert_same_run(output, teacher, reference)


# How a full disk shows: Python's own writes raise OSError; torch.save's writer raises RuntimeError.
FULL_DISK_ERRORS = [(OSError(errno.ENOSPC, "No space left on device"), r"\[Errno 28\] No space left on device"),
                    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                     r"\[enforce fail at inline_container.cc:672\] \. unexpected pos 704 vs 598")]


@pytest.mark.parametrize("error, shown", FULL_DISK_ERRORS, ids=["OSError", "RuntimeError"])
def test_full_disk_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, error, shown):
    data, _, _ = reference
    output = tmp_path / "run"
    save, before = torch.save, {}

    def save_until_disk_full(state, handle):
        if state["epoch"] == 1:  # the end of epoch 0: the disk is full
            before["bytes"] = (output / "checkpoint.pth").read_bytes()
            handle.write(b"partial")
            raise error
        save(state, handle)

    monkeypatch.setattr(utils.torch, "save", save_until_disk_full)
    with pytest.raises(OSError, match=rf"could not write .*checkpoint.pth: {shown}\. "
                                      r"The previous checkpoint.pth \(if any\) is intact; free disk space \("):
        main(parse(data, output, *RUN))
    monkeypatch.undo()
    assert (output / "checkpoint.pth").read_bytes() == before["bytes"]
    assert next_step(output / "checkpoint.pth") == (0, 2)
    assert sorted(p.name for p in output.iterdir()) == ["args.json", "args_history.jsonl", "checkpoint.pth",
                                                    "log.txt"]  # no temporary


def test_non_finite_weights_are_never_saved(reference, tmp_path, monkeypatch):
    data, _, _ = reference
    output = tmp_path / "run"
    optimise, calls = patch_wise_dino.Trainer._optimise, []

    def optimise_then_diverge(self, loss, epoch):
        optimise(self, loss, epoch)
        calls.append(epoch)
        if len(calls) == 2:
            next(self.student.parameters()).data[0] = float("inf")

    monkeypatch.setattr(patch_wise_dino.Trainer, "_optimise", optimise_then_diverge)
    with pytest.raises(FloatingPointError, match=r"weights are not finite at the checkpoint for epoch 0, iteration 2"
                                                 r".*last good checkpoint .* is untouched"):
        main(parse(data, output, *RUN))
    assert next_step(output / "checkpoint.pth") == (0, 1)


# ----------------------------------------------------------------------------------------------
# A run's lifecycle: one run per folder, full disks, stop signals, a missing commit point.
# ----------------------------------------------------------------------------------------------
def test_full_disk_on_a_real_file_system_keeps_the_previous_checkpoint(reference, tmp_path):
    data, _, _ = reference
    # 768 KiB hold the first checkpoint (~340 KB, no optimizer state yet) but not a second one (~670 KB) beside it.
    with small_tmpfs(tmp_path / "disk", "size=768k") as disk:
        with pytest.raises(OSError, match=r"could not write .*checkpoint.pth: .*\. The previous checkpoint.pth "
                                          r"\(if any\) is intact; free disk space \(0\.\d MiB free there\)"):
            main(parse(data, disk / "run", *RUN))
        assert next_step(disk / "run" / "checkpoint.pth") == (0, 0)  # the first one, whole
        assert sorted(p.name for p in (disk / "run").iterdir()) == ["args.json", "args_history.jsonl",
                                                            "checkpoint.pth"]  # no temporary


def test_folder_lock_names_its_holder_and_goes_away(tmp_path):
    with utils.folder_lock(tmp_path) as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on host {socket.gethostname()}, started ")
        with pytest.raises(FileExistsError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} "):
            with utils.folder_lock(tmp_path):  # a second open file: flock refuses it even in this process
                pass
    assert not path.exists()
    with utils.folder_lock(tmp_path):  # free again
        pass


def start_training(data: Path, output: Path, root: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(root / "patch_wise_dino.py"), *TINY_ARGS, "--data_path", str(data),
               "--output_dir", str(output), *RUN, *extra]
    return subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_second_run_in_a_folder_is_refused_and_leaves_the_live_run_alone(reference, tmp_path, root):
    data, reference_output, _ = reference
    output = tmp_path / "run"
    first = start_training(data, output, root)
    try:
        read_until(first, "next epoch 0, iteration 1")
        os.kill(first.pid, signal.SIGSTOP)  # alive and holding the lock while the second one starts
        in_flight = output / f".checkpoint.pth.tmp.{first.pid}"  # as if caught while writing a checkpoint
        in_flight.write_bytes(b"a checkpoint being written")
        second = start_training(data, output, root, "--lr", "0.001")
        printed = second.communicate(timeout=300)[0]
        assert second.returncode == 1 and "Traceback" not in printed
        assert f"{output} is in use by another run (pid {first.pid} on host {socket.gethostname()}, started " in printed
        assert in_flight.read_bytes() == b"a checkpoint being written"  # refused before cleaning
        in_flight.unlink()
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert (output / "log.txt").read_text() == (reference_output / "log.txt").read_text()  # one line per epoch
    assert json.loads((output / "args.json").read_text())["lr"] == 0.0005  # the first run's, not the second's


def test_stop_signals_are_recorded_until_a_second_ctrl_c(capfd):
    before = {number: signal.getsignal(number) for number in utils.StopSignals.signals}
    with utils.StopSignals() as stop:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {number: signal.getsignal(number) for number in utils.StopSignals.signals} == before
    assert capfd.readouterr().err == "\nSIGUSR1 received: stopping after the current step\n"


# (signal, data workers, the iteration it arrives in, where checkpoint.pth then continues)
STOPS = [("SIGTERM", "2", "0:1", (0, 2)), ("SIGINT", "0", "0:1", (0, 2)), ("SIGUSR1", "0", "0:2", (1, 0))]


@pytest.mark.parametrize("name, workers, at, point", STOPS)
def test_stop_signal_saves_the_step_and_resumes_exactly(reference, tmp_path, root, name, workers, at, point):
    data, _, _ = reference
    output = tmp_path / "run"
    # Without --save_every_iters: a mid-epoch checkpoint can only come from the stop. The signal reaches the
    # whole process group (data workers too) from another process, as from SLURM or a terminal.
    command = [sys.executable, str(root / "tests" / "crash_launcher.py"), *TINY_ARGS, "--data_path", str(data),
               "--output_dir", str(output), "--epochs", "2", "--depth", "2", "--num_workers", workers]
    result = subprocess.run(command, env={**SUBPROCESS_ENV, "PWSELF_SIGNAL_AT": f"{at}:{name}", "PWSELF_SIGNAL_GROUP": "1"},
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    printed = result.stdout + result.stderr
    assert result.returncode == patch_wise_dino.STOPPED_EXIT_STATUS, printed[-3000:]
    assert f"{name} received: stopping after the current step" in printed and "Traceback" not in printed
    assert (f"stopped on {name}: {output / 'checkpoint.pth'} is saved to continue at epoch {point[0]}, "
            f"iteration {point[1]}") in printed
    assert next_step(output / "checkpoint.pth") == point
    log = output / "log.txt"
    assert (len(log.read_text().splitlines()) if log.exists() else 0) == point[0]  # a line per finished epoch
    teacher = main(parse(data, output, *RUN)).teacher.state_dict()
    assert_same_run(output, teacher, reference)


def test_folder_without_checkpoint_pth_is_refused_then_resume_from_continues_exactly(reference, tmp_path,
                                                                                      monkeypatch, capsys):
    data, _, _ = reference
    output = tmp_path / "run"
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        main(parse(data, output, *RUN, "--saveckp_freq", "1"))
    monkeypatch.undo()
    (output / "checkpoint.pth").unlink()  # the commit point is lost; the log and checkpoint0000.pth remain
    with open(output / "log.txt", "a") as log:  # and the log went further than checkpoint0000.pth
        log.write(json.dumps({"epoch": 1, "loss": 0.0}) + "\n")
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    periodic = output / "checkpoint0000.pth"
    with pytest.raises(FileExistsError, match=rf"holds log.txt with 2 line\(s\) and 1 periodic checkpoint\(s\) of an "
                                              rf"earlier run but no checkpoint.pth .* --resume_from {periodic}: "):
        main(parse(data, output, *RUN))
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before  # nothing deleted or changed
    log_only = shutil.copytree(output, tmp_path / "log_only", ignore=shutil.ignore_patterns("checkpoint*"))
    with pytest.raises(FileExistsError, match=r"holds log.txt with 2 line\(s\) of an earlier run but no checkpoint.pth"
                                              r".*No checkpoint is left\. To start afresh, choose another --output_dir"):
        main(parse(data, log_only, *RUN))

    capsys.readouterr()
    teacher = main(parse(data, output, *RUN, "--resume_from", str(periodic))).teacher.state_dict()
    assert "Dropped 1 line(s)" in capsys.readouterr().out
    assert_same_run(output, teacher, reference)
    assert periodic.read_bytes() == before[periodic.name]  # only read
    main(parse(data, output, *RUN, "--resume_from", str(periodic)))  # the same command again: checkpoint.pth rules
    assert "Continuing from" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r"exists too and was not written by a run resumed from that file"):
        main(parse(data, output, *RUN, "--resume_from", str(output / "checkpoint0001.pth")))


# ----------------------------------------------------------------------------------------------
# Bad data.
# ----------------------------------------------------------------------------------------------
def write_awkward_images(folder: Path) -> Path:
    """12 files that train: every PIL mode we convert, tiny images, a corrupt and a truncated file; and
    a text file that is no image."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    for index in range(3):
        Image.fromarray(np.roll(pixels, index, axis=1)).save(folder / f"rgb{index}.png")
    Image.fromarray(pixels).convert("L").save(folder / "gray.png")
    Image.fromarray(pixels).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(pixels).convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65536, (32, 40))).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(pixels[:3, :2]).save(folder / "small.png")
    Image.fromarray(pixels[:1, :1]).save(folder / "one_pixel.png")
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.fromarray(pixels).save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])
    (folder / "whole.jpg").unlink()
    (folder / "README.txt").write_text("not an image")
    return folder


def test_bad_images_are_reported_skipped_and_counted(tmp_path, capfd):
    data = write_awkward_images(tmp_path / "data")
    main(parse(data, tmp_path / "run", "--epochs", "1", "--num_workers", "2"))
    printed = capfd.readouterr()
    reports = [line for line in printed.err.splitlines() if "cannot read image" in line]
    assert any("corrupt.jpg: UnidentifiedImageError" in line for line in reports)
    assert any("truncated.jpg: OSError" in line for line in reports)
    assert "Data: 12 images" in printed.out and "README" not in printed.out + printed.err
    line = json.loads((tmp_path / "run" / "log.txt").read_text())
    assert line["skipped_images"] == len(reports) >= 2 and np.isfinite(line["loss"])  # counted over workers
    with pytest.raises(utils.UnreadableImageError, match=r"cannot read image .*(corrupt|truncated)\.jpg.*--strict"):
        main(parse(data, tmp_path / "strict", "--epochs", "1", "--strict_images"))


def test_training_images_are_a_function_of_index_and_seed(tmp_path):
    data = write_awkward_images(tmp_path / "data")
    files = utils.list_image_files(data)
    augmentation = patch_wise_dino.MultiCropAugmentation(local_crops_number=1, global_crops_size=16,
                                                         local_crops_size=8)
    dataset = patch_wise_dino.TrainingImages(files, augmentation)
    state = torch.get_rng_state()
    (views, geometry), replaced = dataset[(files.index(data / "corrupt.jpg"), 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    (again, geometry_again), replaced_again = dataset[(files.index(data / "corrupt.jpg"), 7)]
    assert replaced == replaced_again >= 1 and torch.equal(geometry, geometry_again)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.equal(dataset[(0, 8)][0][1], dataset[(0, 7)][0][1])  # another seed, other views
    broken = patch_wise_dino.TrainingImages([data / "corrupt.jpg", data / "truncated.jpg"], augmentation)
    with pytest.raises(RuntimeError, match="10 unreadable images in a row"):
        broken[(0, 0)]


def test_resumable_sampler_starts_anywhere_in_the_same_order(tmp_path):
    sampler = patch_wise_dino.ResumableSampler(list(range(10)), seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=6)
    assert list(sampler) == whole[6:] and len(sampler) == 4
    assert sorted(index for index, _ in whole) == list(range(10)) and len({seed for _, seed in whole}) == 10
    sampler.set_epoch(5)
    assert list(sampler) != whole


# ----------------------------------------------------------------------------------------------
# Bad arguments and checkpoints.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--local_crops_size", "10"], "--local_crops_size 10 is not a multiple of --patch_size 4"),
    (["--save_every_iters", "-1"], "--save_every_iters must be >= 0"),
    (["--depth", "0"], "--depth must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--local_crops_scale", "0.5", "0.2"], "--local_crops_scale must satisfy 0 < min <= max <= 1"),
])
def test_bad_arguments_are_named(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        main(parse(tmp_path, tmp_path / "run", *extra))


def test_unknown_arch_is_refused(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--data_path", ".", "--arch", "vit_huge"])
    assert "invalid choice: 'vit_huge'" in capsys.readouterr().err


def copy_of_finished_run(reference, tmp_path) -> Path:
    output = tmp_path / "run"
    output.mkdir()
    shutil.copy(reference[1] / "checkpoint.pth", output)
    return output


def test_resume_with_other_settings_is_refused_unless_allowed(reference, tmp_path, capsys):
    data, _, _ = reference
    output = copy_of_finished_run(reference, tmp_path)
    with pytest.raises(ValueError, match=r"other settings that decide the result:\n  --lr: checkpoint 0.0005, now "
                                         r"0.001\n  --local_crops_number: checkpoint 2, now 0\n.*--allow_args_change"):
        main(parse(data, output, *RUN, "--lr", "0.001", "--local_crops_number", "0"))
    more = shutil.copytree(data, tmp_path / "more")
    shutil.copy(more / "a" / "0.png", more / "a" / "extra.png")
    with pytest.raises(ValueError, match=r"\n  num_images: checkpoint 12, now 13\n"):
        main(parse(more, output, *RUN))
    capsys.readouterr()
    main(parse(more, output, *RUN, "--allow_args_change"))
    assert "warning: resuming" in capsys.readouterr().out
    main(parse(data, output, *RUN, "--num_workers", "1", "--print_freq", "2", "--save_every_iters", "5"))
    assert "Training already finished" in capsys.readouterr().out  # these settings do not matter


def test_bad_training_checkpoints_are_named(reference, tmp_path):
    data, reference_output, _ = reference
    output = copy_of_finished_run(reference, tmp_path)
    path = output / "checkpoint.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError, match=r"cannot read checkpoint .*checkpoint.pth.*truncated.*move it away"):
        main(parse(data, output, *RUN))
    teacher = utils.load_checkpoint(reference_output / "checkpoint.pth")["teacher"]
    torch.save({k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}, path)
    with pytest.raises(RuntimeError, match=r"checkpoint.pth is not a PW-Self training checkpoint \(no student, "
                                           r"teacher, optimizer, epoch, dino_loss; it holds cls_token"):
        main(parse(data, output, *RUN))
    shutil.copy(reference_output / "checkpoint.pth", path)
    with pytest.raises(ValueError, match="--patch_size: checkpoint 4, now 8"):
        main(parse(data, output, *RUN, "--patch_size", "8", "--local_crops_size", "8"))


@pytest.mark.parametrize("extra, message", [
    (["--norm_last_layer", "false"], r"--norm_last_layer cannot change on resume, even with --allow_args_change "
                                     r"\(checkpoint True, now False\): it decides whether the scale of the head's last "
                                     r"layer is trained, which changes the optimizer's parameter groups, so the "
                                     r"optimizer state in .*checkpoint.pth cannot be carried over"),
    (["--optimizer", "sgd"], r"--optimizer cannot change on resume.*another optimizer keeps other state"),
])
def test_resume_with_another_optimizer_layout_is_named(reference, tmp_path, extra, message):
    data, _, _ = reference
    output = copy_of_finished_run(reference, tmp_path)
    with pytest.raises(ValueError, match=message):
        main(parse(data, output, *RUN, *extra, "--allow_args_change"))


def test_non_finite_resume_checkpoint_is_named(reference, tmp_path):
    data, _, _ = reference
    output = copy_of_finished_run(reference, tmp_path)
    checkpoint = utils.load_checkpoint(output / "checkpoint.pth")
    name = next(key for key in checkpoint["teacher"] if "blocks.1.mlp" in key)
    checkpoint["teacher"][name].view(-1)[3] = float("nan")
    torch.save(checkpoint, output / "checkpoint.pth")
    with pytest.raises(ValueError, match=rf"checkpoint.pth holds non-finite values \(NaN or infinity\), first in the "
                                         rf"teacher's tensor {name}: .*--resume_from"):
        main(parse(data, output, *RUN))


def test_bad_evaluation_weights_are_named_never_random(reference, tmp_path):
    checkpoint = reference[1] / "checkpoint.pth"
    parser = argparse.ArgumentParser()
    vits.add_backbone_args(parser)
    vits.add_weights_args(parser)
    missing = parser.parse_args(TINY_BACKBONE_ARGS + ["--pretrained_weights", str(tmp_path / "missing.pth")])
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pth does not exist"):
        vits.build_frozen_backbone(missing, img_size=16)
    other_patch = parser.parse_args(TINY_BACKBONE_ARGS + ["--patch_size", "8", "--pretrained_weights", str(checkpoint)])
    with pytest.raises(ValueError, match=r"--patch_size 8 contradicts the weights' 4 \(.*checkpoint.pth, from its patch "
                                         r"embedding patch_embed.proj.weight\): drop --patch_size or give 4"):
        vits.build_frozen_backbone(other_patch, img_size=16)
    with pytest.raises(RuntimeError, match=r"checkpoint.pth is not a linear-probe checkpoint .*\(no probe, best"):
        eval_linear.load_probe_checkpoint(checkpoint)
