"""export_backbone.py: our weights out to timm and to DINO's released layout, and back into our evaluations."""
import argparse
import subprocess
import sys

import pytest
import timm
import torch

import export_backbone
import vision_transformer as vits
from conftest import TINY_BACKBONE_ARGS

# A second size, unlike the trained checkpoint's (width 32, depth 1, patch 4, 16 px): width 48, depth 2, patch 8,
# 32 px, so that both the depth and the native size are read from the weights rather than assumed.
WIDE_ARGS = ["--arch", "vit_small", "--patch_size", "8", "--embed_dim", "48", "--depth", "2", "--num_heads", "3"]


def export(weights, output, fmt, backbone_args=TINY_BACKBONE_ARGS, extra=()) -> dict:
    args = export_backbone.get_args_parser().parse_args(
        [*backbone_args, "--pretrained_weights", str(weights), "--format", fmt, "--output", str(output), *extra])
    return export_backbone.main(args)


def our_backbone(weights, img_size, backbone_args=TINY_BACKBONE_ARGS, key="teacher") -> vits.VisionTransformer:
    """Our evaluation backbone for ``weights``, loaded the way every evaluation loads it."""
    args = argparse.ArgumentParser()
    vits.add_backbone_args(args)
    model = vits.build_backbone(args.parse_args(backbone_args), img_size=img_size)
    vits.load_pretrained_weights(model, str(weights), key)
    return model.eval()


def dino_expected_keys(depth: int) -> set:
    """The parameter names of DINO's ``vision_transformer.VisionTransformer`` (``num_classes=0``), written out
    from its definition: PatchEmbed.proj, cls_token, pos_embed, Block(norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2) per block, the final norm; the head is an Identity."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for index in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{index}.{layer}.weight", f"blocks.{index}.{layer}.bias"}
    return keys


def dino_style_load(model: torch.nn.Module, path, checkpoint_key="teacher"):
    """What DINO's ``utils.load_pretrained_weights`` does with a file: read it, take ``checkpoint_key`` if
    present, drop every ``module.`` and ``backbone.``, load non-strictly; returns the load's message."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint_key in state_dict:
        state_dict = state_dict[checkpoint_key]
    state_dict = {key.replace("module.", "").replace("backbone.", ""): value for key, value in state_dict.items()}
    return model.load_state_dict(state_dict, strict=False)


def write_official_dino_checkpoint(path) -> dict:
    """A checkpoint as DINO's main_dino.py writes it (width 48, depth 2, patch 8, 32 px): the student under DDP
    (``module.backbone.``, ``module.head.``), the teacher without, the optimizer, the loss center, the epoch and
    the arguments as an ``argparse.Namespace``; the two backbones differ. Returns both backbones' weights."""
    backbones = {}
    content = {}
    for seed, (key, prefix) in enumerate((("student", "module."), ("teacher", ""))):
        torch.manual_seed(seed)
        backbone = vits.vit_small(patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=3)
        head = vits.DINOHead(48, 64, hidden_dim=64, bottleneck_dim=32)
        backbones[key] = backbone.state_dict()
        content[key] = {**{f"{prefix}backbone.{name}": value for name, value in backbone.state_dict().items()},
                        **{f"{prefix}head.{name}": value for name, value in head.state_dict().items()}}
    content.update(optimizer={"state": {}, "param_groups": []}, epoch=100, dino_loss={"center": torch.zeros(1, 64)},
                   args=argparse.Namespace(arch="vit_small", patch_size=8, out_dim=64))
    torch.save(content, path)
    return backbones


