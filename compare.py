"""PW-Self against DINO (and any named variants) over several seeds, evaluated alike, in one table.

    python compare.py --data_path data/fmnist --output_dir compare_output --seeds 3 \\
        --train_args "--arch vit_tiny --patch_size 8 --global_crops_size 32 --local_crops_size 16 ..."
    python compare.py ... --variant "centre=--matching centre" --variant "cls05=--cls_weight 0.5"

Every method trains with the same ``--train_args`` on ``<data_path>/train`` for seeds ``0 .. --seeds - 1``:
``dino`` adds ``--patch_loss false`` (DINO's objective, the baseline), ``pwself`` adds ``--patch_loss true``,
and each ``--variant NAME=ARGS`` is PW-Self with ``ARGS`` appended (later arguments win, so a variant
may also change the patch size or switch the patch loss off). Every final teacher is evaluated with
k-NN, a short linear probe and ``eval_correspondence.py`` on ``<data_path>/<eval_split>``, and so are
random weights (the floor). ``--segmentation_args`` adds ``eval_segmentation.py`` (linear and retrieval mIoU
on the masks of ``<data_path>``, by default a ``voc`` layout such as ``prepare_data.py --dataset
fashion_mnist_scenes`` writes); k-NN and linear are left out where ``<data_path>/train`` has no class
folders (images without labels). ``--trained_in DIR`` evaluates the teachers of the comparison in ``DIR``
instead of training (e.g. models trained on one dataset, evaluated on another). ``--init_from DIR`` continues
pre-training: every method's seed k starts from the final ``dino`` teacher of seed k in the comparison in
``DIR`` (``--init_method``), and those teachers are evaluated alike as the method ``start``. The table gives mean
+- standard deviation over seeds per method and metric, each method's paired difference to ``dino`` seed by seed
and, with ``--init_from``, to ``start``.

Outputs in ``--output_dir``: ``compare_args.json`` (the settings: a rerun with other ones is refused),
``<method>/seed<k>/`` (``train/``, ``linear/``, one JSON per step -- its result, the command it ran and its
arguments -- and a log per step), ``random/``, ``comparison.md``, ``comparison.json`` and ``comparison.png``.
Rerunning the same command reuses every finished run and evaluation whose recorded arguments are this
comparison's (a result recorded with other ones is refused, named; an unreadable one is redone); a killed
comparison continues where it stopped (training resumes from its last checkpoint). One comparison at a time
works in a folder (``utils.folder_lock``). Correspondence figures are only comparable on one patch grid: a
method measured on another (a ``--patch_size`` variant) gets its own grid's chance and position-only rows,
and no paired correspondence difference to ``dino``.

Tune on ``--eval_split holdout`` (``prepare_data.py --holdout N``), then report on ``val``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import numpy as np

import eval_correspondence
import eval_knn
import eval_linear
import eval_segmentation
import patch_wise_dino
import utils
import vision_transformer as vits

BASE_METHODS = {"dino": ["--patch_loss", "false"], "pwself": ["--patch_loss", "true"]}
RANDOM = "random"
START = "start"  # with --init_from: the teachers every continued run starts from, evaluated as they are
# Arguments that may differ between a comparison and its rerun: they do not change any result.
FREE_ARGS = ("output_dir", "num_workers", "device", "extend", "debug")
# A variant's name is its folder in --output_dir: no separators or dot-segments that would lead out of it.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Evaluation arguments that do not change a result: where the comparison folder lies (it may be copied or
# moved), the device and the loaders. A recorded step must match in every other argument it recorded.
EVAL_FREE_ARGS = ("output_dir", "pretrained_weights", "device", "num_workers")
# Training arguments a reused run must match: those its own resume check holds to, and the training images.
TRAIN_CHECKED_ARGS = patch_wise_dino.RESUME_CRITICAL_ARGS + ("data_path",)


@dataclass(frozen=True)
class Metric:
    """One column of the table: where its value sits in an evaluation's result dict."""

    key: str
    title: str
    evaluation: str
    read: Callable[[dict], float | None]
    floor_read: Callable[[dict, str], float | None] | None = None  # a position-only floor's value, by floor name


def _correspondence(key: str, title: str, block: str, score: str) -> Metric:
    """A correspondence column: ``result[block][score]``, and ``<floor>_<score>`` for the floors' rows."""
    return Metric(key, title, "correspondence", lambda result: result[block][score],
                  lambda result, floor: result[block].get(f"{floor}_{score}"))


def _knn_top1(result: dict) -> float:
    return next(iter(result["results"].values()))["top1"]


METRICS = (
    Metric("knn_top1", "k-NN top-1", "knn", _knn_top1),
    Metric("linear_top1", "linear top-1", "linear", lambda result: result["top1"]),
    _correspondence("corr_accuracy", "corr. exact", "all", "accuracy"),
    _correspondence("corr_within_one", "corr. within 1", "all", "within_one"),
    _correspondence("corr_textured", "corr. exact (textured)", "textured", "accuracy"),
    _correspondence("corr_error", "corr. error (patches)", "all", "mean_error"),
    Metric("seg_linear", "seg. linear mIoU", "segmentation", lambda result: result.get("linear", {}).get("mIoU")),
    Metric("seg_retrieval", "seg. retrieval mIoU", "segmentation",
           lambda result: result.get("retrieval", {}).get("mIoU")),
)
# Rows of a uniform guess and of the predictors that see no pixels (eval_correspondence.FLOORS): what a
# patch-level gain must clear. They depend on the patch grid a correspondence was measured on.
FLOOR_ROWS = {"chance": "chance (uniform guess)", "same_cell": "position only: same cell",
              "flip_aware": "position only: flip-aware cell"}
