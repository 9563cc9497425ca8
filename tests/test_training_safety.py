"""Training keeps its history: going back to an earlier checkpoint with other arguments never overwrites what
another lineage wrote, and every change of arguments is recorded; options that would do nothing are refused."""
import json
from pathlib import Path

import pytest

import utils
from conftest import TINY_ARGS, write_images
from patch_wise_dino import get_args_parser, main, new_superseded_folder

RUN = ["--epochs", "3", "--saveckp_freq", "1"]  # 3 iterations per epoch; checkpoint0000..0002.pth


def parse(data, output, *extra):
    return get_args_parser().parse_args(TINY_ARGS + ["--data_path", str(data), "--output_dir", str(output), *extra])


def contents(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "args_history.jsonl").read_text().splitlines()]


def superseded(output: Path) -> list[Path]:
    return sorted(output.glob("superseded_*"))


@pytest.fixture
def finished_run(tmp_path):
    """A finished 3-epoch run with its periodic checkpoints, and its data folder."""
    data = write_images(tmp_path / "data")
    output = tmp_path / "run"
    main(parse(data, output, *RUN))
    return data, output


def test_going_back_with_other_arguments_moves_the_other_lineage_aside_and_records_it(finished_run, capsys):
    data, output = finished_run
    later = ["checkpoint0001.pth", "checkpoint0002.pth"]
    original = contents(output, later + ["log.txt", "args.json"])
    (output / "checkpoint.pth").unlink()  # docs/troubleshooting.md's recipe: the run went bad after epoch 0; go back there
    start = output / "checkpoint0000.pth"
    changed = (*RUN, "--resume_from", str(start), "--allow_args_change", "--lr", "0.001")
    capsys.readouterr()
    main(parse(data, output, *changed))
    printed = capsys.readouterr().out
    [aside] = superseded(output)
    assert contents(aside, original) == original  # the other lineage's checkpoints, its log and arguments
    assert "Moved checkpoint0001.pth, checkpoint0002.pth (of another lineage" in printed and str(aside) in printed
    for name in later:  # this lineage's own, with its arguments
        assert utils.load_checkpoint(output / name)["args"]["lr"] == 0.001
    assert json.loads((output / "args.json").read_text())["lr"] == 0.001
    first, change = history(output)
    assert (first["start_epoch"], first["from"], first["changed"], first["args"]["lr"]) == (0, None, {}, 0.0005)
    assert (change["start_epoch"], change["start_iteration"], change["from"]) == (1, 0, str(start.resolve()))
    assert change["changed"] == {"--lr": [0.0005, 0.001]} and change["args"]["lr"] == 0.001
    assert change["lineage"] != first["lineage"] and change["time"]

    main(parse(data, output, *changed))  # the same command again (a requeued job): nothing new to record
    assert "Training already finished" in capsys.readouterr().out
    assert len(history(output)) == 2 and superseded(output) == [aside]

    (output / "checkpoint.pth").unlink()  # back to the first lineage's arguments: the second one is kept too
    main(parse(data, output, *RUN, "--resume_from", str(start)))
    assert len(superseded(output)) == 2
    back = history(output)[-1]
    assert (back["start_epoch"], back["changed"], back["lineage"]) == (1, {}, first["lineage"])
    assert utils.load_checkpoint(output / "checkpoint0002.pth")["args"]["lr"] == 0.0005


def test_restarts_of_the_same_lineage_rewrite_its_checkpoints_in_place(finished_run, capsys):
    data, output = finished_run
    final = utils.load_checkpoint(output / "checkpoint.pth")["teacher"]
    # Killed after epoch 1's periodic copy, before checkpoint.pth moved past epoch 0: epoch 1 is redone.
    (output / "checkpoint.pth").write_bytes((output / "checkpoint0000.pth").read_bytes())
    main(parse(data, output, *RUN))
    (output / "checkpoint.pth").unlink()
    main(parse(data, output, *RUN, "--resume_from", str(output / "checkpoint0000.pth")))  # an exact rewind
    assert not superseded(output) and "Moved" not in capsys.readouterr().out
    assert len(history(output)) == 1
    teacher = utils.load_checkpoint(output / "checkpoint.pth")["teacher"]
    assert all(teacher[name].equal(final[name]) for name in final)


@pytest.mark.parametrize("extra, message", [
    (["--patch_out_dim", "48"], "--patch_out_dim 48 has no effect in this run: it needs --patch_head separate or ibot"),
    (["--patch_augment_p", "0.5"], "--patch_augment_p 0.5 has no effect in this run: it needs --patch_augment true"),
    (["--patch_blur", "isotropic"], "--patch_blur isotropic has no effect in this run: it needs --patch_augment true"),
    (["--teacher_patch_temp", "0.05"], "--teacher_patch_temp 0.05 has no effect in this run: it needs --patch_head "
                                       "ibot"),
    (["--patch_loss", "false", "--cls_weight", "0.5"], "--cls_weight 0.5 has no effect in this run: it needs "
                                                        "--patch_loss true"),
    (["--patch_loss", "false", "--matching", "centre"], "--matching centre has no effect in this run: it needs "
                                                         "--patch_loss true"),
    (["--fused_loss", "false", "--loss_chunk_mib", "64"], "--loss_chunk_mib 64 has no effect in this run: it needs "
                                                          "the fused loss"),
    (["--warmup_teacher_temp", "0.02"], "--warmup_teacher_temp 0.02 has no effect in this run: it needs "
                                        "--warmup_teacher_temp_epochs above 0"),
    (["--patch_head", "ibot", "--warmup_teacher_patch_temp", "0.03"],
     "--warmup_teacher_patch_temp 0.03 has no effect in this run: it needs --warmup_teacher_temp_epochs above 0"),
])
def test_options_without_effect_are_refused_naming_what_they_need(tmp_path, extra, message):
    with pytest.raises(ValueError, match="invalid arguments") as error:
        main(parse(tmp_path, tmp_path / "run", *extra))
    assert message in str(error.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [
    ["--patch_head", "separate", "--patch_out_dim", "48"], ["--patch_augment", "true", "--patch_augment_p", "0.5"],
    ["--patch_head", "ibot", "--teacher_patch_temp", "0.05", "--warmup_teacher_patch_temp", "0.03",
     "--warmup_teacher_temp_epochs", "1"],
    ["--patch_loss", "false", "--patch_augment_p", "1.0", "--matching", "upstream"],  # defaults, even when written
    ["--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02"],  # the Makefile's recipe: no warm-up, one value
    ["--patch_loss", "false", "--fused_loss", "true", "--loss_chunk_mib", "64"]])
def test_options_that_act_are_accepted(tmp_path, extra):
    from patch_wise_dino import validate_args

    validate_args(parse(tmp_path, tmp_path / "run", *extra))


def test_lineages_set_aside_within_one_second_get_folders_of_their_own(tmp_path):
    folders = [new_superseded_folder(tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(folder.is_dir() for folder in folders)