# ----------------------------------------------------------------------------------------------
# timm.
# ----------------------------------------------------------------------------------------------
def test_timm_export_of_a_training_checkpoint_gives_our_features(trained_checkpoint, tmp_path, capsys):
    summary = export(trained_checkpoint, tmp_path / "timm.pth", "timm")
    call = ('timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=4, img_size=16, embed_dim=32, '
            'depth=1, num_heads=2, num_classes=0)')
    assert call in capsys.readouterr().out and summary["img_size"] == 16
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=4, img_size=16, embed_dim=32,
                                  depth=1, num_heads=2, num_classes=0).eval()
    reference.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    ours = our_backbone(trained_checkpoint, img_size=16)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, theirs = ours(images), reference.forward_features(images)[:, 0]
        assert torch.equal(reference(images), theirs)  # timm's own forward is that CLS feature too
    difference = (theirs - expected).abs().max().item()
    print(f"timm vs ours: max abs {difference:.2e}, max rel {difference / expected.abs().max().item():.2e}")
    assert difference <= 1e-5


def test_timm_export_reads_the_native_size_from_the_weights(tmp_path, capsys):
    backbones = write_official_dino_checkpoint(tmp_path / "dino.pth")
    summary = export(tmp_path / "dino.pth", tmp_path / "timm.pth", "timm", WIDE_ARGS)
    assert summary["img_size"] == 32 and summary["max_abs_difference"] <= 1e-5
    assert 'vit_small_patch16_224", pretrained=False, patch_size=8, img_size=32, embed_dim=48' in capsys.readouterr().out
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=8, img_size=32, embed_dim=48,
                                  depth=2, num_heads=3, num_classes=0)
    reference.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    assert all(torch.equal(reference.state_dict()[name], value) for name, value in backbones["teacher"].items())


