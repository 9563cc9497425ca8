"""torch.hub entry points (hubconf.py), loaded from the checkout as ``torch.hub.load(dir, ..., source="local")``."""
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import utils
import vision_transformer as vits
from conftest import ROOT, dino_backbone_state
from test_eval import write_dino_checkpoint

TINY = dict(embed_dim=32, depth=1, num_heads=2, img_size=16)
DINO_CHECKPOINT = ROOT / "tests" / "fixtures" / "dino_main_checkpoint_tiny.pth"


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


def cache_release(tmp_path, monkeypatch, name: str, patch_size: int) -> tuple[dict, Path, str]:
    """DINO's release ``name`` at tiny sizes (a 2x2 native grid), in the hub cache of a temporary TORCH_HOME,
    its URL unreachable (any download attempt would fail): ``(state, cached file, url)``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    entry = vits.REFERENCE_WEIGHTS[name]
    unreachable = (tmp_path / "unreachable" / entry.file_name).as_uri()
    monkeypatch.setitem(vits.REFERENCE_WEIGHTS, name, dataclasses.replace(entry, url=unreachable))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / entry.file_name
    cached.parent.mkdir(parents=True)
    state = dino_backbone_state(patch_size=patch_size, grid=2)
    torch.save(state, cached)
    return state, cached, unreachable


def test_hub_resolves_a_name_from_the_torch_home_cache(tmp_path, monkeypatch):
    state, cached, unreachable = cache_release(tmp_path, monkeypatch, "dino_vits8", 8)  # 16 px native
    for model in (hub_load("vit_small", pretrained_weights="dino_vits8", **TINY), hub_load("dino_vits8", **TINY)):
        assert model.patch_size == 8  # from the name
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert hub_load("dino_vits8", pretrained=False, **TINY).patch_size == 8  # random weights, nothing read
    with pytest.raises(ValueError, match="--arch vit_base contradicts --pretrained_weights dino_vits8"):
        hub_load("vit_base", pretrained_weights="dino_vits8", **TINY)
    cached.unlink()
    with pytest.raises(RuntimeError, match=f"cannot download reference weights dino_vits8 from {unreachable}"):
        hub_load("dino_vits8", **TINY)


BACKBONE_ENTRIES = [("vit_tiny", 4), ("vit_small", 8), ("vit_base", 16), ("dino_vits16", 16), ("dino_vits8", 8),
                    ("dino_vitb16", 16), ("dino_vitb8", 8)]


@pytest.mark.parametrize("entry, patch_size", BACKBONE_ENTRIES)
def test_hub_backbones_take_dino_arguments(tmp_path, entry, patch_size):
    sizes = dict(embed_dim=32, depth=2, num_heads=2, patch_size=patch_size)
    model = hub_load(entry, pretrained=False, img_size=[32], drop_path_rate=0.1, **sizes)  # DINO's list form
    assert model.patch_size == patch_size and model.pos_embed.shape == (1, 1 + (32 // patch_size) ** 2, 32)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1) and model.training
    assert hub_load(entry, pretrained=False, img_size=32, **sizes).pos_embed.shape == model.pos_embed.shape
    with pytest.raises(ValueError, match=r"img_size=\[32, 48\] is not one image side"):
        hub_load(entry, pretrained=False, img_size=[32, 48], **sizes)
    state = dino_backbone_state(patch_size=patch_size, depth=2, grid=32 // patch_size)
    torch.save(state, tmp_path / "backbone.pth")
    loaded = hub_load(entry, pretrained_weights=str(tmp_path / "backbone.pth"), img_size=[32], **sizes)
    assert all(torch.equal(value, state[name]) for name, value in loaded.state_dict().items())


@pytest.fixture
def released_vits16(tmp_path, monkeypatch):
    """DINO's ViT-S/16 release at tiny sizes (32 px native), in a temporary hub cache."""
    return cache_release(tmp_path, monkeypatch, "dino_vits16", 16)


