"""Shared test set-up: offline, few threads, the project root importable, small fixtures."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def root() -> Path:
    """The repository root (where the scripts and ``test.png`` live)."""
    return ROOT


def random_geometries(generator: torch.Generator, count: int, size: int, image_hw=(300, 400),
                      min_side: int = 4) -> torch.Tensor:
    """``[count, 6]`` random crop geometries (integer boxes inside an image, random flips)."""
    height, width = image_hw
    box_h = torch.randint(min_side, height + 1, (count,), generator=generator)
    box_w = torch.randint(min_side, width + 1, (count,), generator=generator)
    top = (torch.rand(count, generator=generator) * (height - box_h + 1)).floor()
    left = (torch.rand(count, generator=generator) * (width - box_w + 1)).floor()
    flipped = torch.randint(0, 2, (count,), generator=generator)
    sizes = torch.full((count,), size)
    return torch.stack([top, left, box_h, box_w, flipped, sizes], dim=1).to(torch.float64)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
