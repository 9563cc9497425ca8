"""What a run tells its user and leaves behind: a short start summary (the arguments in args.json), no empty output
folder after a failed start, progress with ETA that stays readable in a log file, and TensorBoard event files
(training curves that a resume continues, evaluations' final figures)."""
import json

import pytest

import eval_knn
import eval_linear
import patch_wise_dino
import utils
from conftest import TINY_ARGS, TINY_BACKBONE_ARGS, write_images
from test_reliability import Crash, crash_at_epoch_1_iteration_2

EVAL_ARGS = TINY_BACKBONE_ARGS + ["--resize_size", "16", "--crop_size", "16", "--num_workers", "0", "--device", "cpu"]
CURVES = {"train/loss", "train/loss_cls", "train/loss_patch", "train/lr", "train/wd", "train/teacher_temp",
          "train/teacher_momentum"}


def parse(data, output, *extra):
    return patch_wise_dino.get_args_parser().parse_args(
        TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("reporting") / "data")  # 12 images: 3 iterations per epoch


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    write_images(root / "train", classes=("cat", "dog"), per_class=3, seed=1)
    write_images(root / "val", classes=("cat", "dog"), per_class=2, seed=2)
    return root


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``folder``, as TensorBoard shows it (purged points hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def event_files(folder) -> list:
    return sorted(folder.rglob("events.out.tfevents*"))


# ----------------------------------------------------------------------------------------------
# Training: the start summary, progress, curves.
# ----------------------------------------------------------------------------------------------
def test_training_prints_a_short_summary_then_progress_with_the_runs_eta(data, tmp_path, capsys):
    output = tmp_path / "run"
    args = parse(data, output, "--epochs", "2", "--print_freq", "1")
    patch_wise_dino.main(args)
    lines = capsys.readouterr().out.splitlines()
    first_step = next(index for index, line in enumerate(lines) if line.startswith("Epoch: [0/2]"))
    assert first_step <= 7  # the summary and the first checkpoint; not one line per argument
    assert [line.split(":")[0] for line in lines[:5]] == ["Data", "Model", "Schedule", "Output", "Start"]
    assert lines[0].startswith("Data: 12 images in ") and "3 iterations per epoch" in lines[0]
    assert lines[1].startswith("Model: vit_tiny/4 student and teacher, ") and "device cpu" in lines[1]
    assert lines[2].startswith("Schedule: 2 epochs x 3 iterations = 6 steps; batch 4 per process x 1 process(es) "
                               "= 4; peak lr 7.81e-06 (--lr 0.0005 x 4/256)")
    assert lines[3] == f"Output: {output} (every argument in args.json)"
    assert lines[4] == "Start: epoch 0, from random weights"
    assert not any(line.startswith(("local_crops_number:", "seed:")) for line in lines)
    assert set(json.loads((output / "args.json").read_text())) >= set(vars(args))
    steps = [line for line in lines if line.startswith("Epoch: [") and "total time" not in line]
    assert len(steps) == 6 and all("elapsed: " in line and "  eta: " in line and "run eta: " in line for line in steps)
    assert any(line.startswith("Epoch 0 done (1 of 2); the run: elapsed: ") and "eta: " in line for line in lines)
    assert not (output / patch_wise_dino.TENSORBOARD_DIR).exists() and not event_files(tmp_path)

    patch_wise_dino.main(parse(data, output, "--epochs", "2"))
    printed = capsys.readouterr().out
    assert f"Resumed from {(output / 'checkpoint.pth').resolve()}: next epoch 2, iteration 0" in printed
    assert "Start:" not in printed and "Training already finished" in printed


def test_tensorboard_curves_go_on_after_a_resume_without_doubled_points(data, tmp_path, monkeypatch):
    output = tmp_path / "run"
    crash_at_epoch_1_iteration_2(monkeypatch)
    with pytest.raises(Crash):
        patch_wise_dino.main(parse(data, output, "--epochs", "2", "--tensorboard", "true"))
    monkeypatch.undo()
    crashed = scalars(output / "tensorboard")
    assert [point[0] for point in crashed["train/loss"]] == [0, 1, 2, 3, 4]  # 3 and 4: after the last checkpoint

    patch_wise_dino.main(parse(data, output, "--epochs", "2", "--tensorboard", "true"))  # resumes at iteration 3
    curves = scalars(output / "tensorboard")
    assert len(event_files(output)) == 2 and set(curves) >= CURVES
    assert all([point[0] for point in series] == list(range(6)) for series in curves.values())
    assert curves["train/loss"][:3] == crashed["train/loss"][:3]
    assert curves["train/teacher_momentum"][0] == (0, pytest.approx(0.996)) and curves["train/lr"][0] == (0, 0.0)
    log = [json.loads(line) for line in (output / "log.txt").read_text().splitlines()]
    for epoch, line in enumerate(log):  # the log's epoch means are the means of the curves' points
        for name in ("loss", "loss_patch", "teacher_momentum"):
            points = [value for iteration, value in curves[f"train/{name}"] if iteration // 3 == epoch]
            assert sum(points) / 3 == pytest.approx(line[name], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Failed starts.
# ----------------------------------------------------------------------------------------------
def test_failed_training_starts_leave_no_output_folder(data, tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        patch_wise_dino.main(parse(empty, tmp_path / "new" / "run", "--epochs", "1"))
    assert not (tmp_path / "new").exists()  # the run and the parent it created
    weights = tmp_path / "weights.pth"
    weights.write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="weights.pth"):
        patch_wise_dino.main(parse(data, tmp_path / "run", "--epochs", "1", "--init_weights", str(weights)))
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        patch_wise_dino.main(parse(empty, existing, "--epochs", "1"))
    assert existing.is_dir() and not any(existing.iterdir())


def test_failed_evaluation_start_leaves_no_output_folder(classes, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(classes / "train")  # and no val/
    with pytest.raises(FileNotFoundError, match="val not found"):
        eval_linear.main(eval_linear.get_args_parser().parse_args(
            EVAL_ARGS + ["--data_path", str(tmp_path / "data"), "--random_init", "--output_dir",
                         str(tmp_path / "linear")]))
    assert not (tmp_path / "linear").exists()


def test_created_output_dir_removes_only_folders_it_created_that_hold_no_file(tmp_path):
    with pytest.raises(Crash):
        with utils.created_output_dir(tmp_path / "a" / "b") as folder:
            (folder / "empty_sub_folder").mkdir()
            raise Crash
    assert not (tmp_path / "a").exists()
    with pytest.raises(Crash):
        with utils.created_output_dir(tmp_path / "c" / "d") as folder:
            (folder / "log.txt").write_text("kept")
            raise Crash
    assert (tmp_path / "c" / "d" / "log.txt").is_file()
    (tmp_path / "e").mkdir()
    with pytest.raises(Crash):
        with utils.created_output_dir(tmp_path / "e" / "f"):
            raise Crash
    assert (tmp_path / "e").is_dir() and not (tmp_path / "e" / "f").exists()
    with utils.created_output_dir(tmp_path / "g"):
        pass
    assert (tmp_path / "g").is_dir()


# ----------------------------------------------------------------------------------------------
# Progress.
# ----------------------------------------------------------------------------------------------
def test_progress_off_a_terminal_prints_a_few_whole_lines_with_eta(capsys):
    assert list(utils.progress(range(100_000), "Features:")) == list(range(100_000))
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "\r" not in printed and 2 <= len(lines) <= utils.PROGRESS_FRACTIONS + 1
    assert all(line.startswith("Features: [") and "elapsed: " in line and "  eta: " in line for line in lines[:-1])
    assert lines[0].startswith("Features: [ 10000/100000]  10%") and lines[-2].startswith("Features: [ 90000/100000]")
    assert lines[-1].startswith("Features: 100000 done in 0:00:")


def test_progress_of_a_slow_loop_prints_at_least_once_a_minute(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])
    for _ in utils.progress(range(100), "Frames:"):
        clock[0] += 7.0  # 700 s in all
    lines = capsys.readouterr().out.splitlines()
    assert 15 <= len(lines) <= 21  # each tenth and each minute, plus the end
    assert lines[0] == "Frames: [  9/100]   9%  elapsed: 0:01:03  eta: 0:10:37"
    assert lines[-1] == "Frames: 100 done in 0:11:40 (7 s each)"


def test_progress_on_a_terminal_rewrites_one_line(monkeypatch, capsys):
    monkeypatch.setattr(utils, "stdout_is_terminal", lambda: True)
    monkeypatch.setattr(utils, "TERMINAL_REFRESH_S", 0.0)
    for _ in utils.progress(range(3), "Steps:"):
        pass
    printed = capsys.readouterr().out
    assert printed.count("\r\x1b[K") == 4 and printed.count("\n") == 1 and printed.endswith("\n")
    assert printed.split("\r\x1b[K")[1].startswith("Steps: [1/3]  33%  elapsed: 0:00:00  eta: 0:00:00")
    assert printed.split("\r\x1b[K")[-1].startswith("Steps: 3 done in 0:00:00 (")


def test_resumed_progress_times_only_the_items_done_here(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])
    resumed = utils.Progress(100, "Run", done=60)
    assert resumed.eta is None and resumed.times() == "elapsed: 0:00:00  eta: ?"
    clock[0] = 20.0
    resumed.advance(10)
    resumed.skip(10)  # done without work: no faster
    assert resumed.eta == pytest.approx(2.0 * 20)


# ----------------------------------------------------------------------------------------------
# Evaluations.
# ----------------------------------------------------------------------------------------------
def test_evaluation_shows_progress_and_writes_its_final_figures_to_tensorboard(classes, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = EVAL_ARGS + ["--data_path", str(classes), "--random_init", "--nb_knn", "1", "3",
                             "--batch_size_per_gpu", "1"]
    parser = eval_knn.get_args_parser()
    eval_knn.main(parser.parse_args(arguments))
    assert not event_files(tmp_path)  # nothing without --tensorboard
    results = eval_knn.main(parser.parse_args(arguments + ["--tensorboard", str(tmp_path / "tb")]))
    printed = capsys.readouterr().out
    assert "\r" not in printed and "Features of train: [3/6]  50%  elapsed: " in printed
    assert "Features of train: 6 done in " in printed and "Features of val: 4 done in " in printed
    figures = scalars(tmp_path / "tb")
    assert set(figures) == {f"knn/results/{k}/{name}" for k in (1, 3) for name in ("top1", "top5")}
    assert figures["knn/results/3/top1"] == [(0, pytest.approx(results[3]["top1"]))]


def test_final_scalars_are_the_summarys_numbers_by_path():
    summary = {"eval": "linear", "weights": "random_init", "settings": {"size": 224}, "scored": True,
               "objects": [1, 2], "best": {"lr": 0.01, "top1": 71.5}, "frames": 3, "J&F": None}
    assert utils.final_scalars(summary) == {"best/lr": 0.01, "best/top1": 71.5, "frames": 3.0}
