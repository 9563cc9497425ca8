"""Shared helpers: schedules, parameter groups, optimisers, clipping, EMA, atomic saves, arguments."""
import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import utils
from conftest import small_tmpfs


def test_cosine_scheduler_warmup_and_decay():
    schedule = utils.cosine_scheduler(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=1)
    assert len(schedule) == 20
    np.testing.assert_allclose(schedule[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert schedule[5] == pytest.approx(1.0)
    steps = np.arange(15)
    np.testing.assert_allclose(schedule[5:], 0.1 + 0.45 * (1 + np.cos(np.pi * steps / 15)))
    assert np.all(np.diff(schedule[5:]) < 0)
    no_warmup = utils.cosine_scheduler(0.04, 0.4, epochs=2, iters_per_epoch=3)
    assert no_warmup[0] == pytest.approx(0.04) and no_warmup[-1] < 0.4


def test_params_groups_exclude_biases_norms_and_frozen():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[2].weight.requires_grad = False
    regularized, not_regularized = utils.get_params_groups(model)
    assert [p.shape for p in regularized["params"]] == [(3, 4)]
    assert len(not_regularized["params"]) == 4 and not_regularized["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizers_minimise_a_quadratic(name):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 5))
    bias = nn.Parameter(torch.randn(5))
    optimizer = utils.build_optimizer(name, [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}])
    for group in optimizer.param_groups:  # LARS scales only matrices' steps (by eta * |w| / |g|)
        group["lr"] = 5.0 if name == "lars" and group["params"][0].ndim > 1 else 0.05
        group.setdefault("weight_decay", 0.0)
    start = (weight.square().sum() + bias.square().sum()).item()
    for _ in range(50):
        optimizer.zero_grad()
        (weight.square().sum() + bias.square().sum()).backward()
        optimizer.step()
    assert (weight.square().sum() + bias.square().sum()).item() < 0.5 * start
    with pytest.raises(ValueError, match="unknown optimizer"):
        utils.build_optimizer("adagrad", [{"params": [weight]}])


def test_clip_gradients_per_parameter_and_last_layer_freeze():
    model = nn.Sequential(nn.Linear(3, 3))
    model[0].weight.grad = torch.full((3, 3), 10.0)  # norm 30
    model[0].bias.grad = torch.full((3,), 0.1)  # norm ~0.17, untouched
    norms = utils.clip_gradients(model, 3.0)
    assert norms.tolist() == pytest.approx([30.0, 3 ** 0.5 * 0.1], rel=1e-4)
    assert model[0].weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(model[0].bias.grad, torch.full((3,), 0.1))

    class WithLastLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.last_layer = nn.Linear(2, 2), nn.Linear(2, 2)

    head = WithLastLayer()
    for parameter in head.parameters():
        parameter.grad = torch.ones_like(parameter)
    utils.cancel_gradients_last_layer(0, head, freeze_last_layer=1)
    assert head.last_layer.weight.grad is None and head.body.weight.grad is not None
    head.last_layer.weight.grad = torch.ones(2, 2)
    utils.cancel_gradients_last_layer(1, head, freeze_last_layer=1)
    assert head.last_layer.weight.grad is not None


def test_ema_update():
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    utils.ema_update(teacher, student, 0.9)
    for parameter, value in zip(teacher.parameters(), expected):
        torch.testing.assert_close(parameter.detach(), value)


def test_save_atomic_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.save_atomic({"epoch": 1}, path)
    assert utils.load_checkpoint(path) == {"epoch": 1}

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(utils.torch, "save", failing_save)
    with pytest.raises(OSError, match=r"could not write .*checkpoint.pth: No space left.*previous checkpoint.pth"):
        utils.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary left behind


def test_atomic_text_and_stale_temporaries(tmp_path):
    utils.write_text_atomic("one\n", tmp_path / "log.txt")
    assert (tmp_path / "log.txt").read_text() == "one\n"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".checkpoint.pth.tmp.{int(dead.stdout)}").write_bytes(b"half")
    (tmp_path / ".hidden").write_text("not ours")
    assert [p.name for p in utils.remove_stale_temporaries(tmp_path)] == [f".checkpoint.pth.tmp.{int(dead.stdout)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "log.txt"]
    with pytest.raises(FileNotFoundError, match="checkpoint file .*nothing.pth does not exist"):
        utils.load_checkpoint(tmp_path / "nothing.pth")


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    user_files = [".notes.tmp.old", ".draft.tmp.", ".a.tmp.12x", "b.tmp.7"]
    for name in user_files:
        (tmp_path / name).write_text("a user's file")
    (tmp_path / f".checkpoint.pth.tmp.{os.getppid()}").write_bytes(b"a live process is writing it")
    assert utils.remove_stale_temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(user_files + [f".checkpoint.pth.tmp.{os.getppid()}"])


def test_output_checks_refuse_files_in_the_way_and_create_nothing(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"output folder .*results.json/run cannot be a folder: "
                                                 r".*results.json is a file"):
        utils.check_output_dir(tmp_path / "results.json" / "run")
    with pytest.raises(NotADirectoryError, match=r"the folder of --output_json .*results.json/k.json .*is a file"):
        utils.check_output_file(tmp_path / "results.json" / "k.json", "--output_json")
    with pytest.raises(IsADirectoryError, match=r"--output_json .* is a folder; give a file name"):
        utils.check_output_file(tmp_path, "--output_json")
    assert utils.check_output_file(tmp_path / "new" / "deeper" / "k.json") == tmp_path / "new" / "deeper" / "k.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # nothing created, no probe left


@pytest.mark.parametrize("options, reason", [("ro,size=64k", "Read-only file system"),
                                             ("size=16k", "No space left on device")])
def test_output_checks_refuse_read_only_and_full_file_systems(tmp_path, options, reason):
    with small_tmpfs(tmp_path / "disk", options) as disk:
        if "ro" not in options.split(","):
            (disk / "filler").write_bytes(bytes(16 * 1024))
        with pytest.raises(OSError, match=rf"cannot write output folder .*disk/run: .*disk refuses a 4 KiB test "
                                          rf"file: {reason} \(0\.\d MiB free there\)\. .*nothing was computed yet"):
            utils.check_output_dir(disk / "run")


def test_dataloader_workers_of_a_killed_run_do_not_hold_its_folder_lock(tmp_path):
    """kill -9 of a run whose DataLoader workers live on: its restart takes the folder at once."""
    run = f"""
import sys, time, torch
sys.path.insert(0, {str(utils.PROJECT_DIR)!r})
import utils

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, index):
        time.sleep(60)  # the workers are busy, and outlive their parent by far
        return index

with utils.folder_lock({str(tmp_path)!r}):
    loader = iter(torch.utils.data.DataLoader(Slow(), num_workers=2, multiprocessing_context="fork"))
    print("workers started", flush=True)
    next(loader)
"""
    process = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "workers started"
    time.sleep(1)  # the workers have forked by now
    process.kill()
    process.wait()
    with utils.folder_lock(tmp_path):  # refused on the old code: the orphaned workers held the lock
        pass


def test_read_rgb_image_converts_every_mode_and_names_bad_files(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    modes = {"l.png": "L", "la.png": "LA", "rgba.png": "RGBA", "p.png": "P", "cmyk.jpg": "CMYK"}
    for name, mode in modes.items():
        image.convert(mode).save(tmp_path / name, **({"transparency": 0} if mode == "P" else {}))
        converted = utils.read_rgb_image(tmp_path / name)
        assert converted.mode == "RGB" and converted.size == (5, 6), name
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "sixteen.png")
    assert np.asarray(utils.read_rgb_image(tmp_path / "sixteen.png"))[0, :, 0].tolist() == [0, 128, 255]
    image.save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:200])
    with pytest.raises(utils.UnreadableImageError, match="cannot read image .*cut.jpg: OSError"):
        utils.read_rgb_image(tmp_path / "cut.jpg")


