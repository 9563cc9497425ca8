"""The demo's report: k-NN accuracy of the trained model next to random init, and training curves.

    python demo_report.py --run_dir demo_output/train --trained demo_output/knn_trained.json \\
        --random demo_output/knn_random.json --output demo_output/training_curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import requirements_check  # noqa: F401  (first: names the packages below if missing)
import utils

CURVES = ("loss", "loss_cls", "loss_patch")


def get_args_parser() -> argparse.ArgumentParser:
    parser = utils.script_parser(__file__, "PW-Self demo report.")
    parser.add_argument("--run_dir", required=True, type=Path, help="Training output folder (holds log.txt).")
    parser.add_argument("--trained", required=True, type=Path, help="eval_knn.py --output_json of the trained model.")
    parser.add_argument("--random", required=True, type=Path, help="eval_knn.py --output_json of --random_init.")
    parser.add_argument("--output", required=True, type=Path, help="Where to write the training-curve plot (PNG).")
    return parser


def read_log(path: Path) -> list[dict]:
    """One dict per epoch from a training ``log.txt``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run patch_wise_dino.py with --output_dir {path.parent} first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparison_table(trained: dict, random: dict) -> str:
    """k-NN top-1 / top-5 per k, trained next to random init and the gain, as aligned text."""
    lines = [f"{'k':>5}  {'trained top-1':>13}  {'random top-1':>12}  {'gain':>6}  "
             f"{'trained top-5':>13}  {'random top-5':>12}  {'gain':>6}"]
    for k, result in trained["results"].items():
        baseline = random["results"][k]
        gain1, gain5 = result["top1"] - baseline["top1"], result["top5"] - baseline["top5"]
        lines.append(f"{k:>5}  {result['top1']:>13.2f}  {baseline['top1']:>12.2f}  {gain1:>+6.2f}  "
                     f"{result['top5']:>13.2f}  {baseline['top5']:>12.2f}  {gain5:>+6.2f}")
    return "\n".join(lines)


def plot_curves(log: list[dict], output: Path) -> None:
    """Loss, CLS loss and patch loss per epoch (whichever the log holds) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [entry["epoch"] for entry in log]
    for name in CURVES:
        if all(name in entry for entry in log):
            axis.plot(epochs, [entry[name] for entry in log], marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("cross-entropy (nats)")
    axis.set_title("PW-Self training")
    axis.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(args: argparse.Namespace) -> str:
    log = read_log(args.run_dir / "log.txt")
    trained, random = (json.loads(path.read_text()) for path in (args.trained, args.random))
    table = comparison_table(trained, random)
    plot_curves(log, args.output)
    print(f"k-NN on the validation split ({len(log)} training epochs):\n{table}")
    print(f"Training curves: {args.output}")
    return table


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
