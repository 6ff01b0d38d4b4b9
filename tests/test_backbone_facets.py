"""Query/key/value facets on every ViT family featlift taps, proven by the attention they give.

For each family (small random-weight timm models, built by the names users type), the block's own attention
output, captured with a forward hook, must equal the attention computed from featlift's facets alone:
``proj(softmax(q k^T * scale [+ BEiT's relative position bias]) v)``. A facet that skips the rotary
embedding, a q/k norm or a separately kept bias fails this by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, requires_shared

from featlift import BackboneError, InputSizeError, create_backbone
from featlift.backbones import ViTBackbone
from featlift.backbones.facets import ATTENTION_FACETS, attention_facet
from featlift.backbones.vit import attention_facet as attention_facet_from_vit

SMALL = dict(depth=2, embed_dim=64, num_heads=4)
LAYER = 1

# name as a user types it, extra timm kwargs, input (H, W) in patches, prefix tokens, block and attention class
FAMILIES = [
    ("vit_base_patch16_224.dino", {}, (3, 2), 1, "Block", "Attention"),
    ("vit_small_patch14_reg4_dinov2", {}, (3, 2), 5, "Block", "Attention"),
    ("vit_small_patch14_reg4_dinov2", {"qk_norm": True}, (2, 3), 5, "Block", "Attention"),
    ("vit_base_patch16_clip_224", {}, (2, 3), 1, "Block", "Attention"),
    ("vit_base_patch16_siglip_224", {}, (3, 2), 0, "Block", "Attention"),
    ("vit_base_patch16_siglip_224.v2_webli", {}, (2, 3), 0, "Block", "Attention"),  # SigLIP2
    ("naflexvit_base_patch16_siglip.v2_webli", {}, (3, 2), 0, "Block", "Attention"),  # SigLIP2 NaFlex
    ("deit_tiny_patch16_224", {}, (3, 2), 1, "Block", "Attention"),
    ("vit_base_patch16_rpn_224", {}, (3, 2), 0, "ResPostBlock", "Attention"),  # post-norm residual
    ("vit_small_patch16_dinov3", {}, (3, 2), 5, "EvaBlock", "EvaAttention"),  # CLS + 4 storage tokens
    ("vit_small_patch16_dinov3_qkvb", {}, (2, 3), 5, "EvaBlock", "EvaAttention"),  # separate q/v biases
    ("vit_small_patch16_dinov3", {"qk_norm": True}, (2, 3), 5, "EvaBlock", "EvaAttention"),
    ("eva02_tiny_patch14_224.mim_in22k", {}, (3, 2), 1, "EvaBlock", "EvaAttention"),
    ("eva02_base_patch14_224.mim_in22k", {}, (2, 3), 1, "EvaBlock", "EvaAttention"),  # unfused q/k/v
    ("eva02_enormous_patch14_clip_224", {}, (3, 2), 1, "EvaBlockPostNorm", "EvaAttention"),
    # per-block, per-head learned RoPE frequencies:
    ("vit_base_patch16_rope_mixed_224", {}, (2, 3), 1, "EvaBlock", "AttentionRope"),
    ("vit_pe_core_tiny_patch16_384", {}, (3, 2), 1, "EvaBlock", "AttentionRope"),
    (
        "vit_pe_core_tiny_patch16_384",
        {"qkv_fused": False, "num_kv_heads": 2},
        (2, 3),
        1,
        "EvaBlock",
        "AttentionRope",
    ),
    ("beit_base_patch16_224", {"img_size": (48, 32)}, (3, 2), 1, "Block", "Attention"),  # rel. pos. bias
    ("beitv2_base_patch16_224", {"img_size": (32, 48)}, (2, 3), 1, "Block", "Attention"),
    ("beit3_base_patch16_224", {}, (3, 2), 1, "Block", "Attention"),  # a VisionTransformer in timm
    ("naflexvit_base_patch16_radio_v3", {}, (3, 2), 8, "Block", "Attention"),  # RADIO: CLS + 7 summary
    ("vit_base_patch16_radio_v3", {"img_size": (48, 32)}, (3, 2), 8, "Block", "Attention"),
]
IDS = [family[0] + "".join(f"+{key}" for key in family[1] if key != "img_size") for family in FAMILIES]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: timm zero-initialises the q/v biases, BEiT's bias table, layer scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            scale = 0.3 if parameter.ndim == 1 else 0.05
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("k_bias"):  # a buffer timm keeps at zero; whatever it holds, attention adds it
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))


def build(name: str, kwargs: dict, facet: str) -> ViTBackbone:
    backbone = create_backbone(name, pretrained=False, facet=facet, layer=LAYER, **SMALL, **kwargs)
    randomize(backbone.model, seed=len(name))
    backbone.model.double()
    return backbone


def capture_block_call(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Run the whole model; return block LAYER's input and keywords, and its attention's input, keywords, output."""
    block = model.blocks[LAYER]
    seen: dict = {}

    def block_pre(module, args, kwargs):
        seen["tokens"], seen["block_kwargs"] = args[0], dict(kwargs)

    def attn_pre(module, args, kwargs):
        seen["attn_input"], seen["attn_kwargs"] = args[0], dict(kwargs)

    def attn_out(module, args, output):
        seen["attn_output"] = output

    handles = [
        block.register_forward_pre_hook(block_pre, with_kwargs=True),
        block.attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
        block.attn.register_forward_hook(attn_out),
    ]
    try:
        with torch.no_grad():
            model.forward_intermediates(images, indices=[LAYER], intermediates_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def heads(flat: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, N, count * d] -> [B, count, N, d]``."""
    return flat.reshape(*flat.shape[:2], count, -1).transpose(1, 2)


def attention_from_facets(block, seen: dict) -> torch.Tensor:
    """The block's attention output computed from the query/key/value facets and the module's other layers."""
    attn = block.attn
    rope = seen["block_kwargs"].get("rope")
    facets = {facet: attention_facet(block, seen["tokens"], facet, rope=rope) for facet in ATTENTION_FACETS}
    head_dim = facets["query"].shape[-1] // attn.num_heads
    query = heads(facets["query"], attn.num_heads)
    key = heads(facets["key"], facets["key"].shape[-1] // head_dim)
    value = heads(facets["value"], facets["value"].shape[-1] // head_dim)
    groups = attn.num_heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = query @ key.transpose(-2, -1) * attn.scale
    if getattr(attn, "relative_position_bias_table", None) is not None:  # BEiT: a learned bias per offset
        logits = logits + attn._get_rel_pos_bias()
    shared_bias = seen["attn_kwargs"].get("shared_rel_pos_bias")
    if shared_bias is not None:
        logits = logits + shared_bias
    assert seen["attn_kwargs"].get("attn_mask") is None
    mixed = (logits.softmax(dim=-1) @ value).transpose(1, 2).flatten(2)
    mixed = attn.norm(mixed) if hasattr(attn, "norm") else mixed
    if getattr(attn, "gate", None) is not None:
        mixed = mixed * attn.gate(seen["attn_input"]).sigmoid()
    return attn.proj(mixed)


@pytest.mark.parametrize("name, kwargs, grid, prefix, block_class, attn_class", FAMILIES, ids=IDS)
def test_attention_from_facets_equals_the_blocks_attention(
    name, kwargs, grid, prefix, block_class, attn_class
):
    torch.manual_seed(0)
    backbone = build(name, kwargs, "key")
    block = backbone.model.blocks[LAYER]
    assert (type(block).__name__, type(block.attn).__name__) == (block_class, attn_class)
    assert backbone.num_prefix_tokens == prefix
    images = torch.randn(
        2, 3, grid[0] * backbone.patch_size, grid[1] * backbone.patch_size, dtype=torch.float64
    )
    seen = capture_block_call(backbone.model, images)
    assert seen["tokens"].shape[1] == prefix + grid[0] * grid[1]
    expected = seen["attn_output"]
    got = attention_from_facets(block, seen)
    assert expected.abs().max() > 1e-2  # a non-trivial attention output
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name, kwargs, grid, prefix, block_class, attn_class", FAMILIES, ids=IDS)
def test_backbone_facets_are_the_patch_tokens_on_the_grid(
    name, kwargs, grid, prefix, block_class, attn_class
):
    """ViTBackbone's maps: the facets of the patch tokens (prefix tokens dropped), row-major on the token grid,
    with the rotary embedding the backbone captured itself; the token facet is timm's own NCHW map."""
    built = build(name, kwargs, "token")
    torch.manual_seed(1)
    images = torch.randn(1, 3, grid[0] * built.patch_size, grid[1] * built.patch_size, dtype=torch.float64)
    for facet in ("token", *ATTENTION_FACETS):
        backbone = ViTBackbone(built.model, built.name, layer=LAYER, facet=facet)
        with torch.no_grad():
            got = backbone(images)
        assert got.shape == (1, backbone.channels, *grid)
        if facet == "token":
            (expected,) = backbone.model.forward_intermediates(
                images, indices=[LAYER], norm=True, intermediates_only=True, output_fmt="NCHW"
            )
        else:
            seen = capture_block_call(backbone.model, images)
            rope = seen["block_kwargs"].get("rope")
            with torch.no_grad():
                tokens = attention_facet(backbone.model.blocks[LAYER], seen["tokens"], facet, rope=rope)
            assert tokens.shape[-1] == backbone.channels
            patches = tokens[0, prefix:]  # [h*w, C], row-major
            expected = patches.T.reshape(1, -1, *grid)
            torch.testing.assert_close(got[0, :, 1, 0], patches[grid[1]], rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_rotary_embedding_changes_dinov3_query_and_key_but_not_value():
    """The facets of a rotary ViT are not the plain projections: DINOv3's keys differ without RoPE."""
    backbone = build("vit_small_patch16_dinov3", {}, "key")
    images = torch.randn(1, 3, 48, 32, dtype=torch.float64)
    seen = capture_block_call(backbone.model, images)
    block, rope = backbone.model.blocks[LAYER], seen["block_kwargs"]["rope"]
    assert rope is not None
    for facet in ATTENTION_FACETS:
        with torch.no_grad():
            rotated = attention_facet(block, seen["tokens"], facet, rope=rope)
            plain = attention_facet(block, seen["tokens"], facet)
        prefix = backbone.num_prefix_tokens
        torch.testing.assert_close(rotated[:, :prefix], plain[:, :prefix])  # prefix tokens are not rotated
        differs = (rotated[:, prefix:] - plain[:, prefix:]).abs().max() > 1e-3
        assert differs == (facet != "value"), facet


def test_vit_module_keeps_attention_facet():
    assert attention_facet_from_vit is attention_facet


@pytest.mark.parametrize(
    "name, kind",
    [("vit_base_patch16_xp_224", "ParallelScalingBlock"), ("vit_dwee_patch16_reg1_gap_256", "DiffAttention")],
)
def test_unknown_blocks_and_attention_are_refused_by_class(name, kind):
    with pytest.raises(
        BackboneError, match=rf"{kind}( as attention)?, whose query/key/value featlift cannot tap; supported"
    ):
        create_backbone(name, pretrained=False, facet="query", layer=1, **SMALL)
    backbone = create_backbone(name, pretrained=False, facet="token", layer=1, **SMALL)  # tokens still work
    assert backbone(torch.randn(1, 3, 32, 48)).shape == (1, 64, 2, 3)


def test_rope_given_to_a_block_without_rotary_attention_is_refused():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **SMALL)
    tokens = torch.randn(1, 5, 64)
    with pytest.raises(BackboneError, match="applies no rotary embedding"):
        attention_facet(model.blocks[0], tokens, "key", rope=torch.zeros(4, 32))
    with pytest.raises(BackboneError, match="facet 'token' is not an attention facet"):
        attention_facet(model.blocks[0], tokens, "token")


@pytest.mark.parametrize(
    "name, kwargs, size, advice",
    [
        ("beit_base_patch16_224", {}, "224x224", r"img_size=\(H, W\)"),
        ("vit_base_patch16_radio_v3", {"img_size": 64}, "64x64", "naflexvit_base_patch16_radio_v3"),
    ],
)
def test_fixed_size_families_refuse_other_sizes(name, kwargs, size, advice):
    backbone = create_backbone(name, pretrained=False, facet="token", layer=1, **SMALL, **kwargs)
    height, width = (int(v) for v in size.split("x"))
    assert backbone(torch.randn(1, 3, height, width)).shape == (1, 64, height // 16, width // 16)
    with pytest.raises(InputSizeError, match=rf"input size 32x48: .* takes only {size} inputs; .*{advice}"):
        backbone(torch.randn(1, 3, 32, 48))


def test_naflex_radio_takes_any_multiple_of_the_patch():
    backbone = create_backbone("naflexvit_base_patch16_radio_v3", pretrained=False, layer=1, **SMALL)
    assert (backbone.patch_size, backbone.num_prefix_tokens, backbone.channels) == (16, 8, 64)
    for size in ((32, 48), (64, 16)):
        assert backbone(torch.randn(1, 3, *size)).shape == (1, 64, size[0] // 16, size[1] // 16)


def test_grouped_query_attention_keys_and_values_have_the_key_value_heads():
    kwargs = dict(qkv_fused=False, num_kv_heads=2, pretrained=False, layer=1, **SMALL)
    channels = {
        facet: create_backbone("vit_pe_core_tiny_patch16_384", facet=facet, **kwargs).channels
        for facet in ATTENTION_FACETS
    }
    assert channels == {"query": 64, "key": 32, "value": 32}  # 4 query heads, 2 key/value heads of 16


def test_build_kwargs_per_family_and_the_callers_win():
    from featlift.backbones.families import timm_build_kwargs

    assert timm_build_kwargs("vit_small_patch16_dinov3") == {"num_classes": 0, "dynamic_img_size": True}
    assert timm_build_kwargs("naflexvit_base_patch16_radio_v3.c_radio") == {"num_classes": 0}
    assert timm_build_kwargs("beitv2_base_patch16_224", {"img_size": 64}) == {
        "num_classes": 0,
        "img_size": 64,
    }
    assert timm_build_kwargs("vit_base_patch16_radio_v3")["dynamic_img_size"] is False
    assert timm_build_kwargs("vit_base_patch16_224", {"dynamic_img_size": False})["dynamic_img_size"] is False
    assert timm_build_kwargs("no_such_model") == {"num_classes": 0, "dynamic_img_size": True}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_dinov3_qkvb", {}),
        ("vit_small_patch16_dinov3", {"qk_norm": True}),
        ("eva02_tiny_patch14_224.mim_in22k", {}),
        ("vit_pe_core_tiny_patch16_384", {}),
        ("beit_base_patch16_224", {"img_size": (48, 32)}),
        ("vit_small_patch14_reg4_dinov2", {"qk_norm": True}),
    ],
)
@pytest.mark.parametrize(
    "device, autocast",
    [("cpu", None), ("cpu", torch.bfloat16), ("cuda", torch.float16)],
    ids=["float32", "bf16-autocast", "cuda-fp16-autocast"],
)
def test_facets_are_the_tensors_timm_hands_to_attention(monkeypatch, name, kwargs, device, autocast):
    """The q, k, v timm passes to ``scaled_dot_product_attention`` in block LAYER, dtype included: under
    autocast timm casts rotated q/k to v's dtype (on CUDA a LayerNorm q/k-norm returns float32 before that)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (autocast runs LayerNorm in float32 there)")
    backbone = create_backbone(name, pretrained=False, facet="key", layer=LAYER, **SMALL, **kwargs)
    randomize(backbone.model, seed=3)
    backbone.to(device)
    block = backbone.model.blocks[LAYER]
    seen: dict = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kw):
        if seen.pop("in_layer", False):
            seen["qkv"] = (query, key, value)
        return sdpa(query, key, value, *args, **kw)

    def block_pre(module, args, kw):
        seen["tokens"], seen["rope"] = args[0], kw.get("rope")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    handles = [
        block.register_forward_pre_hook(block_pre, with_kwargs=True),
        block.attn.register_forward_pre_hook(lambda module, args: seen.update(in_layer=True)),
    ]
    images = torch.randn(1, 3, 3 * backbone.patch_size, 2 * backbone.patch_size, device=device)
    try:
        with torch.no_grad(), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            backbone.model.forward_intermediates(images, indices=[LAYER], intermediates_only=True)
            facets = [attention_facet(block, seen["tokens"], f, rope=seen["rope"]) for f in ATTENTION_FACETS]
    finally:
        for handle in handles:
            handle.remove()
    assert "qkv" in seen, "timm did not call scaled_dot_product_attention in the block"
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast is not None else dict(rtol=1e-5, atol=1e-5)
    for facet, flat, used in zip(ATTENTION_FACETS, facets, seen["qkv"], strict=True):
        assert flat.dtype == used.dtype, facet
        torch.testing.assert_close(flat, used.transpose(1, 2).flatten(2), **tolerance, msg=facet)


@requires_shared
@pytest.mark.shared
def test_real_dinov2_attention_from_facets_on_a_real_image():
    """The real DINOv2 ViT-S/14 from ../shared on a real ImageNet image, last block (float32)."""
    from featlift.images import image_to_tensor, load_image

    backbone = create_backbone(DINOV2_NAME, weights=DINOV2_WEIGHTS, facet="key", layer=-1)
    image = image_to_tensor(load_image(IMAGENET_SAMPLE / "n01440764_tench.JPEG"), (224, 224))
    images = backbone.normalize(image.unsqueeze(0))
    layer = backbone.layer
    block = backbone.model.blocks[layer]
    seen: dict = {}
    handles = [
        block.register_forward_pre_hook(
            lambda m, args, kw: seen.update(tokens=args[0], block_kwargs=kw), with_kwargs=True
        ),
        block.attn.register_forward_pre_hook(
            lambda m, args, kw: seen.update(attn_input=args[0], attn_kwargs=kw), with_kwargs=True
        ),
        block.attn.register_forward_hook(lambda m, args, out: seen.update(attn_output=out)),
    ]
    try:
        with torch.no_grad():
            backbone.model.forward_intermediates(images, indices=[layer], intermediates_only=True)
            got = attention_from_facets(block, seen)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, seen["attn_output"], rtol=1e-4, atol=1e-4)