SCRIPTS = {"knn": eval_knn, "linear": eval_linear, "correspondence": eval_correspondence,
           "segmentation": eval_segmentation}


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "Compare PW-Self with DINO over seeds.")
    parser.add_argument("--data_path", required=True, type=Path,
                        help="Dataset root with train/<class>/* (training and the k-NN / linear training set) "
                             "and the --eval_split folder (prepare_data.py writes both).")
    parser.add_argument("--output_dir", default="compare_output", type=Path,
                        help="Where runs, evaluations and the table go; rerunning reuses what is finished.")
    parser.add_argument("--seeds", default=3, type=int, help="Seeds per method (0, 1, ..., seeds - 1).")
    parser.add_argument("--train_args", default="", type=str,
                        help="Arguments of patch_wise_dino.py shared by every method, as one quoted string "
                             "(model, crops, schedule, ...). --data_path, --output_dir, --seed, --device and "
                             "--num_workers are set by this script.")
    parser.add_argument("--variant", default=[], action="append", metavar="NAME=ARGS",
                        help="An extra method: PW-Self with ARGS appended to --train_args, e.g. "
                             "'centre=--matching centre' or 'p4=--patch_size 4'. Repeat for several.")
    parser.add_argument("--eval_split", default="val", type=str,
                        help="Folder under --data_path the evaluations report on: val, or holdout while "
                             "choosing settings (never choose them on the split you report); train is refused.")
    parser.add_argument("--knn_k", default=20, type=int, help="Neighbours of the k-NN classifier.")
    parser.add_argument("--linear_epochs", default=10, type=int, help="Epochs of the short linear probe.")
    parser.add_argument("--linear_lr", default=0.01, type=float,
                        help="Learning rate of the linear probe (for a batch of 256); one value, evaluated "
                             "after the last epoch only, so that nothing is selected on --eval_split.")
    parser.add_argument("--linear_n_last_blocks", default=4, type=int,
                        help="CLS tokens of this many last blocks feed the probe (at most the model's depth).")
    parser.add_argument("--correspondence_args", default="", type=str,
                        help="Extra arguments of eval_correspondence.py as one quoted string (e.g. "
                             "'--num_images 500 --texture_threshold 10'); --size defaults to the crop size.")
    parser.add_argument("--segmentation_args", default=None, type=str,
                        help="Also evaluate segmentation from frozen patch tokens (eval_segmentation.py, linear and "
                             "retrieval mIoU, trained on the train split of the masks at --data_path, scored on "
                             "--eval_split): its extra arguments as one quoted string, '' for its defaults. "
                             "--dataset defaults to voc, --size to the crop size, --seed to the run's seed.")
    parser.add_argument("--trained_in", default=None, type=Path,
                        help="Evaluate the finished teachers of the comparison in this folder (its methods, and "
                             "its first --seeds seeds) instead of training; --train_args and --variant must then "
                             "be left out: they come from that comparison.")
    parser.add_argument("--init_from", default=None, type=Path,
                        help="Continued pre-training: every method's seed k starts from the final teacher of "
                             "--init_method's seed k in the finished comparison in this folder (patch_wise_dino.py "
                             "--init_weights, which --train_args must leave out). Those teachers are evaluated alike "
                             "as the method 'start', and the table adds each method's paired difference to start.")
    parser.add_argument("--init_method", default="dino", type=str,
                        help="With --init_from: the method of that comparison whose teachers start every run.")
    parser.add_argument("--resize_size", default=None, type=int,
                        help="Evaluation resize of the shorter side (default: the crop size, no border cut).")
    parser.add_argument("--crop_size", default=None, type=int,
                        help="Evaluation crop side (default: each run's --global_crops_size).")
    parser.add_argument("--extend", action="store_true",
                        help="Let this rerun add --variant entries and seeds to an existing comparison (its runs "
                             "are reused); every other argument must be as before.")
    parser.add_argument("--num_workers", default=2, type=int, help="Data-loading processes of every step.")
    utils.add_device_arg(parser)
    return parser


# ----------------------------------------------------------------------------------------------
# The plan: which runs, with which arguments, checked before anything runs.
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One method trained with one seed (or the random-weights floor, ``seed`` None)."""

    method: str
    seed: int | None
    folder: Path
    train: argparse.Namespace | None
    checkpoint: Path | None = None  # set when the run was trained elsewhere (--trained_in)
    train_argv: list[str] | None = None  # patch_wise_dino.py's command line, when the run trains here

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} seed {self.seed}"

    @property
    def trains_here(self) -> bool:
        return self.seed is not None and self.checkpoint is None

    @property
    def weights(self) -> Path:
        return self.checkpoint or self.folder / "train" / "checkpoint.pth"


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``["name=--a 1", ...]`` -> ``{"dino": [...], "pwself": [...], "name": [..., "--a", "1"]}`` (extra args)."""
    methods = {name: list(extra) for name, extra in BASE_METHODS.items()}
    for spec in specs:
        name, separator, extra = spec.partition("=")
        name = name.strip()
        if not separator or not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"--variant {spec!r}: write NAME=ARGS with a NAME of letters, digits, '_' and '-' "
                             "only (it names the variant's folder in --output_dir, so no '/', '.' or '..'), "
                             "e.g. 'centre=--matching centre' or 'cls05=--cls_weight 0.5'")
        if name in methods or name == RANDOM:
            raise ValueError(f"--variant name {name!r} is taken; choose another")
        methods[name] = BASE_METHODS["pwself"] + shlex.split(extra)
    return methods


