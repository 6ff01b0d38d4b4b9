"""MAE-layout .pth and PaddlePaddle .pd/.pdparams checkpoints load to the original model's features;
the restricted unpickler refuses every global but numpy's array machinery, before calling it."""

from __future__ import annotations

import builtins
import io
import os
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_TIMM_NAME, write_images

from featlift import BackboneError, CheckpointError, create_backbone
from featlift.backbones import ViTBackbone, load_weights_file
from featlift.backbones.checkpoint_layouts import paddle_layout_to_timm
from featlift.cli import main
from featlift.restricted_pickle import RefusedGlobal, load_array_pickle
from featlift.weightfiles import PICKLE, TORCH, read_weights_file, weights_file_format

DEPTH = 3
LINEAR_SUFFIXES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


@pytest.fixture(scope="module")
def original():
    """A random 3-block vit_tiny (timm layout) with non-trivial norms and biases."""
    torch.manual_seed(0)
    model = timm.create_model(
        TINY_TIMM_NAME, pretrained=False, num_classes=0, depth=DEPTH, dynamic_img_size=True
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


FACETS = ("token", "query", "key", "value")


def features_of(model_or_file, layer: int = DEPTH - 1) -> dict[str, torch.Tensor]:
    """Every facet of block `layer`, of a model or of `create_backbone` loading the file."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 48)
    if isinstance(model_or_file, torch.nn.Module):
        model = model_or_file
    else:
        model = create_backbone(TINY_TIMM_NAME, weights=model_or_file, depth=DEPTH, layer=layer).model
    with torch.no_grad():
        return {facet: ViTBackbone(model, "m", layer=layer, facet=facet)(x) for facet in FACETS}


def assert_same_features(file, model) -> None:
    got, expected = features_of(file), features_of(model)
    for facet in FACETS:
        torch.testing.assert_close(got[facet], expected[facet], msg=lambda m, f=facet: f"{f}: {m}")


def mae_decoder(dim: int = 16) -> dict[str, torch.Tensor]:
    """The tensors of an MAE pre-training decoder (facebookresearch/mae key names), random."""
    return {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, 192),
        "decoder_embed.bias": torch.randn(dim),
        "decoder_pos_embed": torch.randn(1, 197, dim),
        "decoder_blocks.0.norm1.weight": torch.randn(dim),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dim, dim),
        "decoder_norm.weight": torch.randn(dim),
        "decoder_pred.weight": torch.randn(768, dim),
    }


def paddle_state(state: dict[str, torch.Tensor], records: bool) -> dict:
    """`state` as PaddlePaddle holds it: numpy arrays, Linear weights [in, out]; with `records`, each tensor
    as paddle.save writes it, a (name, array) tuple."""
    out = {}
    for index, (key, value) in enumerate(state.items()):
        array = value.detach().numpy().copy()
        if key.endswith(LINEAR_SUFFIXES) or key == "head.weight":
            array = np.ascontiguousarray(array.T)
        out[key] = (f"param_{index}", array) if records else array
    return out


def test_mae_pretraining_checkpoint_loads_to_the_original_features(original, tmp_path):
    state = dict(original.state_dict()) | mae_decoder()
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    loaded = load_weights_file(tmp_path / "mae_pretrain.pth")
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in loaded)
    assert_same_features(tmp_path / "mae_pretrain.pth", original)


def test_mae_global_pool_finetuned_checkpoint_uses_fc_norm_as_the_final_norm(original, tmp_path):
    state = dict(original.state_dict())
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    state["head.weight"], state["head.bias"] = torch.randn(1000, 192), torch.randn(1000)
    torch.save({"model": state}, tmp_path / "mae_finetuned.pth")
    assert_same_features(tmp_path / "mae_finetuned.pth", original)


@pytest.mark.parametrize(
    "protocol, records, suffix", [(4, True, ".pd"), (2, False, ".pdparams"), (3, True, ".pth")]
)
def test_paddle_checkpoint_loads_to_the_original_features(original, tmp_path, protocol, records, suffix):
    """paddle.save's training checkpoint (records, MIRL's decoders beside the encoder) and the older
    fluid.save_dygraph .pdparams (bare arrays, protocol 2); the format is told by content, not suffix."""
    state = dict(original.state_dict())
    mirl_extras = {
        "decoder_embed0.weight": torch.randn(192, 16),
        "decoder_blocks0.0.cross_attn.kv.weight": torch.randn(16, 32),
        "mask_token0": torch.randn(1, 1, 16),
        "norm_low.weight": torch.randn(192),
        "norm3.bias": torch.randn(192),
    }
    model_state = paddle_state(state | mirl_extras, records)
    if records:
        checkpoint = {
            "model": model_state,
            "optimizer": {"blocks.0.mlp.fc1.weight_moment1_0": ("m", np.zeros((2, 2), np.float32))},
            "epoch": 799,
            "scaler": {"scale": np.float32(65536.0), "incr_count": np.int64(3)},
        }
    else:
        checkpoint = model_state | {"StructuredToParameterName@@": {"norm.weight": "layer_norm_0.w_0"}}
    path = tmp_path / f"checkpoint-799{suffix}"
    path.write_bytes(pickle.dumps(checkpoint, protocol=protocol))
    assert weights_file_format(path) == PICKLE
    loaded = load_weights_file(path)
    assert set(loaded) == set(state)
    for key in state:
        assert loaded[key].dtype == state[key].dtype and loaded[key].shape == state[key].shape, key
    assert_same_features(path, original)


def test_paddle_linear_weights_are_chosen_by_name_not_by_being_2d():
    """A 2-D embedding is left alone, a square Linear weight is transposed, an unknown 2-D weight refused."""
    embedding = np.arange(20, dtype=np.float32).reshape(5, 4)
    proj = np.arange(16, dtype=np.float32).reshape(4, 4)
    qkv = np.arange(48, dtype=np.float32).reshape(4, 12)  # Paddle [in, out]
    loaded = {
        "pos_embed": embedding,
        "cls_token": ("cls", np.ones((1, 4), np.float32)),
        "blocks.0.attn.proj.weight": proj,
        "blocks.0.attn.qkv.weight": qkv,
        "patch_embed.proj.weight": np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2),
    }
    out = paddle_layout_to_timm(loaded, "test file")
    assert torch.equal(out["pos_embed"], torch.from_numpy(embedding))
    assert torch.equal(out["cls_token"], torch.ones(1, 4))
    assert torch.equal(out["blocks.0.attn.proj.weight"], torch.from_numpy(proj).T)
    assert out["blocks.0.attn.qkv.weight"].shape == (12, 4)
    assert torch.equal(out["patch_embed.proj.weight"], torch.from_numpy(loaded["patch_embed.proj.weight"]))
    with pytest.raises(
        BackboneError,
        match=r"test file: 2-D weights of modules featlift does not know: blocks\.0\.adapter\.weight",
    ):
        paddle_layout_to_timm(loaded | {"blocks.0.adapter.weight": proj}, "test file")
    with pytest.raises(BackboneError, match=r"test file: entry 'epoch_count' is a str, not an array"):
        paddle_layout_to_timm({"model": loaded | {"epoch_count": "7"}}, "test file")


def test_paddle_bfloat16_stored_as_uint16_is_read_as_bfloat16():
    values = torch.tensor([1.5, -2.0, 0.15625], dtype=torch.bfloat16)
    stored = values.view(torch.int16).numpy().view(np.uint16)  # what Paddle's tensor.numpy() gives for bf16
    out = paddle_layout_to_timm({"norm.weight": stored}, "bf16 file")
    assert out["norm.weight"].dtype == torch.bfloat16 and torch.equal(out["norm.weight"], values)


def test_weights_file_format_tells_torch_legacy_from_plain_pickles(tmp_path):
    for protocol in (2, 3, 4, 5):
        torch.save(
            {"a": torch.ones(1)},
            tmp_path / f"legacy{protocol}.pt",
            pickle_protocol=protocol,
            _use_new_zipfile_serialization=False,
        )
        assert weights_file_format(tmp_path / f"legacy{protocol}.pt") == TORCH, protocol
        (tmp_path / f"plain{protocol}.pt").write_bytes(pickle.dumps({"a": np.ones(1)}, protocol=protocol))
        assert weights_file_format(tmp_path / f"plain{protocol}.pt") == PICKLE, protocol
    assert torch.equal(
        load_weights_file(tmp_path / "legacy2.pt")["a"], torch.ones(1)
    )  # (torch cannot load 4)


def test_only_backbone_weights_read_plain_pickles(tmp_path):
    (tmp_path / "x.pdparams").write_bytes(pickle.dumps({"a": np.ones(2, np.float32)}, protocol=4))
    with pytest.raises(
        CheckpointError, match=r"x.pdparams: a plain pickle .*only backbone weights \(--weights\)"
    ):
        read_weights_file(tmp_path / "x.pdparams", CheckpointError, what="checkpoint")


# --- malicious pickles ---------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling calls open(target, "w"): it creates the file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


class EvalsCode:
    """Like paddle.save's LoDTensor record (eval), but with a payload that creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (eval, (f"open({self.target!r}, 'w')",))


