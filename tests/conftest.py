"""Shared test set-up: offline, few threads, the project root importable, small fixtures."""
import contextlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

torch.set_num_threads(2)


PHOTOS = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))
TINY_ARGS = ["--arch", "vit_tiny", "--patch_size", "4", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
             "--out_dim", "64", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
             "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "2",
             "--batch_size_per_gpu", "4", "--warmup_epochs", "1", "--num_workers", "0", "--print_freq", "5",
             "--device", "cpu"]
TINY_BACKBONE_ARGS = TINY_ARGS[:10]


@contextlib.contextmanager
def small_tmpfs(folder: Path, options: str):
    """A real tmpfs mounted on ``folder`` (created) with mount ``options`` (``size=16k``, ``ro,size=64k``) for
    the block; the test is skipped where mounting is not allowed."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def write_images(folder: Path, classes=("a", "b"), per_class=6, size=(40, 32), seed=0) -> Path:
    """Random RGB images in ``folder/<class>/<i>.png``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{index}.png")
    return folder


def write_mini_fashion_mnist(source: Path, train: int, test: int, seed: int = 0) -> Path:
    """Fashion-MNIST's four IDX files (gzip) in ``source``, with random 28x28 images and labels 0..9 in turn."""
    import gzip

    rng = np.random.default_rng(seed)
    source.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (count, 28, 28))),
                            ("labels-idx1", np.arange(count) % 10)):
            magic = 2051 if array.ndim == 3 else 2049
            with gzip.open(source / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())
    return source


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by one epoch of the training script on a tiny model (16 px, patch 4)."""
    import patch_wise_dino

    root = tmp_path_factory.mktemp("trained")
    data = write_images(root / "data", classes=("x", "y"), per_class=6, seed=7)
    patch_wise_dino.main(patch_wise_dino.get_args_parser().parse_args(
        TINY_ARGS + ["--data_path", str(data), "--output_dir", str(root / "run"), "--epochs", "1"]))
    return root / "run" / "checkpoint.pth"


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


def dino_backbone_state(patch_size: int = 4, embed_dim: int = 32, depth: int = 1, grid: int = 4, seed: int = 0) -> dict:
    """Random backbone weights laid out as DINO's released files (e.g. ``dino_deitsmall16_pretrain.pth``): a
    plain state dict of cls_token, pos_embed (``1 + grid^2`` tokens), patch_embed.proj.*, blocks.{i}.*, norm.*,
    and no head. Written from DINO's names and shapes, not from our model, so that a loader test is a real check."""
    dim, hidden = embed_dim, 4 * embed_dim
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch_size, patch_size), "patch_embed.proj.bias": (dim,)}
    block_shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                    "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                    "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim),
                    "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    for block in range(depth):
        shapes.update({f"blocks.{block}.{name}": shape for name, shape in block_shapes.items()})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.fixture
def weights_not_to_load(tmp_path_factory, monkeypatch) -> Path:
    """Backbone-only weights of the tiny model (``TINY_BACKBONE_ARGS``): an evaluation may read their architecture
    while checking its arguments, but loading them fails the test (for tests that outputs are checked before any
    model is built)."""
    import vision_transformer as vits

    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    torch.save(dino_backbone_state(), path)
    monkeypatch.setattr(vits, "load_pretrained_weights",
                        lambda *args: pytest.fail("the weights were loaded before the outputs were checked"))
    return path


# ----------------------------------------------------------------------------------------------
# Retrieval and copy-detection sets in the real layouts, made from natural photos.
# ----------------------------------------------------------------------------------------------
def jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def centre_crop(image, fraction):
    width, height = image.size
    w, h = int(width * fraction), int(height * fraction)
    return image.crop(((width - w) // 2, (height - h) // 2, (width + w) // 2, (height + h) // 2))


def strong_edit(image):
    edited = ImageEnhance.Color(ImageOps.mirror(centre_crop(image, 0.8))).enhance(0.3)
    return ImageEnhance.Contrast(edited.rotate(8, resample=Image.BICUBIC)).enhance(1.5)


@pytest.fixture(scope="module")
def revisitop_set(tmp_path_factory):
    """A revisitop-layout set: each photo is a query; its easy and hard copies sit in the database."""
    root = tmp_path_factory.mktemp("revisitop")
    folder = root / "tinyox" / "jpg"
    folder.mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for photo_path in PHOTOS:
        photo = Image.open(photo_path).convert("RGB")
        name = photo_path.stem
        copies = {"easy": jpeg(centre_crop(photo, 0.9), 60), "hard": strong_edit(photo),
                  "junk": centre_crop(photo, 0.3)}
        entry = {"bbx": [4, 4, photo.width - 4, photo.height - 4]}
        for kind, copy in copies.items():
            copy.save(folder / f"{name}_{kind}.jpg")
            entry[kind] = [len(imlist)]
            imlist.append(f"{name}_{kind}")
        photo.save(folder / f"{name}_query.jpg")
        qimlist.append(f"{name}_query")
        gnd.append(entry)
    with open(root / "tinyox" / "gnd_tinyox.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle)
    return root


@pytest.fixture(scope="module")
def copydays_set(tmp_path_factory):
    """Copydays layout from the photos: originals, strong edits, JPEG qualities, crops; plus extra folders."""
    root = tmp_path_factory.mktemp("copydays")
    blocks = {"strong": strong_edit, "jpegqual/10": lambda im: jpeg(im, 10), "jpegqual/50": lambda im: jpeg(im, 50),
              "crops/50": lambda im: centre_crop(im, 0.7), "crops/20": lambda im: centre_crop(im, 0.9)}
    for folder in ["original", *blocks, "distractors", "whitening"]:
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, photo_path in enumerate(PHOTOS):
        photo = Image.open(photo_path).convert("RGB")
        name = f"{100 + index}000"
        photo.save(root / "original" / f"{name}.jpg")
        for block, edit in blocks.items():
            edit(photo).save(root / block / (f"{name[:4]}01.jpg" if block == "strong" else f"{name}.jpg"))
        ImageOps.flip(photo).save(root / "whitening" / f"{name}.jpg")
        noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        noise.save(root / "distractors" / f"noise{index}.jpg")
        ImageOps.invert(photo).save(root / "whitening" / f"inverted{index}.jpg")
    return root
