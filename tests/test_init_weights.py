"""Continued pre-training (``--init_weights``): a run starts from a DINO backbone file or DINO's own training
checkpoint, can keep the backbone frozen while fresh heads settle, resumes exactly after a real kill, and
refuses what would mix runs."""
import dataclasses
import json
import math
import signal
import subprocess
import sys

import pytest
import torch

import initialisation
import patch_wise_dino
import utils
import vision_transformer as vits
from conftest import ROOT, dino_backbone_state, write_images

DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"
# The DINO fixture's model and head (vit_tiny/16 shrunk to width 32, depth 1), at small crops.
RUN = ["--arch", "vit_tiny", "--patch_size", "16", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
       "--out_dim", "64", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--global_crops_size", "32",
       "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "2", "--warmup_epochs", "0",
       "--num_workers", "0", "--device", "cpu", "--saveckp_freq", "1", "--print_freq", "100"]
SUBPROCESS_ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("init") / "train", per_class=4, size=(40, 40))  # 4 steps/epoch


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """DINO's released-file layout (backbone only, 14x14 position grid) at the fixture's model size."""
    path = tmp_path_factory.mktemp("weights") / "dino_backbone.pth"
    torch.save(dino_backbone_state(patch_size=16, embed_dim=32, depth=1, grid=14, seed=3), path)
    return path


def arguments(data, output, *extra):
    return patch_wise_dino.get_args_parser().parse_args(RUN + ["--data_path", str(data), "--output_dir", str(output),
                                                               *extra])


def train(data, output, *extra):
    return patch_wise_dino.main(arguments(data, output, *extra))


def backbone_of(checkpoint: dict, part: str) -> dict:
    return {key[len("backbone."):]: value for key, value in utils.strip_prefixes(checkpoint[part]).items()
            if key.startswith("backbone.")}


def equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


# ----------------------------------------------------------------------------------------------
# What is loaded, frozen and recorded.
# ----------------------------------------------------------------------------------------------
def test_a_frozen_backbone_stays_the_files_and_trains_after(data, backbone_file, tmp_path, capsys):
    train(data, tmp_path / "run", "--init_weights", str(backbone_file), "--epochs", "2",
          "--freeze_backbone_epochs", "1")
    loaded = torch.load(backbone_file, weights_only=True)
    after_frozen = utils.load_checkpoint(tmp_path / "run" / "checkpoint0000.pth")
    for part in ("student", "teacher"):  # epoch 0 trained the heads only: the backbones are the file's
        assert equal(backbone_of(after_frozen, part), loaded), part
    after = utils.load_checkpoint(tmp_path / "run" / "checkpoint0001.pth")
    assert not equal(backbone_of(after, "student"), loaded) and not equal(backbone_of(after, "teacher"), loaded)
    first_head = {k: v for k, v in utils.strip_prefixes(after_frozen["student"]).items() if k.startswith("head.")}
    record = after_frozen["args"]["init_record"]
    assert record == {"file": str(backbone_file.resolve()), "checkpoint_key": None, "backbone": "loaded",
                      "position_grid": "14x14", "heads": "fresh (the file holds no head)"}
    assert first_head and after_frozen["epoch"] == 1  # a new run: epochs counted from zero
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1] and log[0]["init"] == record and "init" not in log[1]
    assert json.loads((tmp_path / "run" / "args.json").read_text())["init_record"] == record
    assert "Initialised from --init_weights: file " in capsys.readouterr().out


def test_dinos_training_checkpoint_gives_backbone_and_heads_and_the_starting_knn(data, tmp_path, capsys):
    knn = tmp_path / "knn"
    write_images(knn / "train", per_class=3, size=(36, 36), seed=1)
    write_images(knn / "val", per_class=2, size=(36, 36), seed=2)
    train(data, tmp_path / "run", "--init_weights", str(DINO_CHECKPOINT), "--epochs", "1",
          "--freeze_backbone_epochs", "1", "--init_knn_data", str(knn), "--patch_loss", "false")
    dino, ours = utils.load_checkpoint(DINO_CHECKPOINT), utils.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    teacher = backbone_of(dino, "teacher")
    assert equal(backbone_of(ours, "student"), teacher) and equal(backbone_of(ours, "teacher"), teacher)
    record = ours["args"]["init_record"]
    assert (record["checkpoint_key"], record["heads"], record["position_grid"]) == ("teacher", "loaded", "14x14")
    assert 0 <= record["knn_top1"] <= 100 and f"Initial teacher: 20-NN top-1 {record['knn_top1']:.2f}" in \
        capsys.readouterr().out
    train(data, tmp_path / "other_head", "--init_weights", str(DINO_CHECKPOINT), "--epochs", "1", "--out_dim", "48")
    record = utils.load_checkpoint(tmp_path / "other_head" / "checkpoint.pth")["args"]["init_record"]
    assert record["heads"].startswith("fresh (the file's head does not fit this run's")


