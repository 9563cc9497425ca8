"""Every script's command line as a shell user meets it: ``--help`` names the script and shows every default,
and a Python without the project's packages gets one line saying how to set up and use the virtual environment."""
import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

import utils
from conftest import ROOT

SCRIPTS = sorted(path.stem for path in ROOT.glob("*.py") if "def get_args_parser" in path.read_text())


def option_entries(help_text: str) -> dict[str, str]:
    """Each option's entry in ``--help`` (its flags, then its help), keyed by its first flag, whitespace collapsed."""
    entries, current = {}, None
    for line in help_text.splitlines():
        flag = re.match(r"  (-[-\w]+)", line)
        if flag:
            current = flag.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_every_script_is_covered():
    assert len(SCRIPTS) >= 17 and {"eval_knn", "patch_wise_dino", "compare", "prepare_data", "bench"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_script_and_shows_every_default(script):
    parser = importlib.import_module(script).get_args_parser()
    help_text = parser.format_help()
    assert help_text.startswith(f"usage: {script}.py "), help_text.splitlines()[0]
    entries = option_entries(help_text)
    for action in parser._actions:
        shown = utils.shown_default(action)
        if shown is None or not action.option_strings:
            continue
        entry = entries[action.option_strings[0]]
        assert re.search(r"\bdefault", entry, re.IGNORECASE) and " ".join(shown.split()) in entry, entry


def test_help_appends_a_default_only_where_the_text_does_not_state_it():
    parser = utils.script_parser("tool.py", "A tool.\n\nKept as written:\n  two lines.")
    parser.add_argument("--size", default=16, type=int, help="Side in pixels.")
    parser.add_argument("--arch", default="vit_small", help="Backbone: vit_small (default) or vit_tiny.")
    parser.add_argument("--scale", default=[0.4, 1.0], nargs=2, type=float, help="Crop scale.")
    parser.add_argument("--fp16", default=False, type=utils.bool_flag, help="Half precision (true/false).")
    parser.add_argument("--output_json", default="", help="Also write the results here.")
    parser.add_argument("--lr", default=None, type=float, help="Learning rate. Default: 5e-4 x batch / 256.")
    parser.add_argument("--verbose", action="store_true", help="Print more.")
    entries = option_entries(parser.format_help())
    assert parser.format_help().startswith("usage: tool.py ") and "Kept as written:\n  two lines." in parser.format_help()
    assert entries["--size"].endswith("Side in pixels. (default: 16)")
    assert entries["--arch"].endswith("Backbone: vit_small (default) or vit_tiny.")
    assert entries["--scale"].endswith("Crop scale. (default: 0.4 1.0)")
    assert entries["--fp16"].endswith("Half precision (true/false). (default: false)")
    assert entries["--output_json"].endswith("Also write the results here. (default: none)")
    assert entries["--lr"].endswith("Default: 5e-4 x batch / 256.") and entries["--verbose"].endswith("Print more.")


# ----------------------------------------------------------------------------------------------
# A Python without the requirements.
# ----------------------------------------------------------------------------------------------
def python_without_torch() -> str:
    """An interpreter on this machine that cannot import torch (the system's python3), or the test is skipped."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and subprocess.run([candidate, "-c", "import torch"], capture_output=True,
                                                        env={"PATH": "/usr/bin:/bin"}).returncode:
            return candidate
    pytest.skip("every python3 here has torch")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_without_the_requirements_is_told_to_use_the_virtual_environment(script):
    python = python_without_torch()
    result = subprocess.run([python, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {python} lacks the project's packages (torch")
    assert (f"set up its virtual environment once with make setup (in {ROOT}), then run source .venv/bin/activate "
            f"or .venv/bin/python {script}.py ...") in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_check_comes_before_any_other_package(script):
    """Only the standard library is imported before ``requirements_check`` (else that import fails first)."""
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    imported = [alias.name if isinstance(node, ast.Import) else node.module
                for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else node.names[:1])]
    position = imported.index("requirements_check")
    assert all(name.split(".")[0] in sys.stdlib_module_names | {"__future__"} for name in imported[:position])