def training_argv(args: argparse.Namespace, extra: list[str], seed: int, folder: Path,
                  init: Path | None = None) -> list[str]:
    """patch_wise_dino.py's command line for one training run in ``folder``, started from the weights ``init``
    when given."""
    start = ["--init_weights", str(init)] if init is not None else []
    return shlex.split(args.train_args) + extra + start + [
        "--data_path", str(args.data_path / "train"), "--output_dir", str(folder / "train"), "--seed", str(seed),
        "--device", args.device, "--num_workers", str(args.num_workers)]


def training_args(argv: list[str]) -> argparse.Namespace:
    """The arguments of one training run, validated by the training script itself."""
    try:
        train = patch_wise_dino.get_args_parser().parse_args(argv)
    except SystemExit as error:
        raise ValueError(f"patch_wise_dino.py refuses the arguments {shlex.join(argv)} (see above)") from error
    patch_wise_dino.validate_args(train)
    return train


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every run of the comparison: the random floor (with the first run's model), the start teachers with
    ``--init_from``, then methods in order, seeds inside."""
    if args.trained_in is not None:
        runs = trained_runs(args)
        return [random_run(args, runs)] + runs
    starts = start_runs(args.init_from, args.init_method, args.seeds, args.output_dir) if args.init_from else []
    runs = []
    for method, extra in parse_variants(args.variant).items():
        for seed in range(args.seeds):
            folder = args.output_dir / method / f"seed{seed}"
            argv = training_argv(args, extra, seed, folder, starts[seed].weights if starts else None)
            runs.append(Run(method, seed, folder, training_args(argv), train_argv=argv))
    return [random_run(args, runs)] + starts + runs


def random_run(args: argparse.Namespace, runs: list[Run]) -> Run:
    """The random-weights floor, with the model of the first run."""
    return Run(RANDOM, None, args.output_dir / RANDOM, runs[0].train)


def finished_run(source: Path, method: str, seed: int, name: str, folder: Path) -> Run:
    """``method``'s seed ``seed`` of the finished comparison in ``source``, as the run ``name`` evaluated in
    ``folder``: the training arguments it recorded and its final checkpoint."""
    run_dir = source / method / f"seed{seed}"
    if not (run_dir / "train.json").is_file():
        raise FileNotFoundError(f"{method} seed {seed} in {source} has not finished training ({run_dir / 'train.json'} "
                                "is missing): finish that comparison first by rerunning its command")
    train = argparse.Namespace(**load_json(run_dir / "train" / "args.json"))
    return Run(name, seed, folder, train, run_dir / "train" / "checkpoint.pth")


def comparison_settings(source: Path, option: str, seeds: int) -> dict:
    """The recorded settings of the comparison in ``source`` (named by ``option``), which must have ``seeds``."""
    settings_path = source / "compare_args.json"
    if not settings_path.is_file():
        raise FileNotFoundError(f"{option} {source}: no compare_args.json there; name the --output_dir of a "
                                "compare.py run")
    settings = load_json(settings_path)
    if seeds > settings["seeds"]:
        raise ValueError(f"--seeds {seeds}: the comparison in {source} has {settings['seeds']} seed(s)")
    return settings


def start_runs(source: Path, method: str, seeds: int, output_dir: Path) -> list[Run]:
    """The teachers of ``method`` in the comparison ``source`` (seeds ``0 .. seeds - 1``) that continued runs start
    from, as the method ``start`` evaluated in ``output_dir``."""
    settings = comparison_settings(source, "--init_from", seeds)
    if method not in parse_variants(settings["variant"]):
        raise ValueError(f"--init_method {method}: the comparison in {source} has the methods "
                         f"{', '.join(parse_variants(settings['variant']))}")
    return [finished_run(source, method, seed, START, output_dir / START / f"seed{seed}") for seed in range(seeds)]


def trained_runs(args: argparse.Namespace) -> list[Run]:
    """The runs of the finished comparison ``--trained_in``: its start teachers (if it continued from some), its
    methods, seeds ``0 .. --seeds - 1``, each with the training arguments its run recorded and its final
    checkpoint."""
    source = args.trained_in
    settings = comparison_settings(source, "--trained_in", args.seeds)
    runs = []
    if settings.get("init_from") is not None:
        runs += start_runs(Path(settings["init_from"]), settings["init_method"], args.seeds, args.output_dir)
    for method in parse_variants(settings["variant"]):
        runs += [finished_run(source, method, seed, method, args.output_dir / method / f"seed{seed}")
                 for seed in range(args.seeds)]
    return runs


def validate_args(args: argparse.Namespace) -> None:
    """Stop before anything runs on settings that cannot work, naming the fix."""
    if args.seeds <= 0:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    for name in ("knn_k", "linear_epochs", "linear_n_last_blocks", "linear_lr"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("resize_size", "crop_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.trained_in is not None and (args.train_args or args.variant or args.init_from):
        raise ValueError(f"--trained_in {args.trained_in} evaluates that comparison's models with their own "
                         "training arguments and methods: leave out --train_args, --variant and --init_from")
    if args.init_from is None and args.init_method != get_args_parser().get_default("init_method"):
        raise ValueError(f"--init_method {args.init_method} has no effect without --init_from: give both, or neither")
    if args.init_from is not None and "--init_weights" in shlex.split(args.train_args):
        raise ValueError(f"--init_from {args.init_from} gives every run its --init_weights (the teacher of its "
                         "seed): leave --init_weights out of --train_args")
    if (args.data_path / args.eval_split).resolve() == (args.data_path / "train").resolve():
        raise ValueError(f"--eval_split {args.eval_split} is the training split: the models were trained and "
                         "k-NN and the linear probe are fit on it, so scoring on it measures memory, not features. "
                         "Use --eval_split val to report, or holdout (prepare_data.py --holdout N) while choosing "
                         "settings.")
    utils.check_output_dir(args.output_dir, "--output_dir")
    for split in ("train", args.eval_split):
        folder = args.data_path / split
        if not folder.is_dir():
            hint = " (prepare_data.py --holdout N writes it)" if split == "holdout" else ""
            raise FileNotFoundError(f"{folder} not found: --data_path must hold train/ and {args.eval_split}/{hint}")
        utils.list_image_files(folder)  # raises, naming the folder, when it holds no images


# ----------------------------------------------------------------------------------------------
# Settings of a comparison folder: a rerun must use the same ones.
# ----------------------------------------------------------------------------------------------
def recorded_settings(args: argparse.Namespace) -> dict:
    return {name: (str(value) if isinstance(value, Path) else value)
            for name, value in sorted(vars(args).items()) if name not in FREE_ARGS}


def check_settings(args: argparse.Namespace) -> None:
    """In a folder holding a comparison, refuse other settings (listing them); refuse a folder holding
    anything else. Nothing is written."""
    path = args.output_dir / "compare_args.json"
    if path.is_file():
        try:
            before = load_json(path)
        except ValueError as error:
            raise ValueError(f"{error} It records the settings of the comparison in {args.output_dir}, so a rerun "
                             "cannot check its runs: restore it, or choose another --output_dir.") from None
        differences = settings_differences(before, recorded_settings(args), args.extend)
        if differences:
            raise ValueError(f"{args.output_dir} holds a comparison made with other arguments; nothing was "
                             "changed. Use another --output_dir, or the earlier arguments (--extend only adds "
                             "variants and seeds):\n  " + "\n  ".join(differences))
    elif args.output_dir.exists() and any(item.name != utils.LOCK_NAME for item in args.output_dir.iterdir()):
        raise FileExistsError(f"{args.output_dir} is not empty and holds no compare_args.json: choose a new "
                              "--output_dir (nothing was changed)")


def record_settings(args: argparse.Namespace) -> None:
    utils.write_text_atomic(json.dumps(recorded_settings(args), indent=2) + "\n", args.output_dir / "compare_args.json")


def load_json(path: Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it holds none (empty, cut short)."""
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is empty (cut short by a kill?).")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}; cut short by a kill?).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds no JSON object.")
    return value