def test_hub_pretrained_loads_dinos_release_for_the_arch_and_patch(released_vits16):
    state, cached, unreachable = released_vits16
    sizes = dict(embed_dim=32, depth=1, num_heads=2)
    for model in (hub_load("vit_small", pretrained=True, patch_size=16, **sizes),
                  hub_load("vit_small", pretrained=True, **sizes),  # patch 16 by default
                  hub_load("dino_vits16", **sizes), hub_load("dino_vits16", pretrained=True, patch_size=16, **sizes)):
        assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert not torch.equal(hub_load("vit_small", **sizes).pos_embed, state["pos_embed"])  # pretrained=False: random
    released = ("dino_vits16 = vit_small(patch_size=16), dino_vits8 = vit_small(patch_size=8), "
                "dino_vitb16 = vit_base(patch_size=16), dino_vitb8 = vit_base(patch_size=8)")
    with pytest.raises(ValueError, match=re.escape(f"DINO released no weights for vit_tiny with patch size 16 "
                                                   f"(pretrained=True); released: {released}")):
        hub_load("vit_tiny", pretrained=True, **sizes)
    with pytest.raises(ValueError, match="DINO released no weights for vit_small with patch size 4"):
        hub_load("vit_small", pretrained=True, patch_size=4, **sizes)
    with pytest.raises(ValueError, match=r"dino_vits16 has patch size 16, got patch_size=8; for patch 8 use "
                                         r"vit_small\(patch_size=8, ...\)"):
        hub_load("dino_vits16", patch_size=8, **sizes)
    cached.unlink()  # offline and not cached: the URL and the path to place the file at
    with pytest.raises(RuntimeError, match=rf"cannot download reference weights dino_vits16 from "
                                           rf"{re.escape(unreachable)} \(.*\); without network access, download that "
                                           rf"file elsewhere and place it at {re.escape(str(cached))}"):
        hub_load("vit_small", pretrained=True, **sizes)


def test_hub_model_drops_edge_pixels_as_dino(released_vits16):
    model = hub_load("dino_vits16", embed_dim=32, depth=1, num_heads=2).eval()
    frame = torch.randn(1, 3, 480, 854)
    with torch.no_grad():
        tokens = model.get_intermediate_layers(frame)[0]
        assert tokens.shape == (1, 1 + 30 * 53, 32)
        assert torch.equal(tokens, model.get_intermediate_layers(frame[..., :480, :848])[0])
        assert torch.equal(model(frame), model(frame[..., :480, :848]))


def test_hub_dino_head_takes_dinos_arguments():
    head = hub_load("dino_head", in_dim=32, out_dim=64, hidden_dim=64, bottleneck_dim=32)
    assert isinstance(head, vits.DINOHead) and head(torch.randn(2, 32)).shape == (2, 64)
    head = hub_load("dino_head", in_dim=32, out_dim=10, use_bn=True, norm_last_layer=False, nlayers=2,
                    hidden_dim=48, bottleneck_dim=16, pretrained=False)
    assert [type(layer) for layer in head.mlp] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.GELU,
                                                   torch.nn.Linear]
    assert head.mlp[0].weight.shape == (48, 32) and head.mlp[3].weight.shape == (16, 48)
    assert head.last_layer.weight_v.shape == (10, 16) and head.last_layer.weight_g.requires_grad
    with pytest.raises(ValueError, match="dino_head has no released weights"):
        hub_load("dino_head", pretrained=True)


def test_hub_dino_head_loads_the_head_of_dinos_checkpoint():
    checkpoint = utils.load_checkpoint(DINO_CHECKPOINT)  # written by DINO's main_dino.py: head 32 -> 64
    sizes = dict(in_dim=32, out_dim=64, hidden_dim=64, bottleneck_dim=32)
    for key, prefix in (("teacher", "head."), ("student", "module.head.")):
        head = hub_load("dino_head", pretrained_weights=str(DINO_CHECKPOINT), checkpoint_key=key, **sizes)
        assert head.state_dict().keys() == {name[len(prefix):] for name in checkpoint[key] if name.startswith(prefix)}
        assert all(torch.equal(value, checkpoint[key][prefix + name]) for name, value in head.state_dict().items())
    with pytest.raises(RuntimeError, match=r"do not fit this head \(check in_dim, out_dim, nlayers, hidden_dim and "
                                           r"bottleneck_dim\)"):
        hub_load("dino_head", pretrained_weights=str(DINO_CHECKPOINT), in_dim=32, out_dim=128)
