"""The timm-based ViT against a plain re-statement of DINO's ViT math, and the DINO head."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision_transformer as vits
from vision_transformer import DINOHead

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def dino_pos_encoding(pos_embed, patch_size, image_shape):
    """DINO's ``interpolate_pos_encoding`` restated, variable names included: DINO unpacks
    ``B, nc, w, h = x.shape``, so its ``w`` is the image height (rows) and its ``h`` the width."""
    _, _, w, h = image_shape
    num = pos_embed.shape[1] - 1
    w0, h0 = w // patch_size, h // patch_size
    if w0 * h0 == num and w == h:
        return pos_embed
    side = int(math.sqrt(num))
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / math.sqrt(num), (h0 + 0.1) / math.sqrt(num)),
                         mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)


class ReferenceDinoViT(nn.Module):
    """DINO's ViT written out by hand (explicit attention), with DINO's parameter names."""

    def __init__(self, patch_size=16, embed_dim=32, depth=2, num_heads=2, img_size=224):
        super().__init__()
        self.patch_size, self.num_heads = patch_size, num_heads
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(embed_dim, eps=1e-6), nn.LayerNorm(embed_dim, eps=1e-6)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(embed_dim, 3 * embed_dim), nn.Linear(embed_dim, embed_dim)
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(embed_dim, 4 * embed_dim), nn.Linear(4 * embed_dim, embed_dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for parameter in self.parameters():  # non-trivial norms and biases too
            nn.init.normal_(parameter, std=0.2)

    def attention(self, attn, x):
        batch, tokens, dim = x.shape
        q, k, v = attn.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (dim // self.num_heads) ** -0.5).softmax(-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim)), weights

    def forward_all(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + dino_pos_encoding(self.pos_embed, self.patch_size, images.shape)
        outputs, last_weights = [], None
        for block in self.blocks:
            attended, last_weights = self.attention(block.attn, block.norm1(x))
            x = x + attended
            x = x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
            outputs.append(self.norm(x))
        return outputs, last_weights


@pytest.fixture
def model_and_reference():
    torch.manual_seed(0)
    reference = ReferenceDinoViT(patch_size=16, **TINY)
    model = vits.vit_small(patch_size=16, **TINY).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model, reference


def test_dino_state_dict_loads_strictly_and_outputs_match_at_native_size(model_and_reference):
    model, reference = model_and_reference
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outputs, weights = reference.forward_all(images)
        torch.testing.assert_close(model.forward_features(images), outputs[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images), outputs[-1][:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.get_last_selfattention(images), weights, rtol=1e-5, atol=1e-6)
        intermediate = model.get_intermediate_layers(images, n=2)
    assert len(intermediate) == 2
    for ours, theirs in zip(intermediate, outputs[-2:]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def relative_max_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("height, width", [(32, 32), (96, 96), (480, 480), (64, 160), (160, 64), (320, 256),
                                           (112, 448), (480, 854), (50, 37), (230, 230), (224, 230), (239, 224)])
def test_every_size_gives_dino_outputs(model_and_reference, height, width):
    model, reference = model_and_reference
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        (*_, theirs), weights = reference.forward_all(images)
        ours = model.forward_features(images)
        attention = model.get_last_selfattention(images)
    assert ours.shape == (2, 1 + (height // 16) * (width // 16), 32)
    assert relative_max_error(ours[:, 0], theirs[:, 0]) < 1e-5
    assert relative_max_error(ours[:, 1:], theirs[:, 1:]) < 1e-5
    torch.testing.assert_close(attention, weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid_h, grid_w", [(2, 2), (6, 6), (20, 20), (1, 1), (20, 16), (16, 20), (7, 28),
                                            (28, 7), (3, 40)])
def test_position_embeddings_are_resampled_exactly_as_dino(grid_h, grid_w):
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16, embed_dim=32, depth=1, num_heads=2)  # native grid 14x14
    expected = dino_pos_encoding(model.pos_embed, 16, (1, 3, grid_h * 16, grid_w * 16))
    with torch.no_grad():
        assert torch.equal(model.resample_pos_embed(grid_h, grid_w), expected)
    assert model.resample_pos_embed(14, 14) is model.pos_embed  # the native grid is used as it is


@pytest.mark.parametrize("height, width", [(480, 854), (20, 33), (230, 230), (224, 230), (239, 224)])
def test_position_embeddings_of_sizes_not_multiples_of_the_patch_follow_dino(height, width):
    """DINO's rule on the uncropped size is ours on the cropped grid, except that DINO keeps the native
    embeddings only for square images: 224x230 is resampled (by its nudged scale) though its grid is native."""
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16, embed_dim=32, depth=1, num_heads=2)  # native grid 14x14
    expected = dino_pos_encoding(model.pos_embed, 16, (1, 3, height, width))
    with torch.no_grad():
        assert torch.equal(model.resample_pos_embed(height // 16, width // 16, height == width), expected)
    assert torch.equal(expected, model.pos_embed) == ((height // 16, width // 16) == (14, 14) and height == width)


def test_position_embeddings_resample_in_float32_for_bfloat16_parameters():
    model = vits.vit_small(patch_size=16, embed_dim=32, depth=1, num_heads=2).to(torch.bfloat16)
    expected = dino_pos_encoding(model.pos_embed.float(), 16, (1, 3, 96, 160)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model.resample_pos_embed(6, 10), expected)


def test_weights_of_another_grid_keep_it_and_give_dino_outputs(tmp_path, model_and_reference):
    _, reference = model_and_reference  # native grid 14x14 (224 px)
    torch.save(reference.state_dict(), tmp_path / "dino.pth")
    model = vits.vit_small(patch_size=16, img_size=480, **TINY).eval()
    vits.load_pretrained_weights(model, str(tmp_path / "dino.pth"))
    assert torch.equal(model.pos_embed, reference.pos_embed) and model.patch_embed.grid_size == (14, 14)
    for height, width in [(480, 480), (512, 384), (224, 224)]:
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            ours, theirs = model.forward_features(images), reference.forward_all(images)[0][-1]
        assert relative_max_error(ours, theirs) < 1e-5
    with pytest.raises(ValueError, match="position embeddings of 12 patches do not form a square grid"):
        model.set_native_grid(12)


@pytest.mark.parametrize("factory, width, heads", [(vits.vit_tiny, 192, 3), (vits.vit_small, 384, 6),
                                                    (vits.vit_base, 768, 12)])
def test_factories_have_dino_sizes(factory, width, heads):
    model = factory(patch_size=8, depth=1)
    assert model.embed_dim == width and model.blocks[0].attn.num_heads == heads
    assert model.pos_embed.shape == (1, 1 + 28 * 28, width)  # native grid at 224 px
    assert model.blocks[0].attn.fused_attn  # timm's fused scaled-dot-product attention


def test_shapes_interface_and_drop_path():
    model = vits.vit_tiny(patch_size=8, drop_path_rate=0.1, **TINY)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    model.eval()
    with torch.no_grad():
        for side in (16, 32, 40):
            images = torch.randn(3, 3, side, side)
            tokens = model.forward_features(images)
            assert tokens.shape == (3, 1 + (side // 8) ** 2, 32)
            torch.testing.assert_close(model(images), tokens[:, 0])
            attention = model.get_last_selfattention(images)
            assert attention.shape == (3, 2, tokens.shape[1], tokens.shape[1])
            torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, tokens.shape[1]))
            torch.testing.assert_close(model.get_intermediate_layers(images, n=1)[0], tokens)


def test_gradients_reach_every_parameter():
    model = vits.vit_tiny(patch_size=8, **TINY)
    model.forward_features(torch.randn(2, 3, 24, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_edge_pixels_beyond_whole_patches_are_dropped_as_in_dino(capsys):
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16, embed_dim=32, depth=1, num_heads=2).eval()
    frame = torch.randn(1, 3, 480, 854)  # a DAVIS frame
    cropped = frame[..., :480, :848]
    with torch.no_grad():
        tokens = model.get_intermediate_layers(frame)[0]
        assert tokens.shape == (1, 1 + 30 * 53, 32)  # DINO's 30x53 grid
        assert torch.equal(tokens, model.get_intermediate_layers(cropped)[0])
        assert torch.equal(model.forward_features(frame), model.forward_features(cropped))
        assert torch.equal(model(frame), model(cropped))
        assert torch.equal(model.get_last_selfattention(frame), model.get_last_selfattention(cropped))
    assert capsys.readouterr().out == ("warning: input 480x854 is not a multiple of patch 16: using 480x848, as DINO "
                                       "(the right 6 and bottom 0 pixels are dropped); reported once per model\n")
    with torch.no_grad():
        model(torch.randn(1, 3, 35, 47))  # said once per model: not again
        assert capsys.readouterr().out == ""
        vits.vit_small(patch_size=16, embed_dim=32, depth=1, num_heads=2)(torch.randn(1, 3, 35, 47))
    assert capsys.readouterr().out.startswith("warning: input 35x47 is not a multiple of patch 16: using 32x32, "
                                              "as DINO (the right 15 and bottom 3 pixels are dropped)")


def test_bad_inputs_give_clear_errors():
    model = vits.vit_tiny(patch_size=8, **TINY)
    with pytest.raises(ValueError, match="image size 7x32 is smaller than one patch"):
        model(torch.randn(1, 3, 7, 32))
    with pytest.raises(ValueError, match=r"expected images \[B, C, H, W\], got a tensor of shape \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="n must be between 1 and the depth 2"):
        model.get_intermediate_layers(torch.randn(1, 3, 16, 16), n=3)


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_head_shapes_on_features_and_tokens(use_bn, nlayers):
    head = DINOHead(32, 100, use_bn=use_bn, nlayers=nlayers, hidden_dim=48, bottleneck_dim=16)
    assert head(torch.randn(4, 32)).shape == (4, 100)
    tokens = torch.randn(4, 7, 32)
    assert head(tokens).shape == (4, 7, 100)
    head.eval()  # with batch norm frozen, every token is processed independently
    torch.testing.assert_close(head(tokens)[:, 3], head(tokens[:, 3]))


def test_head_computes_dino_formula_and_uses_dino_names():
    torch.manual_seed(0)
    head = DINOHead(32, 50, nlayers=3, hidden_dim=48, bottleneck_dim=16)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                       "mlp.4.weight", "mlp.4.bias", "last_layer.weight_v", "last_layer.weight_g"]
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(5, 32)
    hidden = F.gelu(head.mlp[2](F.gelu(head.mlp[0](x))))
    bottleneck = F.normalize(head.mlp[4](hidden), dim=-1)
    v = head.last_layer.weight_v
    expected = bottleneck @ (head.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(head.embed(x), bottleneck)  # the last layer's input, used by the fused loss


def test_head_norm_last_layer_freezes_the_scale():
    assert not DINOHead(32, 10, norm_last_layer=True).last_layer.weight_g.requires_grad
    free = DINOHead(32, 10, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    torch.testing.assert_close(free.last_layer.weight_g, torch.ones(10, 1))
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 10, nlayers=0)


# ----------------------------------------------------------------------------------------------
# Loading evaluation weights: refused when not finite or when they would need unsafe unpickling.
# ----------------------------------------------------------------------------------------------
def tiny_backbone_state(poison: dict) -> dict:
    """A tiny backbone's state dict with ``poison`` ({name: value}) written into element 0 of those tensors."""
    state = vits.vit_tiny(patch_size=4, img_size=16, **TINY).state_dict()
    for name, value in poison.items():
        state[name].view(-1)[0] = value
    return state


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    model = vits.vit_tiny(patch_size=4, img_size=16, **TINY)
    torch.save(tiny_backbone_state({"blocks.1.mlp.fc1.bias": float("inf"), "norm.weight": float("nan")}),
               tmp_path / "backbone.pth")
    with pytest.raises(RuntimeError, match=r"weights in .*backbone.pth are not finite: tensor blocks.1.mlp.fc1.bias "
                                           r"holds NaN or infinity; the file is damaged") as error:
        vits.load_pretrained_weights(model, str(tmp_path / "backbone.pth"))
    assert "training checkpoint" not in str(error.value)
    run = tmp_path / "run"
    run.mkdir()
    teacher = {f"backbone.{k}": v for k, v in tiny_backbone_state({"pos_embed": float("nan")}).items()}
    torch.save({"student": teacher, "teacher": teacher, "optimizer": {}, "epoch": 7}, run / "checkpoint.pth")
    torch.save({}, run / "checkpoint0004.pth")  # an earlier periodic copy of the same run
    with pytest.raises(RuntimeError, match=r"tensor pos_embed holds NaN or infinity; this is a training checkpoint "
                                           r"\(epoch 7\): the training run diverged before it was written; evaluate an "
                                           r"earlier checkpoint00NN.pth of the same run \(in that folder: "
                                           r"checkpoint0004.pth\)") as error:
        vits.load_pretrained_weights(model, str(run / "checkpoint.pth"))
    assert "--lr" not in str(error.value)
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())  # nothing was loaded


class Payload:
    """Unpickling this would create a folder: a stand-in for code a foreign pickle could run."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        import os
        return os.makedirs, (self.folder,)


def test_files_needing_other_python_objects_are_refused_unloaded(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    torch.save({"teacher": tiny_backbone_state({}), "extra": Payload(marker)}, tmp_path / "foreign.pth")
    with pytest.raises(RuntimeError, match=r"weights .*foreign.pth holds Python objects of type os.makedirs; they "
                                           r"are not loaded, because unpickling them could run arbitrary code"):
        vits.load_pretrained_weights(vits.vit_tiny(patch_size=4, img_size=16, **TINY), str(tmp_path / "foreign.pth"))
    assert not marker.exists()
    model = vits.vit_tiny(patch_size=4, img_size=16, **TINY)
    torch.save(model, tmp_path / "whole_model.pth")  # the module itself, not its state dict
    with pytest.raises(RuntimeError, match=r"holds Python objects of type .*vision_transformer.VisionTransformer"):
        vits.load_pretrained_weights(model, str(tmp_path / "whole_model.pth"))