# ----------------------------------------------------------------------------------------------
# DINO.
# ----------------------------------------------------------------------------------------------
def test_dino_export_loads_back_into_our_evaluations(trained_checkpoint, tmp_path):
    export(trained_checkpoint, tmp_path / "dino.pth", "dino")
    teacher = torch.load(trained_checkpoint, weights_only=True)["teacher"]
    model = our_backbone(tmp_path / "dino.pth", img_size=16)
    assert set(model.state_dict()) == {name[len("backbone."):] for name in teacher if name.startswith("backbone.")}
    assert all(torch.equal(value, teacher[f"backbone.{name}"]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("source", ["trained", "official"])
def test_dino_export_holds_exactly_dinos_parameter_names(trained_checkpoint, tmp_path, source):
    if source == "trained":
        weights, backbone_args, depth, build = trained_checkpoint, TINY_BACKBONE_ARGS, 1, dict(
            patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)
    else:
        weights, backbone_args, depth = tmp_path / "official.pth", WIDE_ARGS, 2
        write_official_dino_checkpoint(weights)
        build = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=32)
    export(weights, tmp_path / "dino.pth", "dino", backbone_args)
    released = torch.load(tmp_path / "dino.pth", weights_only=True)
    # Like DINO's released dino_*_pretrain.pth: one flat dict of float32 tensors, no head, nothing else.
    assert set(released) == dino_expected_keys(depth)
    assert all(torch.is_tensor(value) and value.dtype == torch.float32 for value in released.values())
    model = vits.vit_tiny(**build)  # our ViT carries DINO's parameter names
    assert set(model.state_dict()) == dino_expected_keys(depth)
    message = dino_style_load(model, tmp_path / "dino.pth")
    assert message.missing_keys == [] and message.unexpected_keys == []
    assert all(torch.equal(model.state_dict()[name], value) for name, value in released.items())


def test_official_dino_checkpoint_exports_teacher_or_student(tmp_path, capsys):
    backbones = write_official_dino_checkpoint(tmp_path / "official.pth")
    for key in ("teacher", "student"):
        export(tmp_path / "official.pth", tmp_path / f"{key}.pth", "dino", WIDE_ARGS, ["--checkpoint_key", key])
        released = torch.load(tmp_path / f"{key}.pth", weights_only=True)
        assert set(released) == set(backbones[key])
        assert all(torch.equal(released[name], value) for name, value in backbones[key].items()), key
    assert not torch.equal(backbones["teacher"]["pos_embed"], backbones["student"]["pos_embed"])
    printed = capsys.readouterr().out
    assert "vits.VisionTransformer(embed_dim=48, depth=2, num_heads=3" in printed and "img_size=[32]" in printed


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------
def test_mismatched_weights_are_named_and_nothing_is_written(trained_checkpoint, tmp_path):
    output = tmp_path / "out.pth"
    patch8 = TINY_BACKBONE_ARGS[:2] + ["--patch_size", "8"] + TINY_BACKBONE_ARGS[4:]
    with pytest.raises(ValueError, match=r"--patch_size 8 contradicts the weights' 4 \(.*checkpoint.pth, from its "
                                         r"patch embedding patch_embed.proj.weight\): drop --patch_size or give 4"):
        export(trained_checkpoint, output, "timm", patch8)
    with pytest.raises(ValueError, match=r"--arch vit_small contradicts the weights' vit_tiny \(.*checkpoint.pth, "
                                         r"from its stored args\): drop --arch or give vit_tiny"):
        export(trained_checkpoint, output, "dino", ["--arch", "vit_small", "--patch_size", "4"])
    wider = TINY_BACKBONE_ARGS[:5] + ["48"] + TINY_BACKBONE_ARGS[6:]
    with pytest.raises(ValueError, match=r"--embed_dim 48 contradicts the weights' 32"):
        export(trained_checkpoint, output, "dino", wider)
    with pytest.raises(RuntimeError, match=r"shape mismatches \(1\): patch_embed\.proj\.weight: "
                                           r"file \(32, 3, 4, 4\) vs model \(32, 3, 8, 8\)"):
        our_backbone(trained_checkpoint, img_size=16, backbone_args=patch8)
    assert list(tmp_path.iterdir()) == []


def test_missing_files_and_folders_are_named(trained_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*missing\.pth does not exist"):
        export(tmp_path / "missing.pth", tmp_path / "out.pth", "dino")
    with pytest.raises(FileNotFoundError, match=r"the folder of --output .*no_such_folder/out\.pth does not exist"):
        export(trained_checkpoint, tmp_path / "no_such_folder" / "out.pth", "timm")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export(trained_checkpoint, tmp_path, "timm")
    with pytest.raises(ValueError, match="--pretrained_weights PATH"):
        export("", tmp_path / "out.pth", "timm")
    with pytest.raises(ValueError, match="is the file being exported"):
        export(trained_checkpoint, trained_checkpoint, "dino")
    assert list(tmp_path.iterdir()) == []


def test_command_line_error_is_one_message(trained_checkpoint, tmp_path, root):
    result = subprocess.run([sys.executable, "export_backbone.py", *TINY_BACKBONE_ARGS, "--pretrained_weights",
                             str(trained_checkpoint), "--format", "dino", "--output", str(tmp_path / "a" / "b.pth")],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the folder of --output") and "mkdir -p" in result.stderr


def test_dino_key_check_refuses_names_dino_would_skip():
    state = {name: torch.zeros(1) for name in dino_expected_keys(2)}
    export_backbone.check_dino_keys(state, depth=2)
    with pytest.raises(RuntimeError, match=r"not in DINO's model reg_token; missing blocks\.1\.norm1\.bias"):
        export_backbone.check_dino_keys({**{k: v for k, v in state.items() if k != "blocks.1.norm1.bias"},
                                         "reg_token": torch.zeros(1)}, depth=2)


def test_printed_dino_call_for_a_standard_model_is_dinos_own():
    args = argparse.Namespace(arch="vit_base", patch_size=8, embed_dim=None, depth=None, num_heads=None,
                              output="pwself_vitb8.pth")
    usage = export_backbone.dino_usage(args, img_size=224)
    assert "model = vits.vit_base(patch_size=8, num_classes=0)\n" in usage
    assert "python eval_knn.py --arch vit_base --patch_size 8 --pretrained_weights pwself_vitb8.pth" in usage
    assert "img_size=[112]" in export_backbone.dino_usage(args, img_size=112)


def test_parity_check_names_a_folder_that_is_not_a_dino_clone(tmp_path):
    import check_dino_parity

    args = check_dino_parity.get_args_parser().parse_args(["--dino_path", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="clone of github.com/facebookresearch/dino"):
        check_dino_parity.main(args)