def launch(data, output, extra, **kill):
    """``patch_wise_dino.py`` in a process of its own (tests/crash_launcher.py), killed where ``kill`` says."""
    command = [sys.executable, str(ROOT / "tests" / "crash_launcher.py"), *RUN, "--data_path", str(data),
               "--output_dir", str(output), *extra]
    return subprocess.run(command, env={**SUBPROCESS_ENV, **kill}, capture_output=True, text=True, timeout=300)


def test_an_initialised_run_killed_for_real_resumes_exactly(data, backbone_file, tmp_path):
    # Every run in a process of one thread: results are compared bit for bit.
    extra = ["--init_weights", str(backbone_file), "--epochs", "2", "--freeze_backbone_epochs", "1",
             "--save_every_iters", "1"]
    assert launch(data, tmp_path / "a", extra).returncode == 0
    killed = launch(data, tmp_path / "b", extra, PWSELF_KILL_AT="1:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert utils.load_checkpoint(tmp_path / "b" / "checkpoint.pth")["epoch"] == 1
    resumed = launch(data, tmp_path / "b", extra)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Initialised from --init_weights" not in resumed.stdout  # the file is not loaded again
    teachers = [torch.load(tmp_path / run / "teacher_rank0.pt", weights_only=True) for run in ("a", "b")]
    assert equal(*teachers)


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------
def test_another_initialisation_over_an_existing_run_is_refused(data, backbone_file, tmp_path):
    train(data, tmp_path / "run", "--epochs", "1")  # a run from random weights
    with pytest.raises(ValueError, match=r"checkpoint.pth exists: rerunning would resume that run, which was not "
                                         r"started from --init_weights, while this command asks for --init_weights "
                                         r".*dino_backbone.pth.*choose another --output_dir"):
        train(data, tmp_path / "run", "--epochs", "1", "--init_weights", str(backbone_file))


def test_files_that_cannot_start_this_run_are_named(data, tmp_path):
    other_patch = tmp_path / "patch8.pth"
    torch.save(dino_backbone_state(patch_size=8, embed_dim=32, depth=1, grid=4), other_patch)
    with pytest.raises(ValueError, match=r"patch8.pth is a ViT of patch 8, width 32, depth 1, but the arguments build "
                                         r"--arch vit_tiny with patch 16, width 32, depth 1"):
        train(data, tmp_path / "a", "--init_weights", str(other_patch))
    state = dino_backbone_state(patch_size=16, embed_dim=32, depth=1, grid=2)
    state["blocks.0.mlp.fc1.weight"][0, 0] = math.nan
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan.pth holds NaN or infinity in blocks.0.mlp.fc1.weight"):
        train(data, tmp_path / "b", "--init_weights", str(tmp_path / "nan.pth"))
    assert not (tmp_path / "a" / "checkpoint.pth").exists() and not (tmp_path / "b" / "checkpoint.pth").exists()


def test_a_released_name_is_downloaded_once_or_named_with_its_url_and_cache_path(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "server" / "dino_deitsmall16_pretrain.pth"
    entry = vits.REFERENCE_WEIGHTS["dino_vits16"]
    monkeypatch.setitem(vits.REFERENCE_WEIGHTS, "dino_vits16", dataclasses.replace(entry, url=served.as_uri()))
    name = ["--init_weights", "dino_vits16", "--arch", "vit_small", "--embed_dim", "32", "--depth", "1",
            "--num_heads", "2", "--epochs", "1"]
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / entry.file_name
    with pytest.raises(RuntimeError, match=rf"{served.as_uri()}.*{cache}"):  # no network: where to put the file
        train(data, tmp_path / "offline", *name)
    served.parent.mkdir()
    torch.save(dino_backbone_state(patch_size=16, embed_dim=32, depth=1, grid=14), served)  # a tiny "ViT-S/16"
    train(data, tmp_path / "run", *name)
    assert cache.is_file()
    assert utils.load_checkpoint(tmp_path / "run" / "checkpoint.pth")["args"]["init_record"]["file"] == "dino_vits16"


@pytest.mark.parametrize("extra, message", [
    (["--freeze_backbone_epochs", "3", "--epochs", "2"], r"--freeze_backbone_epochs 3 must lie in \[0, --epochs 2\]"),
    (["--init_weights", "missing.pth"], r"--init_weights missing.pth is neither a file nor a released name"),
    (["--init_weights", str(DINO_CHECKPOINT), "--resume_from", str(DINO_CHECKPOINT)],
     r"--init_weights starts a new run and --resume_from continues one"),
    (["--init_checkpoint_key", "student"], r"--init_checkpoint_key student has no effect in this run: it needs "
                                           r"--init_weights")])
def test_bad_initialisation_arguments_are_refused_at_start(data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(data, tmp_path / "run", *extra)


# ----------------------------------------------------------------------------------------------
# Defaults: a run from weights takes those chosen on holdout for what the command leaves unset.
# ----------------------------------------------------------------------------------------------
UNSET = ("lr", "warmup_epochs", "momentum_teacher", "freeze_backbone_epochs")


def without(argv: list[str], *names: str) -> list[str]:
    """``argv`` without the options ``names`` and their values."""
    kept, skip = [], False
    for item in argv:
        if item.lstrip("-") in names:
            skip = True
        elif skip:
            skip = False
        else:
            kept.append(item)
    return kept


def test_unset_options_take_dinos_defaults_from_random_weights_and_the_chosen_ones_from_weights(
        data, backbone_file, tmp_path, capsys):
    parse = patch_wise_dino.get_args_parser().parse_args
    common = without(RUN, *UNSET) + ["--data_path", str(data), "--epochs", "2"]
    scratch = patch_wise_dino.main(parse(common + ["--output_dir", str(tmp_path / "scratch")])).args
    assert {name: getattr(scratch, name) for name in UNSET} == patch_wise_dino.FROM_SCRATCH_DEFAULTS == {
        "lr": 0.0005, "warmup_epochs": 10, "momentum_teacher": 0.996, "freeze_backbone_epochs": 0}
    assert scratch.defaulted == sorted(UNSET)
    assert "Defaults of a run started from weights" not in capsys.readouterr().out

    fresh = patch_wise_dino.main(parse(common + ["--output_dir", str(tmp_path / "fresh"), "--init_weights",
                                                 str(backbone_file)])).args
    chosen = initialisation.continued_defaults(0.0005, {"heads": "fresh"})
    assert {name: getattr(fresh, name) for name in UNSET} == chosen
    assert chosen == {"lr": 0.0005 * initialisation.LR_FRACTION, **initialisation.CONTINUED_DEFAULTS,
                      "freeze_backbone_epochs": initialisation.HEAD_WARMUP_EPOCHS}
    saved = json.loads((tmp_path / "fresh" / "args.json").read_text())
    assert {name: saved[name] for name in UNSET} == chosen and saved["defaulted"] == sorted(UNSET)
    assert ("Defaults of a run started from weights (chosen on holdout; set them to override): --freeze_backbone_epochs "
            f"{chosen['freeze_backbone_epochs']}, --lr {chosen['lr']}") in capsys.readouterr().out

    explicit = patch_wise_dino.main(parse(common + ["--output_dir", str(tmp_path / "explicit"), "--init_weights",
                                                    str(DINO_CHECKPOINT), "--lr", "0.001", "--patch_loss", "false"])).args
    assert explicit.lr == 0.001 and explicit.freeze_backbone_epochs == 0  # DINO's heads fit: no head warm-up
    assert explicit.init_record["heads"] == "loaded" and "lr" not in explicit.defaulted


def test_a_finished_initialised_run_is_recognised_with_or_without_its_init_weights(data, backbone_file, tmp_path,
                                                                                    capsys):
    parse = patch_wise_dino.get_args_parser().parse_args
    command = without(RUN, *UNSET) + ["--data_path", str(data), "--epochs", "1", "--output_dir", str(tmp_path / "run")]
    first = patch_wise_dino.main(parse(command + ["--init_weights", str(backbone_file)])).args
    for again in (command + ["--init_weights", str(backbone_file)], command):  # the file is not read again
        resumed = patch_wise_dino.main(parse(again)).args  # the resume check would name any changed default
        assert {name: getattr(resumed, name) for name in UNSET} == {name: getattr(first, name) for name in UNSET}
        assert "Training already finished" in capsys.readouterr().out


def test_init_heads_false_starts_fresh_heads_on_the_files_backbone(data, tmp_path):
    args = train(data, tmp_path / "run", "--init_weights", str(DINO_CHECKPOINT), "--epochs", "1",
                 "--init_heads", "false", "--patch_loss", "false").args
    assert args.init_record["heads"] == "fresh (--init_heads false)"
    assert args.freeze_backbone_epochs == initialisation.HEAD_WARMUP_EPOCHS
    with pytest.raises(ValueError, match=r"--init_heads False has no effect in this run: it needs --init_weights"):
        train(data, tmp_path / "other", "--init_heads", "false")
