"""Stop a script run by a Python without the project's packages with one line saying what to do.

Every script imports this module first, before any third-party package: run by a Python that lacks them (the
system ``python3`` instead of ``.venv/bin/python``), it prints how to set up and use the virtual environment and
exits with status 1, instead of a ``ModuleNotFoundError`` traceback. Only the standard library is used, and the
check looks packages up without importing them (``importlib.util.find_spec``), so it costs nothing measurable.
"""
from __future__ import annotations

import importlib.util
import os
import sys

# The import names of requirements.txt's packages that the scripts import at start-up (faiss and tensorboard are
# imported, and named when missing, only for --use_faiss and --tensorboard; pytest only by the tests).
REQUIRED_MODULES = ("torch", "torchvision", "timm", "numpy", "PIL", "matplotlib")
PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def missing_modules() -> list[str]:
    """The ``REQUIRED_MODULES`` this Python cannot import."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def missing_requirements_message(missing: list[str], script: str) -> str:
    """The one line that names the missing packages and how to run ``script`` with the virtual environment."""
    return (f"error: {sys.executable} lacks the project's packages ({', '.join(missing)}): set up its virtual "
            f"environment once with make setup (in {PROJECT_DIR}), then run source .venv/bin/activate or "
            f".venv/bin/python {script} ...")


def require_packages() -> None:
    """Exit with status 1 and ``missing_requirements_message`` when a required package is missing."""
    missing = missing_modules()
    if missing:
        sys.exit(missing_requirements_message(missing, os.path.basename(sys.argv[0]) or "script.py"))


require_packages()
