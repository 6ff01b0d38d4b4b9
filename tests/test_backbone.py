"""Backbone taps: each facet against a hand computation from the block's own weights, shapes, errors."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, TINY_TIMM_NAME, requires_shared, tiny_vit, write_images
from safetensors.torch import save_file

from featlift import BackboneError, InputSizeError, create_backbone
from featlift.backbones import ViTBackbone
from featlift.cli import main


def hand_block_inputs(model, x):
    """Run the ViT by hand; return the list of token tensors entering each block, and the final normed output."""
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    tokens = model.norm_pre(tokens)
    inputs = []
    for block in model.blocks:
        inputs.append(tokens)
        tokens = block(tokens)
    return inputs, model.norm(tokens)


def hand_facet(block, tokens, facet):
    """key = LN1(x) @ W_k^T + b_k, then k_norm per head (and the same for query/value)."""
    attn = block.attn
    dim = attn.qkv.out_features // 3
    y = block.norm1(tokens)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    index = {"query": 0, "key": 1, "value": 2}[facet]
    out = y @ weight[index * dim : (index + 1) * dim].T + bias[index * dim : (index + 1) * dim]
    heads = out.reshape(*out.shape[:2], attn.num_heads, -1)
    if facet == "query":
        heads = attn.q_norm(heads)
    elif facet == "key":
        heads = attn.k_norm(heads)
    return heads.reshape(out.shape)


def to_map(tokens, prefix, grid):
    tokens = tokens[:, prefix:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("facet", ["token", "query", "key", "value"])
def test_facets_match_hand_computation(patch, facet):
    model = tiny_vit(patch_size=patch, depth=3, reg_tokens=2, qk_norm=True, seed=patch)
    with torch.no_grad():  # give the q/k norms non-trivial affine weights so they are really tested
        for block in model.blocks:
            block.attn.q_norm.weight.uniform_(0.5, 1.5)
            block.attn.k_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, patch * 3, patch * 5)  # non-square
    inputs, final = hand_block_inputs(model, x)
    for layer in range(3):
        backbone = ViTBackbone(model, "tiny", layer=layer, facet=facet)
        assert backbone.num_prefix_tokens == 3
        got = backbone(x)
        if facet == "token":
            block_out = model.blocks[layer](inputs[layer])
            expected = to_map(model.norm(block_out), 3, (3, 5))
        else:
            expected = to_map(hand_facet(model.blocks[layer], inputs[layer], facet), 3, (3, 5))
        assert got.shape == (2, backbone.channels, 3, 5)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    del final


def test_last_token_facet_equals_forward_features():
    model = tiny_vit(patch_size=16)
    backbone = ViTBackbone(model, "tiny")
    x = torch.randn(1, 3, 48, 64)
    expected = to_map(model.forward_features(x), model.num_prefix_tokens, (3, 4))
    torch.testing.assert_close(backbone(x), expected)


def test_layer_and_facet_validation():
    model = tiny_vit(depth=2)
    assert ViTBackbone(model, "tiny", layer=-1).layer == 1
    with pytest.raises(BackboneError, match="layer 5: tiny has 2 blocks"):
        ViTBackbone(model, "tiny", layer=5)
    with pytest.raises(BackboneError, match="facet 'attn'"):
        ViTBackbone(model, "tiny", facet="attn")


def test_sizes_not_multiple_of_patch_are_refused_with_a_suggestion():
    backbone = ViTBackbone(tiny_vit(patch_size=14), "tiny14")
    with pytest.raises(
        InputSizeError, match=r"225x224 is not a multiple of tiny14's patch size 14; resize to e.g. 224x224"
    ):
        backbone(torch.zeros(1, 3, 225, 224))
    with pytest.raises(InputSizeError, match=r"\[B, 3, H, W\]"):
        backbone(torch.zeros(3, 224, 224))


def test_normalize_uses_model_config():
    backbone = ViTBackbone(tiny_vit(), "tiny")
    x = torch.full((1, 3, 16, 16), 0.5)
    expected = (0.5 - torch.tensor(backbone.mean)) / torch.tensor(backbone.std)
    torch.testing.assert_close(backbone.normalize(x)[0, :, 0, 0], expected)


def test_non_vit_models_are_refused():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(BackboneError, match="not a Vision Transformer"):
        ViTBackbone(model, "resnet18")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(BackboneError, match="similar names: vit_small_patch14_dinov2"):
        create_backbone("vit_smal_patch14_dinov2", pretrained=False)


@pytest.fixture
def tiny_timm_checkpoint(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    return model, tmp_path


def test_local_weights_in_safetensors_and_wrapped_pth(tiny_timm_checkpoint):
    model, tmp = tiny_timm_checkpoint
    state = model.state_dict()
    save_file(state, tmp / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp / "w.pth")
    # a DINO-style training checkpoint: the ViT under backbone., a projection head beside it, other entries
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher |= {"head.mlp.0.weight": torch.zeros(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save({"teacher": teacher, "epoch": 100, "args": None}, tmp / "teacher.pth")
    x = torch.rand(1, 3, 32, 48)
    outputs = []
    for file in ("w.safetensors", "w.pth", "teacher.pth"):
        backbone = create_backbone("vit_tiny_patch16_224", weights=tmp / file, layer=5, facet="key")
        assert backbone.name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag is recorded
        assert (backbone.channels, backbone.patch_size, backbone.num_prefix_tokens) == (192, 16, 1)
        outputs.append((backbone.fingerprint(), backbone(x)))
    for fingerprint, features in outputs[1:]:
        assert fingerprint == outputs[0][0]
        torch.testing.assert_close(features, outputs[0][1])
    reference = ViTBackbone(
        timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True),
        "ref",
        layer=5,
        facet="key",
    )
    reference.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    torch.testing.assert_close(reference(x), outputs[0][1])


def test_fingerprint_changes_with_weights(tiny_timm_checkpoint):
    model, tmp = tiny_timm_checkpoint
    save_file(model.state_dict(), tmp / "a.safetensors")
    state = model.state_dict()
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"] + 1e-3
    save_file(state, tmp / "b.safetensors")
    a = create_backbone("vit_tiny_patch16_224", weights=tmp / "a.safetensors").fingerprint()
    b = create_backbone("vit_tiny_patch16_224", weights=tmp / "b.safetensors").fingerprint()
    assert len(a) == 16 and a != b


def test_bad_weights_files_are_named(tiny_timm_checkpoint):
    _, tmp = tiny_timm_checkpoint
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone("vit_tiny_patch16_224", weights=tmp / "missing.safetensors")
    (tmp / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth: not a PyTorch or safetensors weights file"):
        create_backbone("vit_tiny_patch16_224", weights=tmp / "junk.pth")
    (tmp / "empty.pth").write_bytes(b"")
    with pytest.raises(
        BackboneError, match=r"empty.pth: not a PyTorch or safetensors weights file \(it is empty\)"
    ):
        create_backbone("vit_tiny_patch16_224", weights=tmp / "empty.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp / "full.pth")
    with pytest.raises(BackboneError, match="full.pth: it also holds pickled Python objects"):
        create_backbone("vit_tiny_patch16_224", weights=tmp / "full.pth")
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp / "tiny.safetensors")
    with pytest.raises(BackboneError, match="does not fit vit_small_patch16_224") as error:
        create_backbone("vit_small_patch16_224", weights=tmp / "tiny.safetensors")
    message = str(error.value)  # counts and examples, not torch's list of every key
    assert "cls_token is [1, 1, 192] in the file, [1, 1, 384] in the model" in message
    assert "in all)" in message and len(message) < 1000
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp / "edited.safetensors")
    with pytest.raises(BackboneError, match="lacks norm.weight, which would stay randomly initialised"):
        create_backbone("vit_tiny_patch16_224", weights=tmp / "edited.safetensors")


@pytest.mark.parametrize(
    "name, channels, patch, prefix",
    [
        ("vit_small_patch16_224.dino", 384, 16, 1),
        ("vit_small_patch8_224.dino", 384, 8, 1),
        ("vit_base_patch16_224.dino", 768, 16, 1),
        ("vit_small_patch14_dinov2.lvd142m", 384, 14, 1),
        ("vit_small_patch14_reg4_dinov2.lvd142m", 384, 14, 5),
        ("vit_base_patch16_clip_224.openai", 768, 16, 1),
        ("vit_small_patch16_224.augreg_in21k_ft_in1k", 384, 16, 1),
    ],
)
def test_listed_timm_families_build_and_tap(name, channels, patch, prefix):
    """Architecture only, 3 blocks deep to stay fast (no download here): shape facts come from the model."""
    for facet in ("token", "key"):
        backbone = create_backbone(name, pretrained=False, facet=facet, layer=2, depth=3)
        assert (backbone.name, backbone.channels, backbone.patch_size, backbone.num_prefix_tokens) == (
            name,
            channels,
            patch,
            prefix,
        )
        with torch.no_grad():
            out = backbone(backbone.normalize(torch.rand(1, 3, patch * 2, patch * 3)))
        assert out.shape == (1, channels, 2, 3)


def test_original_dinov2_layout_with_registers_loads_like_timm_layout(tmp_path):
    """The facebookresearch/dinov2 layout (mask_token, register_tokens, CLS position in pos_embed), as in
    its released .pth files, converted by timm on load: the same features as the timm-layout file."""
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=2)
    timm_state = model.state_dict()
    save_file(timm_state, tmp_path / "timm.safetensors")
    original = {k: v for k, v in timm_state.items() if k not in ("reg_token", "pos_embed")}
    original["register_tokens"] = timm_state["reg_token"]
    original["pos_embed"] = torch.cat([torch.zeros(1, 1, 384), timm_state["pos_embed"]], dim=1)
    original["mask_token"] = torch.zeros(1, 384)
    torch.save(original, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    x = torch.rand(1, 3, 28, 42)
    features = []
    for file in ("timm.safetensors", "dinov2_vits14_reg4_pretrain.pth"):
        backbone = create_backbone(name, weights=tmp_path / file, depth=2, layer=1, facet="query")
        assert backbone.num_prefix_tokens == 5
        with torch.no_grad():
            features.append((backbone.fingerprint(), backbone(backbone.normalize(x))))
    assert features[0][0] == features[1][0]  # the fingerprint is of the loaded model, not of the file
    torch.testing.assert_close(features[0][1], features[1][1])


def extract_with_weights(tmp_path, weights) -> int:
    """`featlift extract` of one tiny image with backbone weights `weights`."""
    write_images(tmp_path / "images", count=1)
    argv = [
        "-q",
        "extract",
        str(tmp_path / "images"),
        "--backbone",
        TINY_TIMM_NAME,
        "--weights",
        str(weights),
    ]
    return main(
        argv
        + ["--upsampler", "bilinear", "--size", "32x48", "--workers", "0", "--out", str(tmp_path / "out")]
    )


def test_a_text_file_as_weights_is_named_as_not_a_weights_file(tmp_path, capsys):
    (tmp_path / "x.pth").write_text("this is a text file\n")
    assert extract_with_weights(tmp_path, tmp_path / "x.pth") == 2
    err = capsys.readouterr().err
    assert f"weights file {tmp_path / 'x.pth'}: not a PyTorch or safetensors weights file" in err
    assert "(it starts with b'this is a text f')" in err
    assert not (tmp_path / "out").exists()


def test_the_weights_format_is_told_by_content_not_suffix(tmp_path):
    state = timm.create_model(TINY_TIMM_NAME, pretrained=False, num_classes=0, depth=2).state_dict()
    save_file(state, tmp_path / "saved_by_safetensors.pth")
    torch.save(state, tmp_path / "saved_by_torch.safetensors")
    fingerprints = {
        create_backbone(TINY_TIMM_NAME, weights=tmp_path / name, depth=2).fingerprint()
        for name in ("saved_by_safetensors.pth", "saved_by_torch.safetensors")
    }
    assert len(fingerprints) == 1
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "saved_by_safetensors.pth").read_bytes()[:5000])
    with pytest.raises(
        BackboneError, match="cut.safetensors: cannot read this safetensors file; is it truncated"
    ):
        create_backbone(TINY_TIMM_NAME, weights=tmp_path / "cut.safetensors", depth=2)


def test_backbone_weights_with_nan_are_refused_naming_the_tensors(tmp_path, capsys):
    state = timm.create_model(TINY_TIMM_NAME, pretrained=False).state_dict()
    state["blocks.3.attn.qkv.weight"][7, 7] = float("nan")
    state["pos_embed"][0, 0, 0] = float("-inf")
    save_file(state, tmp_path / "nan.safetensors")
    assert extract_with_weights(tmp_path, tmp_path / "nan.safetensors") == 2
    err = capsys.readouterr().err
    assert f"weights file {tmp_path / 'nan.safetensors'}: NaN or infinite values in" in err
    assert "blocks.3.attn.qkv.weight" in err and "pos_embed" in err
    assert not (tmp_path / "out").exists()


def test_weights_for_another_patch_size_are_refused_naming_both(tmp_path):
    """timm would resample a patch-16 kernel to 14x14 and load it silently."""
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2, patch_size=16
    )
    save_file(model.state_dict(), tmp_path / "dinov2_s16.safetensors")
    with pytest.raises(BackboneError) as error:
        create_backbone(
            "vit_small_patch14_dinov2.lvd142m", weights=tmp_path / "dinov2_s16.safetensors", depth=2
        )
    message = str(error.value)
    assert "dinov2_s16.safetensors does not fit vit_small_patch14_dinov2.lvd142m" in message
    assert "patch_embed.proj.weight is [384, 3, 16, 16] (patch 16x16)" in message
    assert "has [384, 3, 14, 14] (patch 14x14)" in message


@requires_shared
def test_real_patch_14_weights_are_refused_for_a_patch_16_model():
    with pytest.raises(
        BackboneError, match=r"is \[384, 3, 14, 14\] \(patch 14x14\), but .* has \[384, 3, 16, 16\]"
    ):
        create_backbone(DINOV2_NAME, weights=DINOV2_WEIGHTS, patch_size=16)