def settings_differences(before: dict, now: dict, extend: bool) -> list[str]:
    """``--name: before X, now Y`` for every setting that changed, except additions allowed by ``extend``:
    more seeds, and new variants (an existing variant's name keeps its arguments). A setting that a folder
    written before it existed lacks counts as its default."""
    defaults = get_args_parser()
    differences = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name, defaults.get_default(name)), now.get(name)
        if old == new:
            continue
        if extend and name == "seeds" and new > old:
            continue
        if extend and name == "variant" and set(old) <= set(new):
            continue  # every old variant is still there (a new one cannot reuse a name: parse_variants)
        differences.append(f"--{name}: before {old!r}, now {new!r}")
    return differences


# ----------------------------------------------------------------------------------------------
# Steps: training and the evaluations, each skipped when its result file exists.
# ----------------------------------------------------------------------------------------------
def backbone_argv(run: Run) -> list[str]:
    """The evaluation scripts' backbone and weights arguments for ``run``'s model."""
    argv = ["--arch", run.train.arch, "--patch_size", str(run.train.patch_size)]
    for name, value in vits.size_overrides(run.train).items():
        argv += [f"--{name}", str(value)]
    if run.seed is None:
        return argv + ["--random_init"]
    return argv + ["--pretrained_weights", str(run.weights), "--checkpoint_key", "teacher"]


def evaluations_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The evaluations of this comparison: k-NN and linear where the training images have class folders,
    correspondence always, segmentation when asked for."""
    labelled = bool(utils.find_class_folders(args.data_path / "train", warn=False))
    chosen = ("knn", "linear") if labelled else ()
    return chosen + ("correspondence",) + (("segmentation",) if args.segmentation_args is not None else ())


def metrics_of(evaluations: tuple[str, ...]) -> tuple[Metric, ...]:
    return tuple(metric for metric in METRICS if metric.evaluation in evaluations)


def eval_sizes(args: argparse.Namespace, run: Run) -> tuple[int, int]:
    """``(resize, crop)`` of the evaluations: the run's global crop size unless set."""
    crop = args.crop_size or run.train.global_crops_size
    return args.resize_size or crop, crop


