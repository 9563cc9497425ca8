"""DINO's files in every evaluation, and reference weights by name (fetched only when named, never from the
network in these tests: the URL table points at file:// URLs and torch's hub cache at a temporary TORCH_HOME)."""
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_copy_detection
import eval_correspondence
import eval_image_retrieval
import eval_knn
import eval_linear
import vision_transformer as vits
from conftest import TINY_BACKBONE_ARGS, dino_backbone_state, write_images
from test_eval import write_dino_checkpoint

SCRIPTS = {"eval_knn": eval_knn, "eval_linear": eval_linear, "eval_image_retrieval": eval_image_retrieval,
           "eval_copy_detection": eval_copy_detection, "eval_correspondence": eval_correspondence}
TINY_SIZES = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2"]  # the backbone, but no arch or patch


def random_jpegs(folder: Path, names: list[str], seed: int) -> None:
    """Random 40 x 32 JPEG images ``folder/<name>.jpg``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny data for each evaluation: class folders (k-NN, linear, correspondence), a revisitop-layout set
    ``tiny`` (two queries, four database images) and a Copydays layout (three originals, their strong edits)."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "classes" / "train", classes=("a", "b"), per_class=4, seed=1)
    write_images(root / "classes" / "val", classes=("a", "b"), per_class=2, seed=2)
    random_jpegs(root / "tiny" / "jpg", ["q0", "q1", "d0", "d1", "d2", "d3"], seed=3)
    ground_truth = {"imlist": ["d0", "d1", "d2", "d3"], "qimlist": ["q0", "q1"],
                    "gnd": [{"bbx": [0, 0, 40, 32], "easy": [0], "hard": [1], "junk": []},
                            {"bbx": [2, 2, 38, 30], "easy": [2], "hard": [], "junk": [3]}]}
    with open(root / "tiny" / "gnd_tiny.pkl", "wb") as handle:
        pickle.dump(ground_truth, handle)
    random_jpegs(root / "copydays" / "original", ["100000", "101000", "102000"], seed=4)
    random_jpegs(root / "copydays" / "strong", ["100001", "101001", "102001"], seed=5)
    return root


def script_argv(script: str, data: Path, output: Path) -> list[str]:
    """The arguments that run ``script`` on the tiny data on the CPU (without backbone and weights)."""
    crop = ["--resize_size", "16", "--crop_size", "16", "--num_workers", "0"]
    return {"eval_knn": ["--data_path", str(data / "classes"), "--nb_knn", "2", *crop],
            "eval_linear": ["--data_path", str(data / "classes"), "--epochs", "1", "--batch_size_per_gpu", "4",
                            "--n_last_blocks", "1",
                            "--output_dir", str(output / "linear"), *crop],
            "eval_image_retrieval": ["--data_path", str(data), "--dataset", "tiny", "--imsize", "32",
                                     "--num_workers", "0", "--output_dir", str(output)],
            "eval_copy_detection": ["--data_path", str(data / "copydays"), "--imsize", "32", "--num_workers", "0",
                                    "--batch_size_per_gpu", "4", "--output_dir", str(output)],
            "eval_correspondence": ["--data_path", str(data / "classes" / "train"), "--size", "16",
                                    "--num_images", "4", "--batch_size", "4"]}[script] + ["--device", "cpu"]


def parse(script: str, data: Path, output: Path, *extra: str):
    return SCRIPTS[script].get_args_parser().parse_args(script_argv(script, data, output) + list(extra))


@pytest.fixture(scope="module")
def dino_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model's weights in DINO's two layouts: a training checkpoint as main_dino.py writes it (args
    Namespace, ``module.`` student, fp16 scaler) and a released backbone-only state dict."""
    folder = tmp_path_factory.mktemp("dino")
    write_dino_checkpoint(folder / "checkpoint.pth")
    torch.save(dino_backbone_state(), folder / "dino_deitsmall16_pretrain.pth")
    return {"training_checkpoint": folder / "checkpoint.pth",
            "released_backbone": folder / "dino_deitsmall16_pretrain.pth"}