class RunsShell:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [CreatesFile, EvalsCode, RunsShell])
@pytest.mark.parametrize("suffix", [".pdparams", ".pd", ".pth"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, payload, suffix):
    target = tmp_path / "pwned"
    weights = {"cls_token": np.zeros((1, 1, 192), np.float32)}
    for protocol in (2, 4):
        path = tmp_path / f"evil{protocol}{suffix}"
        path.write_bytes(pickle.dumps({"model": weights | {"x": payload(target)}}, protocol=protocol))
        with pytest.raises(
            BackboneError, match=rf"evil{protocol}\{suffix}: refused global [\w.]+\.(open|eval|system)"
        ):
            load_weights_file(path)
        with pytest.raises(RefusedGlobal):
            load_array_pickle(path)
        assert not target.exists()


def test_malicious_object_in_torch_files_is_refused_and_never_runs(tmp_path):
    """torch.save files (zip and legacy) go through torch.load(weights_only=True), which refuses too."""
    target = tmp_path / "pwned"
    torch.save({"model": {"a": torch.zeros(1)}, "x": CreatesFile(target)}, tmp_path / "evil_zip.pth")
    torch.save({"x": RunsShell(target)}, tmp_path / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("evil_zip.pth", "evil_legacy.pth"):
        with pytest.raises(BackboneError, match=name):
            load_weights_file(tmp_path / name)
        assert not target.exists()


def test_malicious_pickle_through_the_cli_is_refused(tmp_path, capsys):
    target = tmp_path / "pwned"
    (tmp_path / "evil.pdparams").write_bytes(pickle.dumps({"x": CreatesFile(target)}, protocol=4))
    write_images(tmp_path / "images", count=1)
    code = main(
        [
            "-q",
            "extract",
            str(tmp_path / "images"),
            "--backbone",
            TINY_TIMM_NAME,
            "--weights",
            str(tmp_path / "evil.pdparams"),
            "--upsampler",
            "bilinear",
            "--size",
            "32x48",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "refused global" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "out").exists()


def test_numpy_globals_are_admitted_only_for_plain_arrays_and_numeric_scalars(tmp_path):
    ok = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "n": np.int64(5), "f": np.float32(0.5)}
    loaded = load_array_pickle(_write(tmp_path / "ok.pkl", ok))
    assert np.array_equal(loaded["a"], ok["a"]) and loaded["n"] == 5 and loaded["f"] == np.float32(0.5)
    with pytest.raises(pickle.UnpicklingError, match="object"):
        load_array_pickle(_write(tmp_path / "objects.pkl", {"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(RefusedGlobal, match=r"refused global numpy\.ma\.core\._mareconstruct"):
        load_array_pickle(_write(tmp_path / "masked.pkl", {"a": np.ma.masked_array([1.0, 2.0])}))
    with pytest.raises(RefusedGlobal, match=r"refused global collections\.OrderedDict"):
        load_array_pickle(_write(tmp_path / "ordered.pkl", __import__("collections").OrderedDict(a=1)))


def _write(path, obj, protocol: int = 4):
    buffer = io.BytesIO()
    pickle.dump(obj, buffer, protocol=protocol)
    path.write_bytes(buffer.getvalue())
    return path


def test_protocol_2_bytes_are_decoded_with_latin1_only(tmp_path):
    """Protocol 2 stores bytes as _codecs.encode(text, "latin1"): that codec is admitted, no other."""
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R.")
    assert load_array_pickle(path) == b"abc"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00utf-8\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="refused _codecs.encode with encoding 'utf-8'"):
        load_array_pickle(path)


def test_object_arrays_are_refused_even_if_their_dtype_got_through(tmp_path, monkeypatch):
    """The second guard: an object array that the dtype check did not stop is refused after loading."""
    import featlift.restricted_pickle as restricted

    monkeypatch.setitem(restricted.ADMITTED_GLOBALS, ("numpy", "dtype"), np.dtype)
    path = _write(tmp_path / "objects.pkl", {"a": [np.array([1, "x"], dtype=object)]})
    with pytest.raises(pickle.UnpicklingError, match="refused numpy array of dtype object"):
        load_array_pickle(path)


def test_a_safetensors_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 0x280 bytes starts the file with 80 02, the bytes of a protocol-2 pickle."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    for pad in range(0, 700):
        save_file({"norm.weight": torch.ones(3)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert weights_file_format(path) == "safetensors"
    assert torch.equal(load_weights_file(path)["norm.weight"], torch.ones(3))