def evaluation_argv(args: argparse.Namespace, run: Run, evaluation: str) -> list[str]:
    """Command-line arguments of ``eval_<evaluation>.py`` for ``run``."""
    resize, crop = eval_sizes(args, run)
    common = backbone_argv(run) + ["--device", args.device]
    if evaluation == "correspondence":
        return common + ["--data_path", str(args.data_path / args.eval_split), "--size", str(crop)] \
            + shlex.split(args.correspondence_args)
    if evaluation == "segmentation":
        return common + ["--data_path", str(args.data_path), "--dataset", "voc", "--train_split", "train",
                         "--val_split", args.eval_split, "--size", str(crop), "--num_workers", str(args.num_workers),
                         "--seed", str(run.seed or 0)] + shlex.split(args.segmentation_args)
    common += ["--data_path", str(args.data_path), "--val_split", args.eval_split, "--resize_size", str(resize),
               "--crop_size", str(crop), "--num_workers", str(args.num_workers)]
    if evaluation == "knn":
        return common + ["--nb_knn", str(args.knn_k)]
    depth = run.train.depth or 12  # vit_tiny, vit_small and vit_base all have 12 blocks
    return common + ["--epochs", str(args.linear_epochs), "--lrs", str(args.linear_lr), "--val_freq",
                     str(args.linear_epochs), "--n_last_blocks", str(min(args.linear_n_last_blocks, depth)),
                     "--seed", str(run.seed or 0), "--output_dir", str(run.folder / "linear")]


def evaluation_args(args: argparse.Namespace, run: Run,
                    evaluation: str) -> tuple[object, list[str], argparse.Namespace]:
    """The evaluation script's module, its command line and its parsed, validated arguments for ``run``."""
    script = SCRIPTS[evaluation]
    argv = evaluation_argv(args, run, evaluation)
    try:
        parsed = script.get_args_parser().parse_args(argv)
    except SystemExit as error:
        raise ValueError(f"eval_{evaluation}.py refuses the arguments {shlex.join(argv)} (see above)") from error
    script.validate_args(parsed)
    return script, argv, parsed


@dataclass
class Step:
    """One step of a run. Its result goes to ``<run>/<name>.json`` with ``command`` and ``arguments`` (all
    parsed values, JSON-ready), which a rerun checks before reusing the result."""

    run: Run
    name: str
    command: str
    arguments: dict
    action: Callable[[], dict]

    @property
    def result_path(self) -> Path:
        return self.run.folder / f"{self.name}.json"


def json_ready(args: argparse.Namespace) -> dict:
    """``vars(args)`` as JSON reads it back (paths as strings, tuples as lists), so that records compare equal."""
    return json.loads(json.dumps(vars(args), default=str))


def training_step(run: Run) -> Step:
    def train() -> dict:
        trainer = patch_wise_dino.main(run.train)
        del trainer  # frees the model before the evaluations
        return {"epochs": run.train.epochs}

    return Step(run, "train", "patch_wise_dino.py " + shlex.join(run.train_argv), json_ready(run.train), train)


def evaluation_step(args: argparse.Namespace, run: Run, evaluation: str) -> Step:
    """The evaluation as a step; its arguments are parsed and checked now, before any step runs."""
    script, argv, parsed = evaluation_args(args, run, evaluation)
    arguments = json_ready(parsed)  # taken before the script's main may touch ``parsed``

    def evaluate() -> dict:
        result = script.main(parsed)
        return {"results": {str(k): value for k, value in result.items()}} if evaluation == "knn" else result

    return Step(run, evaluation, f"eval_{evaluation}.py {shlex.join(argv)}", arguments, evaluate)


def steps_of(args: argparse.Namespace, run: Run) -> list[Step]:
    """Every step of ``run``: its training (when it trains here), then its evaluations."""
    steps = [training_step(run)] if run.trains_here else []
    return steps + [evaluation_step(args, run, evaluation) for evaluation in evaluations_of(args)]


def reusable_steps(steps: list[Step]) -> set[int]:
    """Indices of the steps whose recorded result was made with this comparison's arguments: they are reused.

    An unreadable result, one that records no arguments, and the evaluations of a model that trains again are
    redone (each named). A result recorded with other arguments (a folder shared with another comparison, or
    defaults changed since) stops the comparison before any step runs, every such step listed with the fix.
    """
    reusable, retraining, conflicts = set(), set(), []
    for index, step in enumerate(steps):
        recorded = recorded_arguments(step)
        if step.run.folder in retraining:
            if recorded is not None:
                print(f"{step.run.label}: {step.name} is redone, as its model trains again", flush=True)
        elif recorded is None:
            if step.name == "train":
                retraining.add(step.run.folder)
        elif differences := argument_differences(step, recorded):
            conflicts.append(f"{step.run.label}, step {step.name} ({step.result_path}):\n    "
                             + "\n    ".join(differences))
        else:
            reusable.add(index)
    if conflicts:
        raise ValueError("results in this --output_dir were recorded with other arguments than this comparison "
                         "gives their steps, so they cannot be reused; nothing was run:\n  " + "\n  ".join(conflicts)
                         + "\nUse another --output_dir, or remove each run folder named above to redo its run "
                         "(only the named JSON file to redo just that evaluation).")
    return reusable


