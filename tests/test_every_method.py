"""The contract, checked on every method featlift ships: what one method's own tests check, for all of them at
once, so a new method that breaks the contract fails here even if its own tests forget to look.

For each registered built-in upsampler, on a small random feature map and guide:
- it builds for a backbone (`from_features`); its ``config()`` is JSON and, for a trained method (whose
  checkpoint stores it), rebuilds it;
- a trained method's ``options`` (inference-only settings) are never stored in its ``config()``;
- the output has the requested size, batch and channels at its native size and at an odd size, and is finite;
- the items of a batch are independent (item 0 of a batch of 2 equals item 0 alone);
- a trained method survives a checkpoint round trip with identical outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from featlift.checkpoint import load_checkpoint, save_checkpoint
from featlift.upsamplers import available_upsamplers, get_upsampler_class
from featlift.upsamplers.base import Upsampler

CHANNELS, PATCH, GRID = 32, 8, (3, 5)


def builtin_methods() -> list[str]:
    """Registered methods defined in featlift itself (tests register toy methods of their own)."""
    return [
        name
        for name in available_upsamplers()
        if get_upsampler_class(name).__module__.startswith("featlift.upsamplers.")
    ]


METHODS = builtin_methods()
# methods fitted per image need the backbone (fit_upsample's features_of): tests/test_featup_implicit.py runs them
RUN_DIRECTLY = [n for n in METHODS if get_upsampler_class(n).capabilities.fitting != "per-image"]


def build(name: str) -> Upsampler:
    torch.manual_seed(0)
    module = get_upsampler_class(name).from_features(CHANNELS, PATCH)
    for parameter in module.parameters():  # move trained-from-zero parts off their initial values
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    return module.eval()


def guide_for(module: Upsampler, batch: int, output_size: tuple[int, int]) -> torch.Tensor | None:
    kind = module.capabilities.guide
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(1)
    size = output_size if kind == "output" else (GRID[0] * PATCH, GRID[1] * PATCH)
    return torch.randn(batch, 3, *size, generator=generator)


def features(batch: int) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, *GRID, generator=torch.Generator().manual_seed(2))


def run(module: Upsampler, batch: int, output_size: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        return module(features(batch), guide_for(module, batch, output_size), output_size)


def test_the_builtin_methods_are_found():
    assert {"bilinear", "lift", "jafar", "anyup", "featup-jbu", "uplift", "naf", "loftup"} <= set(RUN_DIRECTLY)
    assert {"carafe", "sapa", "fade", "dysample", "featup-implicit"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_config_is_json_rebuilds_and_holds_no_options(name):
    module = build(name)
    config = module.config()
    assert json.loads(json.dumps(config)) == config
    if not module.trainable:
        return  # no checkpoint ever stores an untrained method's config
    # a checkpoint stores config(); inference-only options must not travel with the weights
    assert not set(config) & set(module.options), f"{name}: options stored in config(): {module.options}"
    rebuilt = get_upsampler_class(name)(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }


@pytest.mark.parametrize("name", RUN_DIRECTLY)
@pytest.mark.parametrize("size", ["native", (7, 9)])
def test_output_has_the_requested_shape_and_is_finite(name, size):
    module = build(name)
    output_size = module.native_output_size(GRID) if size == "native" else size
    out = run(module, 2, output_size)
    assert out.shape == (2, CHANNELS, *output_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", RUN_DIRECTLY)
def test_items_of_a_batch_are_independent(name):
    module = build(name)
    output_size = module.native_output_size(GRID)
    both = run(module, 2, output_size)
    alone = module(features(2)[:1], _first(guide_for(module, 2, output_size)), output_size)
    torch.testing.assert_close(both[:1], alone.detach(), rtol=1e-4, atol=1e-5)


def _first(guide: torch.Tensor | None) -> torch.Tensor | None:
    return None if guide is None else guide[:1]


@pytest.mark.parametrize("name", [n for n in METHODS if get_upsampler_class(n).trainable])
def test_checkpoint_round_trip_gives_the_same_output(name, tiny_backbone, tmp_path):
    backbone = tiny_backbone(patch_size=PATCH, embed_dim=CHANNELS)
    module = build(name)
    save_checkpoint(tmp_path / name, module, backbone)
    loaded, config = load_checkpoint(tmp_path / name, backbone=backbone)
    assert config.upsampler == name and type(loaded) is type(module)
    output_size = module.native_output_size(GRID)
    torch.testing.assert_close(run(loaded, 1, output_size), run(module, 1, output_size), rtol=0, atol=0)
