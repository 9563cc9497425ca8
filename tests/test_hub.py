"""torch.hub entry points (hubconf.py), loaded from the checkout as ``torch.hub.load(dir, ..., source="local")``."""
import dataclasses
import importlib.util

import pytest
import torch

import utils
import vision_transformer as vits
from conftest import ROOT, dino_backbone_state
from test_eval import write_dino_checkpoint

TINY = dict(embed_dim=32, depth=1, num_heads=2, img_size=16)


def hub_load(entry: str, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


def test_hub_entries_and_dependencies():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == {"vit_tiny", "vit_small", "vit_base", "dino_head",
                       "dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"}
    assert hubconf.dependencies == ["torch", "timm"]


def test_hub_backbone_loads_a_weights_file(tmp_path, capsys):
    state = dino_backbone_state(patch_size=4, grid=4)
    torch.save(state, tmp_path / "backbone.pth")
    model = hub_load("vit_small", patch_size=4, pretrained_weights=str(tmp_path / "backbone.pth"), **TINY)
    assert isinstance(model, vits.VisionTransformer) and model.patch_size == 4
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert f"Loaded {len(state)} backbone tensors from {tmp_path / 'backbone.pth'}" in capsys.readouterr().out
    write_dino_checkpoint(tmp_path / "checkpoint.pth")  # DINO's training checkpoint of a tiny ViT (patch 4)
    student = hub_load("vit_tiny", patch_size=4, pretrained_weights=str(tmp_path / "checkpoint.pth"),
                       checkpoint_key="student", **TINY)
    saved = utils.load_checkpoint(tmp_path / "checkpoint.pth")["student"]
    assert all(torch.equal(value, saved[f"module.backbone.{name}"]) for name, value in student.state_dict().items())


def test_hub_backbone_without_weights_is_random(capsys):
    first, second = hub_load("vit_base", **TINY), hub_load("vit_base", **TINY)
    assert first.patch_size == 16 and first.pos_embed.shape == (1, 2, 32)  # patch 16 at 16 px: one patch
    assert not torch.equal(first.blocks[0].attn.qkv.weight, second.blocks[0].attn.qkv.weight)
    assert "Loaded" not in capsys.readouterr().out


def test_hub_resolves_a_name_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    entry = vits.REFERENCE_WEIGHTS["dino_vits8"]
    unreachable = (tmp_path / "unreachable" / entry.file_name).as_uri()  # any download attempt would fail
    monkeypatch.setitem(vits.REFERENCE_WEIGHTS, "dino_vits8", dataclasses.replace(entry, url=unreachable))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    cached.parent.mkdir(parents=True)
    state = dino_backbone_state(patch_size=8, grid=2)  # a ViT-S/8 at tiny sizes (16 px native)
    torch.save(state, cached)
    for model in (hub_load("vit_small", pretrained_weights="dino_vits8", **TINY), hub_load("dino_vits8", **TINY)):
        assert model.patch_size == 8  # from the name
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert hub_load("dino_vits8", pretrained=False, **TINY).patch_size == 8  # random weights, nothing read
    with pytest.raises(ValueError, match="--arch vit_base contradicts --pretrained_weights dino_vits8"):
        hub_load("vit_base", pretrained_weights="dino_vits8", **TINY)
    cached.unlink()
    with pytest.raises(RuntimeError, match=f"cannot download reference weights dino_vits8 from {unreachable}"):
        hub_load("dino_vits8", **TINY)


def test_hub_dino_head():
    head = hub_load("dino_head", in_dim=32, out_dim=64, hidden_dim=64, bottleneck_dim=32)
    assert isinstance(head, vits.DINOHead) and head(torch.randn(2, 32)).shape == (2, 64)