def recorded_arguments(step: Step) -> dict | None:
    """The arguments ``step``'s recorded result was made with; None (named when a file is there) to redo it."""
    if not step.result_path.is_file():
        return None
    try:
        result = load_json(step.result_path)
    except (ValueError, OSError) as error:
        print(f"{step.run.label}: {error} Its {step.name} step is redone.", flush=True)
        return None
    if isinstance(result.get("arguments"), dict):
        return result["arguments"]
    if step.name == "train" and (step.run.folder / "train" / "args.json").is_file():
        with contextlib.suppress(ValueError, OSError):  # an older compare.py: the trainer's own record
            return load_json(step.run.folder / "train" / "args.json")
    print(f"{step.run.label}: {step.result_path} does not record the arguments it ran with (an older compare.py): "
          f"its {step.name} step is redone.", flush=True)
    return None


def argument_differences(step: Step, recorded: dict) -> list[str]:
    """``--name: before X, now Y`` for each checked argument that both ``recorded`` and ``step`` hold and that
    differs (an argument a record lacks is older than it: skipped, as the trainer's resume check does)."""
    if step.name == "train":
        recorded, names = patch_wise_dino.with_former_defaults(recorded), TRAIN_CHECKED_ARGS
    else:
        names = [name for name in step.arguments if name not in EVAL_FREE_ARGS]
    return [f"--{name}: before {recorded[name]!r}, now {step.arguments[name]!r}" for name in names
            if name in recorded and name in step.arguments and recorded[name] != step.arguments[name]]


def execute_step(step: Step, reused: bool, counter: str, steps_done: utils.Progress) -> None:
    """Run a step with its output in ``<run>/<name>.log``, unless its recorded result is ``reused``; ``steps_done``
    counts the comparison's steps, and its elapsed time and ETA end the step's line."""
    run, name = step.run, step.name
    if reused:
        steps_done.skip()
        print(f"{counter} {run.label}: {name} done before, reused ({step.result_path})", flush=True)
        return
    run.folder.mkdir(parents=True, exist_ok=True)
    log_path = run.folder / f"{name}.log"
    print(f"{counter} {run.label}: {name} ...", end="", flush=True)
    start = time.time()
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = step.action()
    except BaseException:
        print(f" failed; its output is in {log_path}:\n" + tail(log_path), flush=True)
        raise
    seconds = time.time() - start
    record = {"seconds": seconds, **result, "command": step.command, "arguments": step.arguments}
    utils.write_text_atomic(json.dumps(record, indent=2) + "\n", step.result_path)
    steps_done.advance()
    print(f" {utils.format_duration(seconds)}; all steps: {steps_done.times()}", flush=True)


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def execution_order(runs: list[Run]) -> list[Run]:
    """The random floor first (quick), then seed by seed so that an early stop still compares methods."""
    return sorted(runs, key=lambda run: (-1 if run.seed is None else run.seed))