@pytest.mark.parametrize("layout", ["training_checkpoint", "released_backbone"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_evaluation_reads_dinos_files(script, layout, data, dino_files, tmp_path, capsys):
    weights = dino_files[layout]
    result = SCRIPTS[script].main(parse(script, data, tmp_path, *TINY_BACKBONE_ARGS,
                                        "--pretrained_weights", str(weights)))
    printed = capsys.readouterr().out
    assert f"Loaded {len(dino_backbone_state())} backbone tensors from {weights}" in printed
    assert result and "FINAL " in printed


# ----------------------------------------------------------------------------------------------
# Reference weights by name.
# ----------------------------------------------------------------------------------------------
def test_reference_names_are_dinos_releases():
    expected = {"dino_vits16": ("dino_deitsmall16_pretrain", "vit_small", 16),
                "dino_vits8": ("dino_deitsmall8_pretrain", "vit_small", 8),
                "dino_vitb16": ("dino_vitbase16_pretrain", "vit_base", 16),
                "dino_vitb8": ("dino_vitbase8_pretrain", "vit_base", 8),
                "dino_vits16_gldv2": ("dino_vitsmall16_googlelandmark_pretrain", "vit_small", 16)}
    assert {name: (entry.file_name[:-4], entry.arch, entry.patch_size)
            for name, entry in vits.REFERENCE_WEIGHTS.items()} == expected
    for entry in vits.REFERENCE_WEIGHTS.values():
        assert entry.url == f"https://dl.fbaipublicfiles.com/dino/{entry.file_name[:-4]}/{entry.file_name}"
    help_text = eval_knn.get_args_parser().format_help()
    assert all(name in help_text for name in expected)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache under a temporary TORCH_HOME; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def serve(monkeypatch, name: str, source: Path) -> str:
    """Point reference weights ``name`` at the file:// URL of ``source`` (which need not exist)."""
    url = source.resolve().as_uri()
    monkeypatch.setitem(vits.REFERENCE_WEIGHTS, name, dataclasses.replace(vits.REFERENCE_WEIGHTS[name], url=url))
    return url


def test_a_name_is_downloaded_once_into_the_hub_cache_then_read_from_there(data, hub_cache, tmp_path,
                                                                           monkeypatch, capsys):
    served = tmp_path / "server" / "dino_deitsmall16_pretrain.pth"
    served.parent.mkdir()
    state = dino_backbone_state(patch_size=16, grid=2)  # a ViT-S/16 at tiny sizes (32 px native)
    torch.save(state, served)
    url = serve(monkeypatch, "dino_vits16", served)
    argv = TINY_SIZES + ["--pretrained_weights", "dino_vits16", "--resize_size", "32", "--crop_size", "32"]
    args = parse("eval_knn", data, tmp_path, *argv)
    eval_knn.main(args)
    cached = hub_cache / "dino_deitsmall16_pretrain.pth"
    printed = capsys.readouterr().out
    assert f"Downloading dino_vits16 (DINO ViT-S/16 on ImageNet) from {url} to {cached}" in printed
    assert f"Loaded {len(state)} backbone tensors from {cached}" in printed
    assert (args.arch, args.patch_size) == ("vit_small", 16) and sorted(hub_cache.iterdir()) == [cached]
    served.unlink()  # from now on only the cache has it
    model = vits.build_frozen_backbone(parse("eval_knn", data, tmp_path, *argv), img_size=32)
    assert "Downloading" not in capsys.readouterr().out
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_name_sets_arch_and_patch_size_and_a_contradiction_names_both(script, data, tmp_path, monkeypatch):
    monkeypatch.setattr(vits.torch.hub, "download_url_to_file", pytest.fail)  # checking arguments fetches nothing
    args = parse(script, data, tmp_path, *TINY_SIZES, "--pretrained_weights", "dino_vits8")
    assert (args.arch, args.patch_size) == (None, None)  # "not given"
    SCRIPTS[script].validate_args(args)
    assert (args.arch, args.patch_size) == ("vit_small", 8)
    unnamed = parse(script, data, tmp_path, *TINY_SIZES, "--random_init")
    SCRIPTS[script].validate_args(unnamed)
    assert (unnamed.arch, unnamed.patch_size) == ("vit_small", 16)
    with pytest.raises(ValueError, match="--patch_size 16 contradicts --pretrained_weights dino_vits8, a vit_small "
                                         "with patch size 8"):
        SCRIPTS[script].validate_args(parse(script, data, tmp_path, "--patch_size", "16",
                                            "--pretrained_weights", "dino_vits8"))
    with pytest.raises(ValueError, match="--arch vit_small contradicts --pretrained_weights dino_vitb8"):
        SCRIPTS[script].validate_args(parse(script, data, tmp_path, "--arch", "vit_small",
                                            "--pretrained_weights", "dino_vitb8"))


def test_without_network_the_error_gives_the_url_and_where_to_put_the_file(hub_cache, tmp_path, monkeypatch):
    url = serve(monkeypatch, "dino_vitb8", tmp_path / "unreachable" / "dino_vitbase8_pretrain.pth")
    model = vits.vit_base(patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16)
    with pytest.raises(RuntimeError, match=f"cannot download reference weights dino_vitb8 from {url} .*place it at "
                                           f"{hub_cache / 'dino_vitbase8_pretrain.pth'}$"):
        vits.load_pretrained_weights(model, "dino_vitb8")
    assert list(hub_cache.iterdir()) == []  # no partial file is left to be mistaken for the weights


def test_nothing_is_fetched_without_a_known_name(tmp_path, monkeypatch):
    monkeypatch.setattr(vits.torch.hub, "download_url_to_file", pytest.fail)
    model = vits.vit_tiny(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pth does not exist; check the path"):
        vits.load_pretrained_weights(model, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown reference weights 'dino_vitl16'; the known names are dino_vits16, "
                                         "dino_vits8, dino_vitb16, dino_vitb8, dino_vits16_gldv2"):
        vits.load_pretrained_weights(model, "dino_vitl16")
    with pytest.raises(FileNotFoundError, match="weights file dino_vits16.pth does not exist"):
        vits.load_pretrained_weights(model, "dino_vits16.pth")  # a file name, not a name
    monkeypatch.chdir(tmp_path)
    torch.save(dino_backbone_state(), tmp_path / "dino_mine")  # a file that looks like a name is read as a file
    vits.load_pretrained_weights(model, "dino_mine")
    assert torch.equal(model.norm.weight, dino_backbone_state()["norm.weight"])
