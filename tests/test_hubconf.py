"""hubconf.py: ``torch.hub.load(repo, "lift_dinov2_vits14", source="local")`` gives the pipeline featlift builds."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, REPO, requires_shared

import featlift
from featlift.checkpoint import read_checkpoint_config
from featlift.images import image_to_tensor, load_image
from featlift.pretrained import shipped_checkpoints

ENTRY = "lift_dinov2_vits14"
NAF_ENTRY = "naf_dinov2_vits14"


def hub_load(entry=ENTRY, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


def hubconf_module():
    """hubconf.py imported as torch.hub imports it (a module from the file's path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_entry_per_shipped_checkpoint():
    # what torch.hub.list gives (it takes GitHub repositories only): the public callables of hubconf.py
    module = hubconf_module()
    entries = [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]
    assert entries == [ENTRY, NAF_ENTRY]
    assert [read_checkpoint_config(d).upsampler for d in shipped_checkpoints()] == ["lift", "naf"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone: the LiFT warns about the weights' fingerprint
        pipeline = hub_load(pretrained=False)
    assert pipeline.checkpoint == str(shipped_checkpoints()[0])
    assert "DINOv2 ViT-S/14" in getattr(module, ENTRY).__doc__


def test_random_backbone_path_gives_the_shipped_lift(capsys):
    """The tiny path: no weights file, no download (pretrained=False), options passed through."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="fingerprint"):
        pipeline = hub_load(pretrained=False, iters=2)
    assert isinstance(pipeline, featlift.pipeline.FeaturePipeline)
    assert pipeline.backbone.name == DINOV2_NAME and pipeline.backbone.layer == 11
    assert pipeline.upsampler.iters == 2
    with torch.inference_mode():
        features = pipeline(torch.rand(1, 3, 28, 28))
    assert features.shape == (1, 384, 8, 8)
    with pytest.warns(UserWarning, match="fingerprint"):
        sized = hub_load(pretrained=False, output_size=(5, 7))
    with torch.inference_mode():
        assert sized(torch.rand(1, 3, 28, 28)).shape == (1, 384, 5, 7)


def test_dependencies_are_what_torch_hub_checks(monkeypatch):
    import importlib.util

    hubconf = hubconf_module()
    assert all(importlib.util.find_spec(name) is not None for name in hubconf.dependencies)
    # torch.hub refuses an entry whose dependencies are missing: the list is what it reads
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else object())
    with pytest.raises(RuntimeError, match="timm"):
        hub_load(pretrained=False)


@requires_shared
def test_real_weights_give_the_same_features_as_build_pipeline():
    image = image_to_tensor(load_image(IMAGENET_SAMPLE / "n01440764_tench.JPEG"), (224, 224))[None]
    from_hub = hub_load(weights=str(DINOV2_WEIGHTS))
    direct = featlift.build_pipeline(DINOV2_NAME, weights=str(DINOV2_WEIGHTS), upsampler="lift")
    with torch.inference_mode():
        hub_features, direct_features = from_hub(image), direct(image)
    assert hub_features.shape == (1, 384, 32, 32)
    torch.testing.assert_close(hub_features, direct_features, rtol=0, atol=0)
    assert from_hub.backbone.fingerprint() == direct.backbone.fingerprint() == "4da5b7fc0899f8b1"


def test_the_naf_entry_gives_the_shipped_naf():
    with pytest.warns(UserWarning, match="fingerprint"):
        pipeline = hub_load(NAF_ENTRY, pretrained=False, chunk_size=64)
    assert pipeline.checkpoint == str(shipped_checkpoints()[1])
    assert pipeline.upsampler.chunk_size == 64
    assert "DINOv2 ViT-S/14" in getattr(hubconf_module(), NAF_ENTRY).__doc__
    with torch.inference_mode():
        assert pipeline(torch.rand(1, 3, 28, 28)).shape == (1, 384, 28, 28)  # NAF's own size: the image's
        pipeline.output_size = (5, 7)
        assert pipeline(torch.rand(1, 3, 28, 28)).shape == (1, 384, 5, 7)