# ----------------------------------------------------------------------------------------------
# Results: per-run metrics, mean and spread per method, paired differences to DINO.
# ----------------------------------------------------------------------------------------------
def run_metrics(run: Run, metrics: tuple[Metric, ...]) -> dict[str, float | None]:
    """``{metric key: value}`` of a finished run, read from its evaluation files."""
    results = {evaluation: load_json(run.folder / f"{evaluation}.json")
               for evaluation in {metric.evaluation for metric in metrics}}
    return {metric.key: metric.read(results[metric.evaluation]) for metric in metrics}


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (None for one value) and count of the values that exist."""
    present = [value for value in values if value is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": float(np.mean(present)), "std": std, "n": len(present)}


def summarise(runs: list[Run], metrics: tuple[Metric, ...]) -> dict:
    """``{"runs": {method: {seed: metrics}}, "methods": {method: {metric: spread}}, "vs_dino": ..., "vs_start": ...,
    "grids": {method: patch grid}, "floors": {grid: {floor: {metric: value}}}, "metrics": [key, ...]}``."""
    per_run: dict[str, dict[str, dict]] = {}
    for run in runs:
        per_run.setdefault(run.method, {})[str(run.seed)] = run_metrics(run, metrics)
    methods = {method: {metric.key: spread([values[metric.key] for values in seeds.values()]) for metric in metrics}
               for method, seeds in per_run.items()}
    grids = method_grids(runs) if any(metric.floor_read for metric in metrics) else {}
    return {"runs": per_run, "methods": methods, "vs_dino": paired_differences(per_run, metrics, grids, "dino"),
            "vs_start": paired_differences(per_run, metrics, grids, START) if START in per_run else {},
            "grids": grids, "floors": position_floors(runs, metrics, grids), "metrics": [m.key for m in metrics]}


def correspondence_grid(result: dict) -> str:
    """The patch grids a correspondence result was measured on, ``"4x4"`` or ``"4x4, query 2x2"``: its chance
    level and position-only floors depend on them (at 2x2 every guess is within one cell)."""
    settings = result["settings"]
    reference = settings["size"] // settings["patch_size"]
    query = (settings.get("query_size") or settings["size"]) // settings["patch_size"]
    return f"{reference}x{reference}" + ("" if query == reference else f", query {query}x{query}")


def method_grids(runs: list[Run]) -> dict[str, str]:
    """``{method: grid}`` of the correspondence measurements (a method's seeds share their model's grid)."""
    grids = {}
    for run in runs:
        if run.method not in grids:
            grids[run.method] = correspondence_grid(load_json(run.folder / "correspondence.json"))
    return grids


def position_floors(runs: list[Run], metrics: tuple[Metric, ...], grids: dict[str, str]) -> dict[str, dict]:
    """``{grid: {floor: {metric key: value}}}`` of chance and the position-only predictors, read from the first
    run measured on each grid (they see no pixels, so every run on that grid has the same); a floor that files
    written before it existed lack is left out."""
    floored = [metric for metric in metrics if metric.floor_read is not None]
    floors = {}
    for run in runs:
        grid = grids.get(run.method)
        if grid is None or grid in floors:
            continue
        result = load_json(run.folder / "correspondence.json")
        values = {floor: {metric.key: metric.floor_read(result, floor) for metric in floored} for floor in FLOOR_ROWS}
        floors[grid] = {floor: row for floor, row in values.items() if any(v is not None for v in row.values())}
    return floors


def paired_differences(per_run: dict[str, dict[str, dict]], metrics: tuple[Metric, ...],
                       grids: dict[str, str], baseline: str) -> dict:
    """Each trained method minus ``baseline`` (``dino``, or ``start`` the teachers continued runs began from),
    seed by seed: the differences' spread and how many favour the method.

    "Favour" means higher, except for the correspondence error, where lower is better. Correspondence
    measured on another patch grid than the baseline's is not paired (``{"other_grid": True}``): chance differs.
    """
    differences = {}
    for method, seeds in per_run.items():
        if method in (baseline, RANDOM, START):
            continue
        differences[method] = {}
        for metric in metrics:
            if metric.floor_read is not None and grids.get(method) != grids.get(baseline):
                differences[method][metric.key] = {"mean": None, "std": None, "n": 0, "other_grid": True}
                continue
            reference = per_run[baseline]
            pairs = [(values[metric.key], reference[seed][metric.key]) for seed, values in seeds.items()
                     if seed in reference and None not in (values[metric.key], reference[seed][metric.key])]
            deltas = [ours - theirs for ours, theirs in pairs]
            sign = -1 if metric.key == "corr_error" else 1
            differences[method][metric.key] = {**spread(deltas), "better": sum(sign * d > 0 for d in deltas)}
    return differences


def format_cell(entry: dict, signed: bool = False) -> str:
    if entry.get("other_grid"):
        return "other grid"
    if entry["mean"] is None:
        return "-"
    text = f"{entry['mean']:+.2f}" if signed else f"{entry['mean']:.2f}"
    if entry["std"] is not None:
        text += f" ± {entry['std']:.2f}"
    if "better" in entry:
        text += f" ({entry['better']}/{entry['n']})"
    return text


def markdown_table(summary: dict) -> str:
    """Mean ± std per method and metric, random weights first, then each method's paired gain over DINO.

    Chance and the position-only floors follow the first row measured on their patch grid; when the methods'
    grids differ, rows name their grid and a note below says which correspondence differences are left out.
    """
    metrics = summary_metrics(summary)
    grids, floors = summary.get("grids", {}), dict(summary.get("floors", {}))  # a copy: shown grids are popped
    several = len(set(grids.values())) > 1
    header = "| method | " + " | ".join(metric.title for metric in metrics) + " |"
    lines = [header, "| --- |" + " ---: |" * len(metrics)]
    for method, values in summary["methods"].items():
        grid = grids.get(method)
        count = values[metrics[0].key]["n"]
        details = ([] if method == RANDOM else [f"{count} seed{'s' * (count != 1)}"]) + (
            [f"grid {grid}"] if several else [])
        name = ("random weights" if method == RANDOM else method) + (f" ({', '.join(details)})" if details else "")
        lines.append(f"| {name} | " + " | ".join(format_cell(values[m.key]) for m in metrics) + " |")
        if grid in floors:
            lines += floor_lines(floors.pop(grid), metrics, grid if several else None)
    for baseline in ("dino", START):
        for method, values in summary.get(f"vs_{baseline}", {}).items():
            lines.append(f"| {method} − {baseline}, paired | "
                         + " | ".join(format_cell(values[m.key], signed=True) for m in metrics) + " |")
    start = ["", f"start: the teachers every method continued from ({summary['start']}), evaluated alike."] \
        if summary.get("start") else []
    return "\n".join(lines + other_grid_note(summary) + start)


def floor_lines(floors: dict[str, dict], metrics: tuple[Metric, ...], grid: str | None) -> list[str]:
    """Table rows of chance and the position-only floors (of ``grid``, when named): their correspondence
    values, "-" in the other columns."""
    cell = lambda value: "-" if value is None else f"{value:.2f}"
    suffix = f", grid {grid}" if grid else ""
    return [f"| {FLOOR_ROWS[floor]}{suffix} | " + " | ".join(cell(values.get(m.key)) for m in metrics) + " |"
            for floor, values in floors.items()]


def other_grid_note(summary: dict) -> list[str]:
    """A note under the table naming the methods whose correspondence is not paired with dino's (other grid)."""
    grids = summary.get("grids", {})
    others = [f"{method} ({grids[method]})" for method in summary["vs_dino"] if grids.get(method) != grids.get("dino")]
    if not others:
        return []
    return ["", f"Correspondence of {', '.join(others)} is measured on another patch grid than dino's "
                f"({grids.get('dino')}): chance and the position-only floors change with the grid (each grid has its "
                "own rows above), so those paired differences are left out (\"other grid\"); compare each method "
                "with its own grid's rows."]


