"""Evaluations never report, replace or run what is not theirs (docs/troubleshooting.md):
linear checkpoints of other runs, training checkpoints under an export, features of other weights,
crafted ground-truth pickles, and output paths that cannot be written are all refused by name."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_copy_detection
import eval_image_retrieval
import eval_knn
import eval_linear
import export_backbone
import vision_transformer as vits
from conftest import TINY_BACKBONE_ARGS, write_images

EVAL_ARGS = TINY_BACKBONE_ARGS + ["--resize_size", "16", "--crop_size", "16", "--num_workers", "0", "--device", "cpu"]
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/, val/ and holdout/ splits of three classes of random images."""
    root = tmp_path_factory.mktemp("safety") / "data"
    for split, per_class, seed in (("train", 3, 1), ("val", 2, 2), ("holdout", 1, 3)):
        write_images(root / split, classes=CLASSES, per_class=per_class, seed=seed)
    return root


def final_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("FINAL ")][-1][len("FINAL "):])


def run_script(root, script, *argv):
    """The script as a user runs it: (exit status, stderr)."""
    result = subprocess.run([sys.executable, str(root / script), *map(str, argv)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    return result.returncode, result.stderr


# ----------------------------------------------------------------------------------------------
# eval_linear.py resumes or evaluates only heads of the same weights, features and settings.
# ----------------------------------------------------------------------------------------------
def linear_args(data, output, *extra):
    return eval_linear.get_args_parser().parse_args(
        EVAL_ARGS + ["--data_path", str(data), "--n_last_blocks", "1", "--epochs", "1", "--batch_size_per_gpu", "8",
                     "--output_dir", str(output), *map(str, extra)])


def test_linear_refuses_heads_of_other_weights_split_or_settings(data, trained_checkpoint, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    shutil.copy(trained_checkpoint, weights)
    output = tmp_path / "linear"
    first = eval_linear.main(linear_args(data, output, "--pretrained_weights", weights))
    checkpoint = output / eval_linear.CHECKPOINT_NAME
    written = checkpoint.read_bytes()
    # Another run in the same folder: its result would be the first run's (the checkpoint is complete).
    with pytest.raises(ValueError, match=rf"{checkpoint} holds heads of another linear evaluation \(weights {weights} "
                                         r"\(--checkpoint_key teacher\) there, random_init now \(other tensors\)\); "
                                         r"resuming or evaluating them would report their result under this run's "
                                         r"label\. Use another --output_dir, move .* away"):
        eval_linear.main(linear_args(data, output, "--random_init"))
    with pytest.raises(ValueError, match=r"\(--val_split val there, holdout now; --lrs \[0\.001\] there, \[0\.5\] now; "
                                         r"--seed 0 there, 3 now\)"):
        eval_linear.main(linear_args(data, output, "--pretrained_weights", weights, "--val_split", "holdout",
                                     "--lrs", "0.5", "--seed", "3"))
    with pytest.raises(ValueError, match=r"--n_last_blocks 1 there, 2 now; --avgpool_patchtokens False there, True"):
        eval_linear.main(linear_args(data, output, "--pretrained_weights", weights, "--n_last_blocks", "2",
                                     "--avgpool_patchtokens", "true"))
    with pytest.raises(ValueError, match=r"--checkpoint_key teacher\) there, .*--checkpoint_key student\) now"):
        eval_linear.main(linear_args(data, output, "--pretrained_weights", weights, "--checkpoint_key", "student"))
    with pytest.raises(ValueError, match=r"weights .* there, random_init now"):  # --evaluate too
        eval_linear.main(linear_args(data, output, "--random_init", "--evaluate"))
    # The same path holding other tensors (its training went on) is other weights.
    state = torch.load(weights, weights_only=True)
    state["teacher"]["backbone.norm.bias"] += 1.0
    torch.save(state, weights)
    with pytest.raises(ValueError, match=rf"weights {weights} \(--checkpoint_key teacher\) there, {weights} "
                                         r"\(--checkpoint_key teacher\) now \(other tensors\)"):
        eval_linear.main(linear_args(data, output, "--pretrained_weights", weights))
    assert checkpoint.read_bytes() == written  # nothing refused touched it
    # The same weights (moved: compared by their tensors) and settings resume; --evaluate on another split is fine.
    shutil.copy(trained_checkpoint, tmp_path / "moved.pth")
    capsys.readouterr()
    assert eval_linear.main(linear_args(data, output, "--pretrained_weights", tmp_path / "moved.pth")) == first
    assert "Resumed linear heads" in capsys.readouterr().out
    evaluated = eval_linear.main(linear_args(data, output, "--pretrained_weights", trained_checkpoint, "--evaluate",
                                             "--val_split", "holdout"))
    assert 0 <= evaluated["top1"] <= 100


def test_linear_refuses_a_checkpoint_that_records_no_settings(data, tmp_path):
    output = tmp_path / "linear"
    eval_linear.main(linear_args(data, output, "--random_init"))
    checkpoint = torch.load(output / eval_linear.CHECKPOINT_NAME, weights_only=True)
    del checkpoint["settings"]  # as eval_linear.py wrote it before recording them
    torch.save(checkpoint, output / eval_linear.CHECKPOINT_NAME)
    for extra in ((), ("--evaluate",)):
        with pytest.raises(ValueError, match=r"linear_checkpoint.pth does not record the weights and settings its "
                                             r"heads were trained with .*Use another --output_dir, or move"):
            eval_linear.main(linear_args(data, output, "--random_init", *extra))


# ----------------------------------------------------------------------------------------------
# export_backbone.py never replaces a training checkpoint, nor any file without --overwrite.
# ----------------------------------------------------------------------------------------------
def export(weights, output, *extra):
    return export_backbone.main(export_backbone.get_args_parser().parse_args(
        TINY_BACKBONE_ARGS + ["--pretrained_weights", str(weights), "--format", "dino", "--output", str(output),
                              *extra]))


def test_export_never_replaces_a_training_checkpoint(trained_checkpoint, tmp_path):
    run = tmp_path / "other_run" / "checkpoint.pth"
    run.parent.mkdir()
    shutil.copy(trained_checkpoint, run)
    linear = tmp_path / "linear_checkpoint.pth"
    torch.save({"probe": {}, "epoch": 3, "best": None}, linear)
    for target in (run, linear):
        before = target.read_bytes()
        for extra in ((), ("--overwrite",)):
            with pytest.raises(FileExistsError, match=rf"--output {target} is a training checkpoint \(it holds "
                                                      r".*epoch\); an export never replaces one, --overwrite "
                                                      r"included\. Write the export to another file"):
                export(trained_checkpoint, target, *extra)
        assert target.read_bytes() == before


def test_export_replaces_an_existing_file_only_with_overwrite(trained_checkpoint, tmp_path):
    output = tmp_path / "backbone.pth"
    output.write_text("my notes\n")
    with pytest.raises(FileExistsError, match=rf"--output {output} exists; pass --overwrite to replace it"):
        export(trained_checkpoint, output)
    assert output.read_text() == "my notes\n"
    export(trained_checkpoint, output, "--overwrite")
    with pytest.raises(FileExistsError, match="pass --overwrite"):  # an earlier export is kept too
        export(trained_checkpoint, output)
    export(trained_checkpoint, output, "--overwrite")
    assert "cls_token" in torch.load(output, weights_only=True)


# ----------------------------------------------------------------------------------------------
# eval_knn.py --load_features reports the weights the features came from.
# ----------------------------------------------------------------------------------------------
def knn_args(*argv):
    return eval_knn.get_args_parser().parse_args(["--nb_knn", "1", "3", *map(str, argv)])


@pytest.fixture
def dumped(data, trained_checkpoint, tmp_path):
    """Features of the trained weights dumped by eval_knn.py, and their result."""
    folder = tmp_path / "features"
    result = eval_knn.main(knn_args(*EVAL_ARGS, "--data_path", data, "--pretrained_weights", trained_checkpoint,
                                    "--dump_features", folder))
    return folder, result


def test_loaded_features_are_labelled_with_their_own_weights(dumped, trained_checkpoint, tmp_path, capsys):
    folder, computed = dumped
    source = json.loads((folder / eval_knn.FEATURE_SOURCE).read_text())
    assert source["weights_path"] == str(trained_checkpoint.resolve()) and source["val_split"] == "val"
    capsys.readouterr()
    assert eval_knn.main(knn_args("--load_features", folder)) == computed
    summary = final_line(capsys.readouterr().out)
    assert summary["weights"] == str(trained_checkpoint.resolve()) and summary["features"] == str(folder.resolve())
    assert eval_knn.main(knn_args("--load_features", folder, "--pretrained_weights", trained_checkpoint)) == computed
    for other in (["--random_init"], ["--pretrained_weights", tmp_path / "other.pth"]):
        with pytest.raises(ValueError, match=rf"--load_features {folder} evaluates features of the weights "
                                             rf"{trained_checkpoint.resolve()} \(recorded in .*features_source.json\), "
                                             r"not .*: drop --pretrained_weights / --random_init"):
            eval_knn.main(knn_args("--load_features", folder, *other))


def test_features_without_a_record_are_labelled_as_unknown(dumped, trained_checkpoint, capsys):
    folder, computed = dumped
    (folder / eval_knn.FEATURE_SOURCE).unlink()  # as DINO dumps them
    capsys.readouterr()
    assert eval_knn.main(knn_args("--load_features", folder)) == computed
    assert final_line(capsys.readouterr().out)["weights"] == f"not recorded (features of {folder.resolve()})"
    with pytest.raises(ValueError, match="holds no features_source.json saying which weights they came from"):
        eval_knn.main(knn_args("--load_features", folder, "--pretrained_weights", trained_checkpoint))


def test_missing_truncated_or_mixed_feature_files_are_named(dumped, tmp_path, root):
    folder, _ = dumped
    (folder / "testlabels.pth").rename(tmp_path / "testlabels.pth")
    with pytest.raises(FileNotFoundError, match=r"testlabels.pth not found: a --load_features folder holds"):
        eval_knn.main(knn_args("--load_features", folder))
    (tmp_path / "testlabels.pth").rename(folder / "testlabels.pth")
    torch.save(torch.zeros(2, dtype=torch.long), folder / "testlabels.pth")  # another dump's file
    with pytest.raises(RuntimeError, match=r"testlabels.pth is not the tensor recorded in .*features_source.json"):
        eval_knn.main(knn_args("--load_features", folder))
    content = (folder / "trainfeat.pth").read_bytes()
    (folder / "trainfeat.pth").write_bytes(content[: len(content) // 2])  # a copy cut short
    status, stderr = run_script(root, "eval_knn.py", "--load_features", folder)
    assert status == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: cannot read {folder / 'trainfeat.pth'}: ") and "truncated" in stderr
    with pytest.raises(FileNotFoundError, match=r"--load_features .*absent is not a folder"):
        eval_knn.main(knn_args("--load_features", tmp_path / "absent"))


# ----------------------------------------------------------------------------------------------
# eval_image_retrieval.py unpickles the ground truth with an allow-list.
# ----------------------------------------------------------------------------------------------
class CreatesAFile:
    """What a crafted pickle can hold: unpickling it with ``pickle.load`` calls ``open(path, "w")``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_ground_truth(folder, content, protocol=pickle.DEFAULT_PROTOCOL, numpy1=False):
    """``content`` as ``folder/tinyox/gnd_tinyox.pkl``; ``numpy1`` spells numpy's module as numpy 1 wrote it."""
    data = pickle.dumps(content, protocol=protocol)
    if numpy1:  # protocol 2 names globals as text lines, so the spelling can be swapped in place
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    (folder / "tinyox").mkdir(parents=True, exist_ok=True)
    (folder / "tinyox" / "gnd_tinyox.pkl").write_bytes(data)
    return folder / "tinyox" / "gnd_tinyox.pkl"


def test_crafted_ground_truth_pickle_is_refused(tmp_path):
    created = tmp_path / "created_by_the_pickle"
    path = write_ground_truth(tmp_path, {"imlist": [], "qimlist": ["q"], "gnd": [{"bbx": CreatesAFile(created)}]})
    with pytest.raises(ValueError, match=rf"{path} asks to build io.open while being unpickled; it is not loaded, "
                                         r"because that could run arbitrary code"):
        eval_image_retrieval.load_ground_truth(str(tmp_path), "tinyox")
    assert not created.exists()


@pytest.mark.parametrize("protocol, numpy1", [(2, False), (2, True), (4, False), (pickle.HIGHEST_PROTOCOL, False)])
def test_ground_truth_with_numpy_arrays_still_loads(tmp_path, protocol, numpy1):
    gnd = [{"bbx": np.array([1.5, 2.0, 30.0, 40.0]), "easy": np.array([0, 2], dtype=np.int64),
            "hard": np.array([], dtype=np.int64), "junk": [1], "score": np.float64(0.5), "seen": {1, 2}}]
    content = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": gnd}
    write_ground_truth(tmp_path, content, protocol, numpy1)
    loaded = eval_image_retrieval.load_ground_truth(str(tmp_path), "tinyox")
    assert loaded["imlist"] == ["a", "b", "c"] and loaded["gnd"][0]["junk"] == [1] and loaded["gnd"][0]["seen"] == {1, 2}
    for key in ("bbx", "easy", "hard"):
        assert loaded["gnd"][0][key].dtype == gnd[0][key].dtype and np.array_equal(loaded["gnd"][0][key], gnd[0][key])
    assert loaded["gnd"][0]["score"] == 0.5


def test_truncated_ground_truth_is_named(tmp_path):
    path = write_ground_truth(tmp_path, {"imlist": ["a"] * 50, "qimlist": [], "gnd": []})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"cannot read {path}: .*truncated or not a revisitop ground-truth pickle"):
        eval_image_retrieval.load_ground_truth(str(tmp_path), "tinyox")


# ----------------------------------------------------------------------------------------------
# Output paths are checked before any model or data is read; checkpoint layouts are named.
# ----------------------------------------------------------------------------------------------
def test_unwritable_outputs_are_named_before_any_work(tmp_path, weights_not_to_load):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where a folder is expected\n")
    weights_args = ["--pretrained_weights", str(weights_not_to_load)]
    cases = [
        (eval_linear.main, linear_args(tmp_path, blocker, *weights_args), "--output_dir"),
        (eval_knn.main, knn_args(*EVAL_ARGS, "--data_path", tmp_path, *weights_args,
                                 "--output_json", blocker / "knn.json"), "the folder of --output_json"),
        (eval_knn.main, knn_args(*EVAL_ARGS, "--data_path", tmp_path, *weights_args, "--dump_features", blocker / "f"),
         "--dump_features"),
        (eval_image_retrieval.main, eval_image_retrieval.get_args_parser().parse_args(
            TINY_BACKBONE_ARGS + ["--data_path", str(tmp_path), *weights_args, "--output_dir", str(blocker)]),
         "--output_dir"),
        (eval_copy_detection.main, eval_copy_detection.get_args_parser().parse_args(
            TINY_BACKBONE_ARGS + ["--data_path", str(tmp_path), "--imsize", "32", *weights_args,
                                  "--output_dir", str(blocker / "sub")]), "--output_dir"),
    ]
    for main, args, what in cases:
        with pytest.raises(NotADirectoryError, match=rf"{what} .* cannot be a folder: {blocker} is a file"):
            main(args)
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_checkpoint_of_another_layout_lists_its_keys_in_one_line(tmp_path, root, data):
    model = vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "args": {"arch": "deit_tiny"}}, tmp_path / "deit.pth")
    message = (rf"no 'teacher' weights \(--checkpoint_key teacher\) in {tmp_path / 'deit.pth'}: its entries are model, "
               r"optimizer, epoch, args; those holding weights: model; pass one of them with --checkpoint_key \(e\.g\. "
               r"--checkpoint_key model\)")
    with pytest.raises(ValueError, match=message):
        vits.load_pretrained_weights(model, str(tmp_path / "deit.pth"))
    status, stderr = run_script(root, "eval_knn.py", *EVAL_ARGS, "--data_path", data, "--pretrained_weights",
                                tmp_path / "deit.pth", "--checkpoint_key", "teacher")
    assert status == 1 and "Traceback" not in stderr and len(stderr.splitlines()) == 2, stderr  # + the --debug hint
    assert stderr.startswith("error: no 'teacher' weights") and "--checkpoint_key model" in stderr
    vits.load_pretrained_weights(model, str(tmp_path / "deit.pth"), checkpoint_key="model")  # the named fix works
