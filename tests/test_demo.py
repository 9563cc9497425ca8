"""The Makefile's targets and the demo report."""
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

import demo_report


def make_dry_run(root, target: str) -> str:
    """The commands `make -n target` would run, as a top-level make prints them.

    The suite itself runs under `make test`, whose MAKELEVEL/MAKEFLAGS would make the inner make print
    "Entering directory" lines; a clean environment keeps the output to the recipe.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    command = ["make", "--no-print-directory", "-n", target]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_targets_list_their_steps(root):
    demo = make_dry_run(root, "demo")
    steps = ["prepare_data.py", "patch_wise_dino.py", "eval_knn.py --pretrained_weights", "eval_knn.py --random_init",
             "patch_matching.py", "demo_report.py"]
    positions = [demo.find(step) for step in steps]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), demo
    test = make_dry_run(root, "test")
    assert "-m pytest -q" in test


def test_demo_report_prints_comparison_and_plots(tmp_path, capsys):
    run = tmp_path / "train"
    run.mkdir()
    (run / "log.txt").write_text("\n".join(json.dumps({"epoch": e, "loss": 5.0 - e, "loss_cls": 4.0, "loss_patch": 5.2 - e})
                                           for e in range(3)) + "\n")
    results = {"trained": {"20": {"top1": 71.5, "top5": 95.0}}, "random": {"20": {"top1": 58.25, "top5": 91.0}}}
    for name, values in results.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": values}))
    args = demo_report.get_args_parser().parse_args(
        ["--run_dir", str(run), "--trained", str(tmp_path / "trained.json"), "--random", str(tmp_path / "random.json"),
         "--output", str(tmp_path / "curves.png")])
    table = demo_report.main(args)
    assert "71.50" in table and "58.25" in table and "+13.25" in table and "trained top-1" in capsys.readouterr().out
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width >= 400
    with pytest.raises(FileNotFoundError, match="log.txt not found"):
        demo_report.read_log(tmp_path / "missing" / "log.txt")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("target", ["compare", "compare-cifar10"])
def test_make_compare_targets_prepare_a_holdout_and_pass_valid_recipes(root, tmp_path, target):
    import shlex

    import compare

    steps = make_dry_run(root, target)
    steps = steps.replace("\\\n", " ").splitlines()
    assert "prepare_data.py" in steps[-2] and "--holdout" in steps[-2] and "compare.py" in steps[-1]
    argv = shlex.split(steps[-1])[2:]
    (tmp_path / "train").mkdir()
    args = compare.get_args_parser().parse_args(argv + ["--data_path", str(tmp_path)])
    # the recipe passes the training script's checks
    train = compare.training_args(compare.training_argv(args, [], 0, tmp_path / "run"))
    assert train.patch_size in (4, 8) and train.global_crops_size == 32


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_compare_ablation_extends_the_comparison_with_valid_variants(root, tmp_path):
    import shlex

    import compare

    steps = make_dry_run(root, "compare-ablation").replace("\\\n", " ").splitlines()
    argv = shlex.split(steps[-1])[2:]
    assert "--extend" in argv and argv[argv.index("--output_dir") + 1] == "compare_ablation"
    comparison = make_dry_run(root, "compare").replace("\\\n", " ").splitlines()[-1]
    assert steps[-3] == comparison  # the comparison itself, then a copy of it, then the extension
    assert steps[-2].startswith("test -d compare_ablation || cp -r")
    (tmp_path / "train").mkdir()
    args = compare.get_args_parser().parse_args(argv + ["--data_path", str(tmp_path)])
    variants = compare.parse_variants(args.variant)
    assert list(variants) == ["dino", "pwself", "patch_augment", "separate_head"]
    trains = {name: compare.training_args(compare.training_argv(args, extra, 0, tmp_path / name))
              for name, extra in variants.items()}
    assert trains["patch_augment"].patch_augment and trains["patch_augment"].patch_head == "shared"
    assert trains["separate_head"].patch_head == "separate" and not trains["separate_head"].patch_augment
