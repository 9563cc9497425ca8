"""Attention maps: exact sums, DINO's thresholded masks, DINO's PNGs to the grey level, the script end to end."""
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from matplotlib import colormaps
from PIL import Image
from torchvision import transforms

import vision_transformer as vits
import visualize_attention as va
from conftest import ROOT, TINY_BACKBONE_ARGS, dino_backbone_state

# The tiny backbone without --patch_size, which the script then takes from the weights (or DINO's 8).
TINY_SIZES = ["--arch", "vit_tiny", "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--device", "cpu"]


def parse(*extra: str):
    return va.get_args_parser().parse_args(TINY_BACKBONE_ARGS + ["--device", "cpu", *extra])


def final_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("FINAL "))[len("FINAL "):])


def write_image(path: Path, width: int = 40, height: int = 32, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_weights(path: Path, patch_size: int, grid: int) -> tuple[Path, dict]:
    """DINO-layout backbone weights (depth 1, width 32) with ``patch_size`` patches and a ``grid`` x ``grid``
    position embedding, saved to ``path``; returns the path and the state."""
    state = dino_backbone_state(patch_size=patch_size, embed_dim=32, depth=1, grid=grid)
    torch.save(state, path)
    return path, state


def dino_pngs(image: Path, state: dict, patch_size: int, image_size: list[int], folder: Path) -> np.ndarray:
    """What DINO's visualize_attention.py writes for ``image``, step by step with the same library calls: its
    transform and crop, the CLS row, nearest upsampling by the patch, ``save_image(make_grid(normalize=True,
    scale_each=True))`` for img.png and ``plt.imsave`` (its default colour map, viridis) for each head.
    Returns the upsampled maps ``[heads, H, W]``."""
    model = vits.vit_tiny(patch_size=patch_size, img_size=16, embed_dim=32, depth=1, num_heads=2).eval()
    model.load_state_dict(state)
    transform = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with open(image, "rb") as handle:
        img = transform(Image.open(handle).convert("RGB"))
    height, width = img.shape[1] - img.shape[1] % patch_size, img.shape[2] - img.shape[2] % patch_size
    img = img[:, :height, :width].unsqueeze(0)
    with torch.no_grad():
        attentions = model.get_last_selfattention(img)
    heads = attentions.shape[1]
    attentions = attentions[0, :, 0, 1:].reshape(heads, height // patch_size, width // patch_size)
    attentions = F.interpolate(attentions.unsqueeze(0), scale_factor=patch_size, mode="nearest")[0].numpy()
    folder.mkdir()
    torchvision.utils.save_image(torchvision.utils.make_grid(img, normalize=True, scale_each=True), folder / "img.png")
    for head in range(heads):
        plt.imsave(fname=folder / f"attn-head{head}.png", arr=attentions[head], format="png")
    return attentions


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def tiny_model() -> vits.VisionTransformer:
    torch.manual_seed(0)
    return vits.vit_tiny(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()


# ----------------------------------------------------------------------------------------------
# Maps and masks.
# ----------------------------------------------------------------------------------------------
def test_maps_are_the_cls_row_and_sum_to_one_less_the_cls_share():
    model, image = tiny_model(), torch.randn(1, 3, 16, 24)
    maps, cls_share = va.attention_maps(model, image)
    assert maps.shape == (2, 4, 6) and cls_share.shape == (2,)
    attention = model.get_last_selfattention(image)[0, :, 0]  # [heads, 1 + N]
    torch.testing.assert_close(maps.reshape(2, -1), attention[:, 1:])  # patches row-major, as the tokens
    torch.testing.assert_close(maps.sum(dim=(1, 2)), 1 - cls_share, rtol=0, atol=1e-6)
    assert (cls_share > 0).all() and (cls_share < 1).all()


def test_masks_by_hand():
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.2, 0.8, 0.4, 0.6]])  # the second row is the first, doubled
    assert va.threshold_masks(attention, 0.65).tolist() == [[False, True, False, True]] * 2  # 0.7 of the mass
    assert va.threshold_masks(attention, 0.75).tolist() == [[False, True, True, True]] * 2  # 0.9
    assert va.threshold_masks(attention, 0.35).tolist() == [[False, True, False, False]] * 2  # 0.4
    assert va.threshold_masks(attention, 1.0).all()


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 0.99])
def test_masks_keep_the_mass_with_the_fewest_patches(threshold):
    attention = torch.rand(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3
    masks = va.threshold_masks(attention, threshold)
    shares = attention / attention.sum(dim=1, keepdim=True)
    for head in range(5):
        kept, dropped = shares[head][masks[head]], shares[head][~masks[head]]
        assert kept.sum() >= threshold  # enough mass
        assert kept.sum() - kept.min() < threshold  # no patch could go
        assert dropped.numel() == 0 or kept.min() >= dropped.max()  # the largest ones: no smaller set does it


# ----------------------------------------------------------------------------------------------
# The script.
# ----------------------------------------------------------------------------------------------
def test_script_on_one_image_writes_maps_masks_and_figure(tmp_path, capsys):
    image, output = write_image(tmp_path / "photo.png"), tmp_path / "out"
    result = va.main(parse("--random_init", "--image_path", str(image), "--image_size", "16", "--threshold", "0.6",
                           "--output_dir", str(output), "--output_json", str(tmp_path / "attention.json")))
    assert final_line(capsys.readouterr().out) == json.loads((tmp_path / "attention.json").read_text()) == result
    entry, = result["images"]
    # A 40x32 image with its shorter side resized to 16 is 20x16: a 4x5 grid of 4 px patches.
    assert entry["size"] == [16, 20] and entry["grid"] == [4, 5] and entry["heads"] == 2
    assert all(mass >= 0.6 for mass in entry["mass_kept"]) and all(0 < n <= 20 for n in entry["patches_kept"])
    names = {"img.png", "attention.png"} | {f"{kind}-head{h}.png" for kind in ("attn", "mask") for h in range(2)}
    assert {path.name for path in output.iterdir()} == names
    for head in range(2):
        with Image.open(output / f"attn-head{head}.png") as heat, Image.open(output / f"mask-head{head}.png") as mask:
            assert heat.size == mask.size == (20, 16) and heat.mode == "RGBA"  # plt.imsave's mode, as DINO's
            pixels = np.array(mask)
            assert set(np.unique(pixels)) <= {0, 255}
            assert (pixels == 255).sum() == entry["patches_kept"][head] * 16  # whole 4x4 patches
    with Image.open(output / "attention.png") as figure:
        assert figure.width > 300


def test_script_on_a_folder_with_trained_weights(trained_checkpoint, tmp_path):
    folder = tmp_path / "images"
    for name, seed in (("a.png", 0), ("b.jpg", 1), ("b.png", 2)):
        write_image(folder / name, seed=seed)
    result = va.main(parse("--pretrained_weights", str(trained_checkpoint), "--image_path", str(folder),
                           "--image_size", "16", "24", "--threshold", "0.3", "--output_dir", str(tmp_path / "out")))
    assert [Path(entry["output_dir"]).name for entry in result["images"]] == ["a.png", "b.jpg", "b.png"]
    assert all(entry["size"] == [16, 24] and entry["grid"] == [4, 6] for entry in result["images"])
    assert all((Path(entry["output_dir"]) / "attention.png").is_file() for entry in result["images"])
    assert result["weights"] == str(trained_checkpoint) and result["threshold"] == 0.3


def test_sides_are_cropped_to_whole_patches(tmp_path):
    pixels, model_input = va.prepare_image(write_image(tmp_path / "odd.png", 45, 30), [30], 4)
    # shorter side 30 -> 30x45, cropped at the bottom and right to 28x44
    assert pixels.shape == (3, 28, 44) and model_input.shape == (1, 3, 28, 44)


@pytest.mark.parametrize("extra, error, message", [
    (["--threshold", "0"], ValueError, r"--threshold must lie in \(0, 1\]"),
    (["--threshold", "1.5"], ValueError, r"--threshold must lie in \(0, 1\]"),
    (["--image_size", "2"], ValueError, r"--image_size 2 is smaller than one patch \(--patch_size 4\)"),
    (["--image_size", "16", "16", "16"], ValueError, r"--image_size takes one number"),
])
def test_bad_arguments_are_named(extra, error, message, tmp_path):
    image = write_image(tmp_path / "photo.png")
    with pytest.raises(error, match=message):
        va.main(parse("--random_init", "--image_path", str(image), *extra))


def test_missing_and_empty_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--image_path .*nothing.png does not exist"):
        va.main(parse("--random_init", "--image_path", str(tmp_path / "nothing.png")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images in .*empty"):
        va.main(parse("--random_init", "--image_path", str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"give either --pretrained_weights PATH or --random_init"):
        va.main(parse("--image_path", str(write_image(tmp_path / "photo.png"))))


def test_every_image_of_a_folder_gets_its_own_output_folder(tmp_path):
    folder, output = tmp_path / "images", tmp_path / "out"
    for name, seed in (("a.jpg", 0), ("a.png", 1), ("a.png.png", 2)):  # stems a, a and a.png
        write_image(folder / name, seed=seed)
    result = va.main(parse("--random_init", "--image_path", str(folder), "--image_size", "16", "--output_dir",
                           str(output)))
    written = [Path(entry["output_dir"]) for entry in result["images"]]
    assert [path.name for path in written] == ["a.jpg", "a.png", "a.png.png"]
    assert sorted(path.name for path in output.iterdir()) == ["a.jpg", "a.png", "a.png.png"]
    for entry in result["images"]:  # each folder holds its own image, none overwritten
        _, model_input = va.prepare_image(entry["image"], [16], 4)
        own = tmp_path / f"{Path(entry['image']).name}.png"
        torchvision.utils.save_image(model_input, own, normalize=True, scale_each=True)  # as img.png is written
        assert np.array_equal(png_pixels(Path(entry["output_dir"]) / "img.png"), png_pixels(own))
        assert Path(entry["image"]).name == Path(entry["output_dir"]).name


def test_an_input_image_where_an_output_folder_would_go_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png")
    with pytest.raises(NotADirectoryError, match=r"the output folder of a.png .*images/a.png cannot be a folder: "
                                                 r".*images/a.png is a file"):
        va.main(parse("--random_init", "--image_path", str(folder), "--image_size", "16", "--output_dir",
                      str(folder)))
    assert [path.name for path in folder.iterdir()] == ["a.png"]


# ----------------------------------------------------------------------------------------------
# DINO's defaults and files.
# ----------------------------------------------------------------------------------------------
def test_img_and_attention_pngs_equal_dinos_to_the_grey_level(tmp_path):
    image = write_image(tmp_path / "photo.png")
    weights, state = write_weights(tmp_path / "weights.pth", patch_size=4, grid=4)
    va.main(va.get_args_parser().parse_args(TINY_SIZES + ["--pretrained_weights", str(weights), "--patch_size", "4",
                                                          "--image_path", str(image), "--image_size", "16",
                                                          "--output_dir", str(tmp_path / "ours")]))
    attentions = dino_pngs(image, state, 4, [16], tmp_path / "dino")
    for name in ("img.png", "attn-head0.png", "attn-head1.png"):
        ours, dinos = png_pixels(tmp_path / "ours" / name), png_pixels(tmp_path / "dino" / name)
        assert ours.shape == dinos.shape and np.array_equal(ours, dinos), name
    # The case tells truncation (matplotlib's bytes) from rounding: rounded colours differ from DINO's somewhere.
    scaled = (attentions[0] - attentions[0].min()) / (attentions[0].max() - attentions[0].min())
    rounded = (colormaps["viridis"](scaled)[..., :3] * 255).round()
    assert (rounded != png_pixels(tmp_path / "dino" / "attn-head0.png")[..., :3]).any()


@pytest.mark.parametrize("weights, image_size, patch_size", [
    ("patch 8", "16", 8),  # DINO's ViT-S/8 case: a patch-16 default could not load these
    ("DINO's main_dino.py checkpoint", "32", 16),  # a real DINO training checkpoint (vit_tiny, patch 16)
    ("random", "16", 8),  # DINO's default
])
def test_patch_size_is_the_weights_or_dinos_8(weights, image_size, patch_size, tmp_path):
    if weights == "patch 8":
        source = ["--pretrained_weights", str(write_weights(tmp_path / "w.pth", patch_size=8, grid=2)[0])]
    elif weights == "random":
        source = ["--random_init"]
    else:
        source = ["--pretrained_weights", str(ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth")]
    result = va.main(va.get_args_parser().parse_args(TINY_SIZES + source + [
        "--image_path", str(write_image(tmp_path / "photo.png", 32, 32)), "--image_size", image_size,
        "--output_dir", str(tmp_path / "out")]))
    side = int(image_size) // patch_size
    assert result["patch_size"] == patch_size and result["images"][0]["grid"] == [side, side]


def test_a_patch_size_the_weights_contradict_is_named_before_any_output(tmp_path):
    weights, _ = write_weights(tmp_path / "w.pth", patch_size=8, grid=2)
    with pytest.raises(ValueError, match=r"--patch_size 4 contradicts the weights' 8 \(.*w.pth, from its patch "
                                         r"embedding patch_embed.proj.weight\): drop --patch_size or give 8"):
        va.main(va.get_args_parser().parse_args(TINY_SIZES + [
            "--pretrained_weights", str(weights), "--patch_size", "4", "--image_path",
            str(write_image(tmp_path / "photo.png")), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_without_threshold_no_masks_are_drawn(tmp_path):
    image_args = ["--random_init", "--image_path", str(write_image(tmp_path / "photo.png")), "--image_size", "16"]
    off = va.main(parse(*image_args, "--output_dir", str(tmp_path / "off")))
    on = va.main(parse(*image_args, "--threshold", "0.6", "--output_dir", str(tmp_path / "on")))
    assert off["threshold"] is None and on["threshold"] == 0.6
    assert "patches_kept" not in off["images"][0] and "mass_kept" not in off["images"][0]
    assert on["images"][0]["cls_to_cls"] == off["images"][0]["cls_to_cls"]
    assert sorted(path.name for path in (tmp_path / "off").iterdir()) == [
        "attention.png", "attn-head0.png", "attn-head1.png", "img.png"]
    one_row, two_rows = (png_pixels(tmp_path / run / "attention.png") for run in ("off", "on"))
    assert one_row.shape[1] == two_rows.shape[1] and one_row.shape[0] < two_rows.shape[0]  # no mask row
