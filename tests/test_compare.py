"""compare.py end to end on a tiny data set: table, JSON and chart; a killed comparison continues to the
same table; other arguments in an existing folder and bad input are refused before anything is written; a
busy folder, variant names leading out of it and steps recorded with other arguments are refused; unreadable
records are redone; correspondence on another patch grid is shown with its own chance rows, unpaired."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import compare
from conftest import TINY_ARGS, small_tmpfs, write_images

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}


def compare_argv(data: Path, output: Path, *extra: str) -> list[str]:
    train_args = shlex.join(TINY_ARGS + ["--epochs", "2", "--lr", "0.05", "--momentum_teacher", "0.9"])
    return ["--data_path", str(data), "--output_dir", str(output), "--seeds", "2",
            "--train_args", train_args, "--knn_k", "3", "--linear_epochs", "1",
            "--correspondence_args", "--num_images 4 --batch_size 4", "--num_workers", "0", "--device", "cpu", *extra]


def parse(*argv: str):
    return compare.get_args_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare_data")
    write_images(root / "train", classes=("a", "b"), per_class=6, size=(20, 16), seed=1)
    write_images(root / "val", classes=("a", "b"), per_class=3, size=(20, 16), seed=2)
    return root


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """An uninterrupted comparison: its folder and summary."""
    output = tmp_path_factory.mktemp("compare") / "out"
    return output, compare.main(parse(*compare_argv(dataset, output)))


def test_table_json_and_chart(finished, capsys):
    output, summary = finished
    table = (output / "comparison.md").read_text()
    for row in ("| random weights |", "| dino (2 seeds) |", "| pwself (2 seeds) |", "| pwself − dino, paired |"):
        assert row in table
    assert set(summary["runs"]) == {"random", "dino", "pwself"} and set(summary["runs"]["dino"]) == {"0", "1"}
    for method in ("dino", "pwself"):
        knn = [values["knn_top1"] for values in summary["runs"][method].values()]
        assert summary["methods"][method]["knn_top1"]["mean"] == pytest.approx(sum(knn) / 2)
        assert all(0 <= value <= 100 for value in knn)
    difference = summary["vs_dino"]["pwself"]["linear_top1"]
    expected = [summary["runs"]["pwself"][s]["linear_top1"] - summary["runs"]["dino"][s]["linear_top1"] for s in "01"]
    assert difference["mean"] == pytest.approx(sum(expected) / 2) and difference["n"] == 2
    assert json.loads((output / "comparison.json").read_text())["methods"] == summary["methods"]
    with Image.open(output / "comparison.png") as chart:
        assert chart.format == "PNG" and chart.width > 800
    assert json.loads((output / "pwself" / "seed0" / "train.json").read_text())["epochs"] == 2


def test_methods_train_with_their_own_arguments(finished):
    output, _ = finished
    teachers = {}
    for method, patch_loss in (("dino", False), ("pwself", True)):
        for seed in (0, 1):
            run = output / method / f"seed{seed}" / "train"
            args = json.loads((run / "args.json").read_text())
            assert (args["patch_loss"], args["seed"], args["lr"]) == (patch_loss, seed, 0.05)
            teachers[method, seed] = torch.load(run / "checkpoint.pth", weights_only=True)["teacher"]
    for first, second in ((("dino", 0), ("pwself", 0)), (("dino", 0), ("dino", 1))):
        assert any(not torch.equal(teachers[first][k], teachers[second][k]) for k in teachers[first])


def test_rerun_reuses_everything(finished, dataset, capsys):
    output, summary = finished
    before = {path: path.stat().st_mtime_ns for path in output.rglob("*.json") if not path.name.startswith("compar")}
    again = compare.main(parse(*compare_argv(dataset, output)))
    assert "reused" in capsys.readouterr().out
    assert again["runs"] == summary["runs"]
    assert before == {path: path.stat().st_mtime_ns for path in before}


def test_killed_comparison_continues_to_the_same_table(finished, dataset, tmp_path, root, capsys):
    reference_output, reference = finished
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "compare.py", *compare_argv(dataset, output)], cwd=root,
                               env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = output / "dino" / "seed0" / "train" / "checkpoint.pth"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None  # still training: a second comparison in its folder is refused, naming it
    with pytest.raises(FileExistsError, match=rf"{output} is in use by another run \(pid {process.pid} on host"):
        compare.main(parse(*compare_argv(dataset, output)))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert checkpoint.exists() and not (output / "comparison.md").exists()

    summary = compare.main(parse(*compare_argv(dataset, output)))
    assert "done before, reused" in capsys.readouterr().out  # the random floor's evaluations
    assert summary["runs"] == reference["runs"]
    assert (output / "comparison.md").read_text() == (reference_output / "comparison.md").read_text()


def test_other_arguments_are_refused_listing_the_differences(finished, dataset):
    output, _ = finished
    settings = (output / "compare_args.json").read_text()
    with pytest.raises(ValueError, match=r"--seeds: before 2, now 3[\s\S]*--variant"):
        compare.main(parse(*compare_argv(dataset, output), "--seeds", "3", "--variant", "c=--matching centre"))
    with pytest.raises(ValueError, match=r"--linear_epochs: before 1, now 2"):  # --extend only adds
        compare.main(parse(*compare_argv(dataset, output), "--extend", "--linear_epochs", "2"))
    assert (output / "compare_args.json").read_text() == settings
    assert not (output / "pwself" / "seed2").exists() and not (output / "c").exists()


def test_extend_adds_a_variant_and_reuses_the_rest(dataset, tmp_path, capsys):
    output = tmp_path / "out"
    argv = compare_argv(dataset, output)
    argv[argv.index("--seeds") + 1] = "1"
    compare.main(parse(*argv))
    capsys.readouterr()
    summary = compare.main(parse(*argv, "--extend", "--variant", "centre=--matching centre"))
    assert "pwself seed 0: train done before, reused" in capsys.readouterr().out
    assert set(summary["runs"]) == {"random", "dino", "pwself", "centre"} and "centre − dino" in (
        output / "comparison.md").read_text()
    assert json.loads((output / "centre" / "seed0" / "train" / "args.json").read_text())["matching"] == "centre"


@pytest.mark.parametrize("extra, error, match", [
    (["--seeds", "0"], ValueError, "--seeds must be at least 1"),
    (["--variant", "no equals sign"], ValueError, "NAME=ARGS"),
    (["--variant", "dino=--lr 1"], ValueError, "is taken"),
    (["--train_args", "--global_crops_size 18 --patch_size 4"], ValueError, "not a multiple of --patch_size"),
    (["--eval_split", "holdout"], FileNotFoundError, "prepare_data.py --holdout"),
    (["--eval_split", "train"], ValueError, "--eval_split train is the training split: .* Use --eval_split val"),
    (["--eval_split", "./train/"], ValueError, "--eval_split ./train/ is the training split"),
    (["--correspondence_args", "--size 2"], ValueError, "--size 2 is smaller than one patch"),
    (["--correspondence_args", "--query_scale 0.6 0.2"], ValueError, "--query_scale 0.6 0.2 must satisfy"),
])
def test_bad_input_is_refused_before_anything_is_written(dataset, tmp_path, extra, error, match):
    output = tmp_path / "out"
    with pytest.raises(error, match=match):
        compare.main(parse(*compare_argv(dataset, output), *extra))
    assert not output.exists()


def test_folders_without_images_and_foreign_folders_are_refused(dataset, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        compare.main(parse(*compare_argv(empty, tmp_path / "out")))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no compare_args.json"):
        compare.main(parse(*compare_argv(dataset, foreign)))
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_variants_are_pwself_with_extra_arguments():
    methods = compare.parse_variants(["centre=--matching centre", "p4=--patch_size 4 --patch_loss false"])
    assert methods["dino"] == ["--patch_loss", "false"] and methods["pwself"] == ["--patch_loss", "true"]
    assert methods["centre"] == ["--patch_loss", "true", "--matching", "centre"]
    assert methods["p4"][-2:] == ["--patch_loss", "false"]  # appended last, so it wins


# ----------------------------------------------------------------------------------------------
# Scenes without image labels: segmentation and correspondence columns; models trained elsewhere.
# ----------------------------------------------------------------------------------------------
def scene_argv(data: Path, output: Path, *extra: str) -> list[str]:
    argv = compare_argv(data, output, "--crop_size", "32", "--segmentation_args",
                        "--epochs 2 --lrs 0.1 0.3 --batch_size 4 --memory_size 200", *extra)
    argv[argv.index("--seeds") + 1] = "1"
    return argv


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    import prepare_data
    from conftest import write_mini_fashion_mnist

    root = tmp_path_factory.mktemp("scenes")
    source = write_mini_fashion_mnist(root / "fmnist", train=40, test=10)
    prepare_data.main(prepare_data.get_args_parser().parse_args([
        "--dataset", "fashion_mnist_scenes", "--source", str(source), "--output_dir", str(root / "data"),
        "--scenes", "8", "2", "4", "--canvas_size", "32", "--garment_size", "10", "20"]))
    return root / "data"


@pytest.fixture(scope="module")
def scene_comparison(scenes, tmp_path_factory):
    output = tmp_path_factory.mktemp("compare_scenes") / "out"
    return output, compare.main(parse(*scene_argv(scenes, output)))


def test_scenes_get_segmentation_columns_and_no_classification(scene_comparison):
    output, summary = scene_comparison
    header = (output / "comparison.md").read_text().splitlines()[0]
    assert "seg. linear mIoU" in header and "seg. retrieval mIoU" in header and "corr. exact" in header
    assert "k-NN" not in header and "linear top-1" not in header
    assert not (output / "pwself" / "seed0" / "knn.json").exists()
    for method in ("random", "dino", "pwself"):
        values = summary["runs"][method]["0" if method != "random" else "None"]
        assert set(values) == {"corr_accuracy", "corr_within_one", "corr_textured", "corr_error", "seg_linear",
                               "seg_retrieval"}
        assert all(0 <= values[key] <= 100 for key in ("seg_linear", "seg_retrieval"))
    result = json.loads((output / "pwself" / "seed0" / "segmentation.json").read_text())
    assert (result["settings"]["size"], result["settings"]["val_split"], result["settings"]["epochs"]) == (32, "val", 2)
    assert result["weights"] == str(output / "pwself" / "seed0" / "train" / "checkpoint.pth")


def test_trained_in_evaluates_another_comparisons_models_without_training(scene_comparison, scenes, tmp_path):
    source, summary = scene_comparison
    argv = scene_argv(scenes, tmp_path / "out", "--trained_in", str(source))
    argv[argv.index("--train_args"):argv.index("--train_args") + 2] = []
    again = compare.main(parse(*argv))
    assert again["runs"] == summary["runs"]  # the same models, evaluated alike
    assert not (tmp_path / "out" / "pwself" / "seed0" / "train").exists()
    result = json.loads((tmp_path / "out" / "dino" / "seed0" / "segmentation.json").read_text())
    assert result["weights"] == str(source / "dino" / "seed0" / "train" / "checkpoint.pth")
    with pytest.raises(ValueError, match="leave out --train_args, --variant and --init_from"):
        compare.main(parse(*argv, "--train_args", "--epochs 1", "--output_dir", str(tmp_path / "other")))
    with pytest.raises(FileNotFoundError, match="no compare_args.json"):
        compare.main(parse(*argv[:-2], "--trained_in", str(tmp_path), "--output_dir", str(tmp_path / "other")))


def test_folders_written_before_the_segmentation_option_are_reused(finished, dataset, tmp_path, capsys):
    import shutil

    output = tmp_path / "old"
    shutil.copytree(finished[0], output)
    settings = json.loads((output / "compare_args.json").read_text())
    for name in ("segmentation_args", "trained_in"):
        del settings[name]
    (output / "compare_args.json").write_text(json.dumps(settings))
    summary = compare.main(parse(*compare_argv(dataset, output)))
    assert "train ..." not in capsys.readouterr().out and summary["runs"] == finished[1]["runs"]


def test_chance_and_position_only_floors_are_rows_of_the_table(finished):
    output, summary = finished
    table = (output / "comparison.md").read_text()
    corr = json.loads((output / "random" / "correspondence.json").read_text())
    assert summary["grids"] == dict.fromkeys(("random", "dino", "pwself"), "4x4, query 2x2")  # 16 px / 4, 8 px / 4
    floors = summary["floors"]["4x4, query 2x2"]
    assert set(floors) == {"chance", "same_cell", "flip_aware"} and floors["chance"]["corr_accuracy"] == 100 / 16
    for floor, title in compare.FLOOR_ROWS.items():
        values = floors[floor]
        assert values["corr_within_one"] == corr["all"][f"{floor}_within_one"]
        assert values["corr_textured"] == corr["textured"][f"{floor}_accuracy"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {title} |"))
        assert row.split(" | ")[1:3] == ["-", "-"]  # no k-NN or linear figure for a predictor without features
        assert f"{values['corr_accuracy']:.2f}" in row
    lines = table.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| random weights |")))
    assert [line.split(" | ")[0] for line in lines[first + 1:first + 4]] == [f"| {title}" for title in
                                                                             compare.FLOOR_ROWS.values()]
    assert "grid" not in table  # one grid for all: no grid names, no note


# ----------------------------------------------------------------------------------------------
# Safety: folders that stay inside --output_dir and hold one comparison, steps reused only with their own
# arguments, unreadable records redone, correspondence compared on one grid only.
# ----------------------------------------------------------------------------------------------
def copy_of(finished, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished[0], tmp_path / "copy"))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "cls0.5"])
def test_variant_names_that_could_leave_the_folder_are_refused(dataset, tmp_path, name):
    output = tmp_path / "nested" / "out"
    with pytest.raises(ValueError, match=rf"--variant '{re.escape(name)}=--matching centre': .* NAME of letters, "
                                         r"digits, '_' and '-' only .*no '/', '\.' or '\.\.'"):
        compare.main(parse(*compare_argv(dataset, output), "--variant", f"{name}=--matching centre"))
    assert not (tmp_path / "nested").exists()


def test_a_run_recorded_with_other_arguments_is_refused_not_reused(finished, dataset, tmp_path):
    output = copy_of(finished, tmp_path)
    import shutil

    shutil.copytree(output / "pwself", output / "centre")  # as a '../' name of another comparison left it
    settings, files = (output / "compare_args.json").read_text(), sorted(output.rglob("*"))
    with pytest.raises(ValueError, match=r"centre seed 0, step train \(.*centre/seed0/train.json\):\n    "
                                         r"--matching: before 'upstream', now 'centre'[\s\S]*centre seed 1, step train"
                                         r"[\s\S]*Use another --output_dir, or remove each run folder"):
        compare.main(parse(*compare_argv(dataset, output), "--extend", "--variant", "centre=--matching centre"))
    assert (output / "compare_args.json").read_text() == settings and sorted(output.rglob("*")) == files


def test_an_evaluation_recorded_with_other_arguments_is_refused(finished, dataset, tmp_path):
    output = copy_of(finished, tmp_path)
    record = json.loads((output / "dino" / "seed1" / "knn.json").read_text())
    assert record["command"].startswith("eval_knn.py --arch vit_tiny") and record["arguments"]["nb_knn"] == [3]
    record["arguments"]["nb_knn"] = [5]  # as a compare.py with other defaults would have recorded it
    (output / "dino" / "seed1" / "knn.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"dino seed 1, step knn \(.*knn.json\):\n    --nb_knn: before \[5\], "
                                         r"now \[3\]\n.*only the named JSON file to redo just that evaluation"):
        compare.main(parse(*compare_argv(dataset, output)))


def test_unreadable_step_records_are_named_and_redone(finished, dataset, tmp_path, capsys):
    output = copy_of(finished, tmp_path)
    knn, linear, train = (output / "dino" / "seed0" / "knn.json", output / "pwself" / "seed1" / "linear.json",
                          output / "dino" / "seed1" / "train.json")
    knn.write_text(knn.read_text()[:40])  # cut short by a kill
    linear.write_text("")
    train.write_text("[]")
    summary = compare.main(parse(*compare_argv(dataset, output)))
    out = capsys.readouterr().out
    assert f"dino seed 0: {knn} is not valid JSON (" in out and f"pwself seed 1: {linear} is empty" in out
    assert f"dino seed 1: {train} holds no JSON object. Its train step is redone." in out
    assert "dino seed 1: knn is redone, as its model trains again" in out
    assert summary["runs"] == finished[1]["runs"]  # the training resumed at its end: the same model
    assert json.loads(knn.read_text())["results"] == json.loads((finished[0] / knn.relative_to(output)).read_text())[
        "results"]


def test_a_comparison_in_a_folder_in_use_is_refused_naming_the_holder(dataset, tmp_path, root):
    output = tmp_path / "out"
    output.mkdir()
    hold = (f"import sys, time\nsys.path.insert(0, {str(root)!r})\nimport utils\n"
            f"with utils.folder_lock({str(output)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match=rf"{output} is in use by another run \(pid {holder.pid} on host"):
            compare.main(parse(*compare_argv(dataset, output)))
        assert [path.name for path in output.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_output_dir_in_the_way_is_refused_before_anything_runs(dataset, tmp_path):
    in_the_way = tmp_path / "results.md"
    in_the_way.write_text("mine")
    for output in (in_the_way, in_the_way / "out"):
        with pytest.raises(NotADirectoryError, match=rf"--output_dir {output} cannot be a folder: {in_the_way} is a "
                                                     "file"):
            compare.main(parse(*compare_argv(dataset, output)))
    assert [path.name for path in tmp_path.iterdir()] == ["results.md"]


def test_read_only_output_dir_is_refused_before_anything_runs(dataset, tmp_path):
    with small_tmpfs(tmp_path / "disk", "ro,size=64k") as disk:
        with pytest.raises(OSError, match=r"cannot write --output_dir .*disk/out: .*Read-only file system"):
            compare.main(parse(*compare_argv(dataset, disk / "out")))


def test_a_variant_on_another_patch_grid_gets_its_own_chance_rows_and_no_paired_correspondence(
        finished, dataset, tmp_path):
    output = copy_of(finished, tmp_path)
    summary = compare.main(parse(*compare_argv(dataset, output), "--extend", "--variant", "p8=--patch_size 8"))
    assert summary["grids"]["p8"] == "2x2, query 1x1" and summary["grids"]["dino"] == "4x4, query 2x2"
    assert summary["floors"]["2x2, query 1x1"]["chance"]["corr_within_one"] == 100  # every guess is within one
    assert summary["vs_dino"]["p8"]["corr_within_one"]["other_grid"] and summary["vs_dino"]["p8"]["knn_top1"]["n"] == 2
    lines = (output / "comparison.md").read_text().splitlines()
    p8 = lines.index(next(line for line in lines if line.startswith("| p8 (2 seeds, grid 2x2, query 1x1) |")))
    assert lines[p8 + 1].startswith("| chance (uniform guess), grid 2x2, query 1x1 | - | - | 25.00 | 100.00 |")
    assert lines[p8 + 3].startswith("| position only: flip-aware cell, grid 2x2, query 1x1 |")
    assert any(line.startswith("| chance (uniform guess), grid 4x4, query 2x2 | - | - | 6.25 |") for line in lines)
    paired = next(line for line in lines if line.startswith("| p8 − dino, paired |")).rstrip(" |").split(" | ")
    assert paired[3:7] == ["other grid"] * 4 and paired[1].startswith(("+", "-"))  # k-NN is still paired
    assert "Correspondence of p8 (2x2, query 1x1) is measured on another patch grid than dino's" in lines[-1]
    assert "other grid" not in next(line for line in lines if line.startswith("| pwself − dino, paired |"))


def test_records_of_an_older_compare_py_keep_their_training_and_redo_their_evaluations(finished, dataset, tmp_path,
                                                                                      capsys):
    output = copy_of(finished, tmp_path)
    for path in output.glob("*/seed*/*.json"):  # written before steps recorded their arguments
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("command", "arguments")}))
    summary = compare.main(parse(*compare_argv(dataset, output)))
    out = capsys.readouterr().out
    assert "train ..." not in out and "dino seed 1: train done before, reused" in out  # checked on train/args.json
    assert f"{output / 'dino' / 'seed1' / 'knn.json'} does not record the arguments it ran with" in out
    assert summary["runs"] == finished[1]["runs"]
    assert "arguments" in json.loads((output / "dino" / "seed1" / "knn.json").read_text())


# ----------------------------------------------------------------------------------------------
# Continued pre-training: every method starts from the teachers of another comparison.
# ----------------------------------------------------------------------------------------------
def test_init_from_starts_every_seed_from_its_teacher_and_pairs_with_start(finished, dataset, tmp_path):
    source, before = finished
    output = tmp_path / "continued"
    argv = compare_argv(dataset, output, "--init_from", str(source), "--variant", "warm=--freeze_backbone_epochs 1")
    summary = compare.main(parse(*argv))
    assert summary["runs"]["start"] == before["runs"]["dino"]  # the same teachers, evaluated alike
    for method in ("dino", "pwself", "warm"):
        for seed in (0, 1):
            args = json.loads((output / method / f"seed{seed}" / "train" / "args.json").read_text())
            teacher = source / "dino" / f"seed{seed}" / "train" / "checkpoint.pth"
            assert args["init_record"]["file"] == str(teacher.resolve()) and args["init_record"]["heads"] == "loaded"
    assert not (output / "start" / "seed0" / "train").exists()
    table = (output / "comparison.md").read_text()
    for row in ("| start (2 seeds) |", "| pwself − dino, paired |", "| warm − dino, paired |",
                "| dino − start, paired |", "| pwself − start, paired |", f"start: the teachers every method "
                f"continued from (dino of {source})"):
        assert row in table
    assert "start − dino" not in table
    gain = summary["vs_start"]["dino"]["knn_top1"]["mean"]
    assert gain == pytest.approx(sum(summary["runs"]["dino"][s]["knn_top1"] - before["runs"]["dino"][s]["knn_top1"]
                                     for s in "01") / 2)
    # Evaluated elsewhere (--trained_in), the start teachers come along.
    elsewhere = compare_argv(dataset, tmp_path / "elsewhere", "--trained_in", str(output))
    del elsewhere[elsewhere.index("--train_args"):elsewhere.index("--train_args") + 2]
    assert compare.main(parse(*elsewhere))["runs"] == summary["runs"]


@pytest.mark.parametrize("extra, error, match", [
    (["--init_from", "nowhere"], FileNotFoundError, r"--init_from nowhere: no compare_args.json there"),
    (["--init_method", "pwself"], ValueError, r"--init_method pwself has no effect without --init_from"),
    (["--init_from", "SOURCE", "--init_method", "other"], ValueError, r"--init_method other: the comparison in .* "
                                                                      r"has the methods dino, pwself"),
    (["--init_from", "SOURCE", "--train_args", "--init_weights x.pth"], ValueError,
     r"leave --init_weights out of --train_args"),
])
def test_bad_init_from_is_refused_before_anything_runs(finished, dataset, tmp_path, extra, error, match):
    extra = [str(finished[0]) if item == "SOURCE" else item for item in extra]
    with pytest.raises(error, match=match):
        compare.main(parse(*compare_argv(dataset, tmp_path / "out", *extra)))
    assert not (tmp_path / "out").exists()
