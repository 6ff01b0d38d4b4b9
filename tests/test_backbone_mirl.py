"""MIRL's deep ViT presets: registered with timm, MIRL's configuration, and a deep model runs only up to
the tapped block."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch

from featlift import BackboneError, create_backbone
from featlift.backbones.mirl import MIRL_PRESETS

PRESETS = {  # name: (embed, depth, heads, published parameter count in millions, or None)
    "mirl_vit_small_depth54_patch16": (384, 54, 12, 96),
    "mirl_vit_base_depth48_patch16": (768, 48, 12, 341),
    "mirl_vit_base_depth24_patch16": (768, 24, 12, None),
}


def vit_parameters(dim: int, depth: int, patch: int = 16, tokens: int = 197) -> int:
    """Parameters of a class-token ViT with qkv bias, MLP ratio 4, a final norm and no head, by hand."""
    embedding = 3 * patch * patch * dim + dim + dim + tokens * dim  # patch conv, cls token, pos embed
    block = (
        2 * 2 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + (4 * dim * dim + 4 * dim)
        + (4 * dim * dim + dim)
    )
    return embedding + depth * block + 2 * dim


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_timm_models_with_mirls_configuration(name):
    embed, depth, heads, published = PRESETS[name]
    assert timm.is_model(name) and name in timm.list_models("mirl_*")
    assert MIRL_PRESETS[name] == (embed, depth, heads)
    with torch.device("meta"):  # the architecture only: no memory, no init time
        model = timm.create_model(name, pretrained=False, num_classes=0)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (embed, depth, heads)
    assert model.patch_embed.patch_size == (16, 16) and model.num_prefix_tokens == 1
    block = model.blocks[0]
    assert block.attn.qkv.bias is not None and block.mlp.fc1.out_features == 4 * embed
    assert isinstance(block.ls1, torch.nn.Identity) and isinstance(
        block.ls2, torch.nn.Identity
    )  # no layer scale
    assert isinstance(block.attn.q_norm, torch.nn.Identity)
    assert model.norm.eps == 1e-6 and block.norm1.eps == 1e-6
    count = sum(p.numel() for p in model.parameters())
    assert count == vit_parameters(embed, depth)
    if published is not None:
        assert round(count / 1e6) == published
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["std"] == (0.229, 0.224, 0.225)


def test_pretrained_without_a_file_is_refused_not_random():
    with pytest.raises(BackboneError, match="MIRL publishes no downloadable weights.*--weights FILE"):
        create_backbone("mirl_vit_base_depth24_patch16")
    with pytest.raises(BackboneError, match="MIRL publishes no downloadable weights"):
        timm.create_model("mirl_vit_small_depth54_patch16", pretrained=True)


def blocks_that_ran(model: torch.nn.Module, run) -> tuple[list[int], list[int], list[int]]:
    """Counted with forward pre-hooks while `run()` runs: the blocks any module of which ran, how many
    times each block's forward was entered, and how many times each block's ``attn.qkv`` ran."""
    touched: set[int] = set()
    entered = [0] * len(model.blocks)
    qkv_calls = [0] * len(model.blocks)
    handles = []
    for index, block in enumerate(model.blocks):
        for module in block.modules():
            handles.append(module.register_forward_pre_hook(lambda *_, i=index: touched.add(i)))
        handles.append(
            block.register_forward_pre_hook(lambda *_, i=index: entered.__setitem__(i, entered[i] + 1))
        )
        handles.append(
            block.attn.qkv.register_forward_pre_hook(
                lambda *_, i=index: qkv_calls.__setitem__(i, qkv_calls[i] + 1)
            )
        )
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return sorted(touched), entered, qkv_calls


@pytest.mark.parametrize("facet", ["token", "key"])
def test_a_54_block_model_tapped_at_block_20_runs_21_blocks(facet):
    """The ViT-S-54 preset (narrowed to 32 channels to stay fast) tapped at block 20: blocks 0..20 run,
    the 33 after it never do. For an attention facet block 20 runs only its norm1 and qkv (its forward is
    entered and stopped where its input is captured, or not entered at all)."""
    torch.manual_seed(0)
    backbone = create_backbone(
        "mirl_vit_small_depth54_patch16", pretrained=False, layer=20, facet=facet, embed_dim=32, num_heads=4
    )
    assert backbone.depth == 54
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        touched, entered, qkv_calls = blocks_that_ran(backbone.model, lambda: backbone(x))
    assert touched == list(range(21))
    # an attention facet projects block 20's input with that block's qkv weights (facets.attention_facet)
    # rather than through the module's forward, so its hook may not see it
    assert qkv_calls[:20] == [1] * 20 and qkv_calls[21:] == [0] * 33
    assert qkv_calls[20] == 1 if facet == "token" else qkv_calls[20] in (0, 1)
    assert entered[:20] == [1] * 20 and entered[21:] == [0] * 33
    assert entered[20] == 1 if facet == "token" else entered[20] in (0, 1)
    with torch.no_grad():  # and it is block 20's facet: the token facet against the model run by hand
        tokens = backbone.model._pos_embed(backbone.model.patch_embed(x))
        for block in backbone.model.blocks[:20]:
            tokens = block(tokens)
        if facet == "token":
            expected = backbone.model.norm(backbone.model.blocks[20](tokens))
            torch.testing.assert_close(backbone(x), expected[:, 1:].transpose(1, 2).reshape(1, 32, 2, 2))
        else:
            block = backbone.model.blocks[20]
            key = block.attn.qkv(block.norm1(tokens))[..., 32:64]
            torch.testing.assert_close(backbone(x), key[:, 1:].transpose(1, 2).reshape(1, 32, 2, 2))


def test_mirl_preset_loads_a_paddle_checkpoint(tmp_path):
    """A ViT-B-24-shaped (narrowed) Paddle checkpoint, as MIRL's pre-training writes it, loads into the preset."""
    torch.manual_seed(0)
    kwargs = dict(embed_dim=24, num_heads=2, depth=24)
    model = timm.create_model(
        "mirl_vit_base_depth24_patch16", pretrained=False, num_classes=0, **kwargs
    ).eval()
    linear = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    paddle_state = {
        key: (f"p{i}", value.numpy().T.copy() if key.endswith(linear) else value.numpy())
        for i, (key, value) in enumerate(model.state_dict().items())
    }
    paddle_state |= {
        "mask_token0": ("m", np.zeros((1, 1, 8), np.float32)),
        "norm0.weight": ("n", np.ones(24, np.float32)),
    }
    path = tmp_path / "checkpoint-299.pd"
    path.write_bytes(pickle.dumps({"model": paddle_state, "epoch": 299}, protocol=4))
    backbone = create_backbone(
        "mirl_vit_base_depth24_patch16", weights=path, layer=5, facet="value", **kwargs
    )
    reference = create_backbone(
        "mirl_vit_base_depth24_patch16", pretrained=False, layer=5, facet="value", **kwargs
    )
    reference.model.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x))
    assert backbone.fingerprint() == reference.fingerprint()
