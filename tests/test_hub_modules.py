"""Our hub entries and another repository's with the same module names (DINO's ``vision_transformer`` and
``utils``) loaded in one process, in either order: each builds its own classes, and ours leave nothing in
``sys.modules`` under those names. Each order runs in a fresh Python process (real ``torch.hub.load``)."""
import subprocess
import sys

import pytest

from conftest import ROOT

# A minimal hub repository laid out like DINO's: its hubconf imports its modules the plain way.
OTHER_REPOSITORY = {
    "utils.py": "ORIGIN = 'other utils'\n",
    "vision_transformer.py": ("import utils\n\n\n"
                              "class VisionTransformer:\n"
                              "    def __init__(self, patch_size=16):\n"
                              "        self.patch_size, self.origin = patch_size, utils.ORIGIN\n"),
    "hubconf.py": ("import vision_transformer as vits\n\n"
                   "dependencies = []\n\n\n"
                   "def dino_vits16(pretrained=True, **kwargs):\n"
                   "    return vits.VisionTransformer(patch_size=16)\n"),
}

# Run in the child: load both repositories in the given order, then report where each model's class and the
# utils module it uses come from, and which of our files sys.modules holds under the plain names.
CHILD = """
import sys
from pathlib import Path

import torch

ours, other, order = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
loads = {"ours": lambda: torch.hub.load(str(ours), "vit_tiny", source="local", embed_dim=32, depth=1, num_heads=2,
                                        img_size=16),
         "other": lambda: torch.hub.load(str(other), "dino_vits16", source="local")}


def origin(file):
    folder = Path(file).resolve().parent
    return {ours: "ours", other: "other"}.get(folder, str(folder))


for name in order + order:  # each entry twice: a second load must not change the answer
    model = loads[name]()
    init = type(model).__init__  # its file and globals are the class's own, whatever sys.modules says
    utils_file = init.__globals__["utils"].__file__
    print(name, "built by", origin(init.__code__.co_filename), "with utils of", origin(utils_file))
    if name == "ours":
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 32)
for plain in ("vision_transformer", "utils"):
    print("sys.modules", plain, origin(sys.modules[plain].__file__) if plain in sys.modules else "absent")
"""


@pytest.fixture
def other_repository(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    for name, text in OTHER_REPOSITORY.items():
        (folder / name).write_text(text)
    return folder


def load_in_order(other_repository, order: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(other_repository), order],
                            capture_output=True, text=True, timeout=300, cwd=other_repository.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


OURS, OTHER = "ours built by ours with utils of ours", "other built by other with utils of other"


def test_ours_first_leaves_the_plain_names_to_the_other_repository(other_repository):
    assert load_in_order(other_repository, "ours,other") == [
        OURS, OTHER, OURS, OTHER, "sys.modules vision_transformer other", "sys.modules utils other"]


def test_other_first_does_not_hand_its_modules_to_ours(other_repository):
    assert load_in_order(other_repository, "other,ours") == [
        OTHER, OURS, OTHER, OURS, "sys.modules vision_transformer other", "sys.modules utils other"]


def test_ours_alone_leaves_no_module_under_the_plain_names(other_repository):
    assert load_in_order(other_repository, "ours") == [
        OURS, OURS, "sys.modules vision_transformer absent", "sys.modules utils absent"]