def test_metric_totals_carry_an_epoch_over_a_restart():
    whole, first, second = utils.MetricLogger(), utils.MetricLogger(), utils.MetricLogger()
    for value in (0.1, 0.7, 0.3):
        whole.update(loss=value, lr=value / 3)
    for value in (0.1, 0.7):
        first.update(loss=value, lr=value / 3)
    second.add_totals(first.global_totals())
    second.update(loss=0.3, lr=0.3 / 3)
    assert second.global_averages() == whole.global_averages() and list(second.meters) == ["loss", "lr"]


def test_bool_flag_and_seeds_and_images(tmp_path):
    assert utils.bool_flag("True") and utils.bool_flag("on") and not utils.bool_flag("false")
    with pytest.raises(argparse.ArgumentTypeError):
        utils.bool_flag("perhaps")
    seeds = {utils.derived_seed(0, epoch, rank) for epoch in range(20) for rank in range(8)}
    assert len(seeds) == 160 and all(0 <= s < 2 ** 63 for s in seeds)
    for name in ("b.PNG", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    assert [p.name for p in utils.list_images(tmp_path)] == ["a.jpg", "b.PNG"]


def test_metric_logger_prints_progress(capsys):
    logger = utils.MetricLogger()
    for value in logger.log_every(range(5), 2, "Test:"):
        logger.update(loss=float(value))
    printed = capsys.readouterr().out
    assert printed.count("eta:") == 3 and "[4/5]" in printed and "Test: total time" in printed
    assert "loss: 2 (2)" in printed.splitlines()[2]  # median and mean of 0..4
    assert logger.global_averages() == {"loss": 2.0}
    assert math.isnan(utils.SmoothedValue().median)


def test_torchrun_restarts_with_a_shared_store_are_warned_about(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    utils.warn_if_restarts_share_a_store()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().out
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable gives
    utils.warn_if_restarts_share_a_store()
    assert capsys.readouterr().out == ""


def test_explained_errors_print_their_message_alone_and_debug_restores_the_traceback(root, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "prepare_data.py", "--dataset", "fashion_mnist", "--output_dir", str(tmp_path / "out"),
               "--limit_per_class", "-3"]
    plain = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "error: --limit_per_class must be positive, got -3" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run(command + ["--debug"], cwd=root, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_only_errors_raised_by_the_project_count_as_explained():
    import json

    def caught(action) -> BaseException:
        try:
            action()
        except Exception as error:
            return error
        raise AssertionError("no error")

    assert utils.is_explained_error(caught(lambda: utils.load_checkpoint("/nonexistent/checkpoint.pth")))
    assert not utils.is_explained_error(caught(lambda: json.loads("{")))  # a ValueError inside the json library
    assert not utils.is_explained_error(caught(lambda: None + 1))  # a bug: TypeError
    assert not utils.is_explained_error(ValueError("never raised"))


def test_first_non_finite_names_the_first_bad_tensor():
    state = {"step": torch.tensor(3), "a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, math.inf]),
             "c.bias": torch.tensor([math.nan])}
    assert utils.first_non_finite(state) == "b.weight"
    assert utils.first_non_finite({"a.weight": torch.zeros(3), "count": 7}) is None


# ----------------------------------------------------------------------------------------------
# Listing and reading images.
# ----------------------------------------------------------------------------------------------
def save_pixels(path, pixels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8) if pixels is None else pixels).save(path)
    return path


def test_hidden_files_and_folders_are_never_listed(tmp_path):
    flat = tmp_path / "flat"
    expected = [save_pixels(flat / f"{i}.png") for i in range(3)]
    save_pixels(flat / ".ipynb_checkpoints" / "0-checkpoint.png")
    save_pixels(flat / ".hidden.png")
    assert utils.list_images(flat) == expected
    assert utils.list_image_files(flat) == expected  # was: the checkpoint copy alone
    classes = tmp_path / "classes"
    for name in ("a", "b", ".cache"):
        save_pixels(classes / name / "0.png")
    save_pixels(classes / "a" / ".thumbs" / "0.png")
    dataset = utils.ImageFolderDataset(str(classes))
    assert dataset.classes == ["a", "b"]
    assert [os.path.relpath(path, classes) for path, _ in dataset.samples] == ["a/0.png", "b/0.png"]


def test_images_beside_class_folders_are_refused_with_what_was_found(tmp_path):
    for name in ("loose1.png", "loose2.jpg", "cat/0.png", "cat/1.png", "dog/0.png"):
        save_pixels(tmp_path / name)
    with pytest.raises(ValueError, match=r"mixes two layouts: 2 image file\(s\) directly inside it \(e.g. "
                                         r"loose1.png, loose2.jpg\) and 3 image\(s\) in 2 class sub-folder\(s\)"
                                         r".*Move the loose images into a class folder"):
        utils.list_image_files(tmp_path)
    with pytest.raises(ValueError, match="mixes two layouts"):
        utils.ImageFolderDataset(str(tmp_path))
    flat = tmp_path / "flat"
    save_pixels(flat / "0.png")
    (flat / "notes").mkdir()  # a sub-folder without images leaves a flat folder flat
    assert utils.list_image_files(flat) == [flat / "0.png"]


def test_symlink_loops_and_repeats_list_each_image_once_with_a_warning(tmp_path, capsys):
    data = tmp_path / "data"
    for name in ("a", "b"):
        for index in range(8):
            save_pixels(data / name / f"{index}.png")
    os.symlink(data, data / "a" / "loop")  # back to the root: the loop that counted 16 images 656 times
    os.symlink("..", data / "b" / "up")
    os.symlink("../a", data / "b" / "a_again")
    os.symlink("../a/0.png", data / "b" / "link.png")
    files = utils.list_image_files(data)
    assert len(files) == 16 and len({os.path.realpath(path) for path in files}) == 16
    warning = capsys.readouterr().err
    assert warning.startswith("warning: skipped 4 path(s)") and "a/loop" in warning and "b/link.png" in warning
    os.symlink(".", data / "a" / "self")
    assert len(utils.list_image_files(data / "a")) == 8  # a class folder used as a flat folder


def test_a_linked_class_folder_is_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    save_pixels(elsewhere / "0.png")
    save_pixels(tmp_path / "data" / "a" / "0.png")
    os.symlink(elsewhere, tmp_path / "data" / "b")
    dataset = utils.ImageFolderDataset(str(tmp_path / "data"))
    assert dataset.classes == ["a", "b"] and [label for _, label in dataset.samples] == [0, 1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_an_unreadable_class_folder_is_named(tmp_path):
    for name in ("a", "b"):
        save_pixels(tmp_path / name / "0.png")
    (tmp_path / "b").chmod(0)
    try:
        with pytest.raises(PermissionError, match=r"cannot read folder .*/b: Permission denied; make it readable"):
            utils.list_image_files(tmp_path)
    finally:
        (tmp_path / "b").chmod(0o755)


def test_an_unreadable_class_folder_is_named_also_as_root(tmp_path, monkeypatch):
    for name in ("a", "b"):
        for index in range(24):
            save_pixels(tmp_path / name / f"{index}.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(tmp_path / "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # as chmod 000 would for any user but root
    with pytest.raises(PermissionError, match=r"cannot read folder .*/b: Permission denied; make it readable"):
        utils.list_image_files(tmp_path)  # was: the 24 images of a alone, silently
    with pytest.raises(PermissionError, match="cannot read folder"):
        utils.ImageFolderDataset(str(tmp_path))


@pytest.mark.parametrize("values,expected", [
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # F within [0, 1]: times 255
    (np.array([[-1.0, 1.0, 3.0]], np.float32), [0, 128, 255]),  # F outside: its own range
    (np.array([[5.0, 5.0, 5.0]], np.float32), [0, 0, 0]),  # constant outside [0, 1]: black
    (np.array([[np.nan, 0.5, 1.0]], np.float32), [0, 128, 255]),  # NaN counts as 0
    (np.array([[0, 100000, 200000]], np.int32), [0, 128, 255]),  # I above 65535: its own range
    (np.array([[0, 32768, 65535]], np.int32), [0, 128, 255]),  # I within 16 bits: 16-bit scale
])
def test_32_bit_tiffs_are_scaled_to_8_bits(tmp_path, values, expected):
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == ("F" if values.dtype == np.float32 else "I")
    converted = utils.read_rgb_image(path)
    assert converted.mode == "RGB" and np.asarray(converted)[0, :, 0].tolist() == expected