def summary_metrics(summary: dict) -> tuple[Metric, ...]:
    """The columns of ``summary``, in the table's order."""
    return tuple(metric for metric in METRICS if metric.key in summary["metrics"])


def plot(summary: dict, path: Path) -> None:
    """Bars (mean, std error bars, one dot per seed) per method, one panel per metric; random weights dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method for method in summary["methods"] if method != RANDOM]
    metrics = summary_metrics(summary)
    columns = 3
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        means = [summary["methods"][m][metric.key]["mean"] or 0.0 for m in methods]
        stds = [summary["methods"][m][metric.key]["std"] or 0.0 for m in methods]
        axis.bar(range(len(methods)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        drawn = [mean + sign * std for mean, std in zip(means, stds) for sign in (-1, 1)]
        for position, method in enumerate(methods):
            values = [v[metric.key] for v in summary["runs"][method].values() if v[metric.key] is not None]
            axis.plot([position] * len(values), values, "k.", markersize=5)
            drawn += values
        floor = summary["methods"][RANDOM][metric.key]["mean"]
        if floor is not None:
            axis.axhline(floor, color="grey", linestyle="--", linewidth=1, label="random weights")
            drawn.append(floor)
        drawn += draw_position_floors(axis, summary, methods, metric.key)
        axis.set_ylim(*value_range(drawn))  # not from zero, so that gaps of a point or two show
        axis.set_xticks(range(len(methods)), methods, rotation=20)
        axis.set_title(metric.title, fontsize=10)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    for axis in axes.flat[:len(metrics)]:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_position_floors(axis, summary: dict, methods: list[str], key: str) -> list[float]:
    """The flip-aware position-only floor of metric ``key``: one dotted line, or a short one over each bar
    when the methods were measured on different patch grids; returns the values drawn."""
    grids = summary.get("grids", {})
    values = [summary.get("floors", {}).get(grids.get(m), {}).get("flip_aware", {}).get(key) for m in methods]
    present = [(position, value) for position, value in enumerate(values) if value is not None]
    style = {"color": "#d95f02", "linestyle": ":", "linewidth": 1.2}
    if len({grids.get(m) for m in methods}) == 1:
        if present:
            axis.axhline(present[0][1], label="position only (flip-aware)", **style)
    else:
        for index, (position, value) in enumerate(present):
            axis.hlines(value, position - 0.4, position + 0.4,
                        label="position only (flip-aware), per grid" if index == 0 else None, **style)
    return [value for _, value in present]


def value_range(values: list[float]) -> tuple[float, float]:
    """Y limits spanning ``values`` (bar tops, error-bar ends, seed dots, the floor) with a margin."""
    low, high = min(values), max(values)
    margin = 0.15 * (high - low) or 1.0
    return low - margin, high + margin


def step_seconds(steps: list[Step]) -> dict[str, float]:
    """Compute time of the recorded steps, per method and in all (resumed steps count their last try)."""
    totals: dict[str, float] = {}
    for step in steps:
        seconds = load_json(step.result_path).get("seconds", 0.0)
        totals[step.run.method] = totals.get(step.run.method, 0.0) + seconds
    totals["all"] = sum(totals.values())
    return totals


def start_description(args: argparse.Namespace) -> str | None:
    """Where the ``start`` teachers come from (``"dino of compare_output"``), None without them."""
    settings = load_json(args.trained_in / "compare_args.json") if args.trained_in else vars(args)
    if settings.get("init_from") is None:
        return None
    return f"{settings['init_method']} of {settings['init_from']}"


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    """Train and evaluate whatever is not done yet, then write and print the table; returns the summary."""
    validate_args(args)
    runs = plan_runs(args)
    steps = [step for run in execution_order(runs) for step in steps_of(args, run)]  # checks every step's args
    # One comparison per folder, from the checks to the table; a new folder goes again if the checks stop it.
    with utils.created_output_dir(args.output_dir), utils.folder_lock(args.output_dir):
        check_settings(args)
        reused = reusable_steps(steps)
        record_settings(args)
        steps_done = utils.Progress(len(steps), "Comparison:")
        for index, step in enumerate(steps):
            execute_step(step, index in reused, f"[{index + 1:>{len(str(len(steps)))}}/{len(steps)}]", steps_done)
        summary = summarise(runs, metrics_of(evaluations_of(args)))
        summary["seconds"] = step_seconds(steps)
        summary["eval_split"] = args.eval_split
        summary["start"] = start_description(args)
        table = markdown_table(summary)
        utils.write_text_atomic(table + "\n", args.output_dir / "comparison.md")
        utils.write_text_atomic(json.dumps(summary, indent=2) + "\n", args.output_dir / "comparison.json")
        plot(summary, args.output_dir / "comparison.png")
    print(f"\nOn {args.data_path / args.eval_split}, {args.seeds} seed(s) per method (mean ± std over seeds; "
          f"paired rows: mean ± std of the per-seed differences, (seeds where the method is better)):\n")
    print(table)
    print(f"\nCompute time of all steps: {utils.format_duration(summary['seconds']['all'])}. Wrote "
          f"{args.output_dir / 'comparison.md'}, comparison.json and comparison.png", flush=True)
    return summary


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
