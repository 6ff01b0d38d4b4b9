"""Methods defined outside featlift: ``--plugin FILE.py|MODULE``, ``$FEATLIFT_PLUGINS``, and their errors."""

from __future__ import annotations

import textwrap

import pytest
from conftest import TINY_TIMM_NAME, write_images

from featlift import FeatliftError
from featlift.cli import main
from featlift.extract import load_features
from featlift.plugins import load_plugin
from featlift.upsamplers import available_upsamplers, registry

PLUGIN = textwrap.dedent(
    """
    import torch.nn.functional as F

    from featlift.upsamplers import Upsampler, register_upsampler
    from featlift.upsamplers.base import Capabilities


    @register_upsampler("{name}")
    class Nearest(Upsampler):
        capabilities = Capabilities(guide="none", output_sizes="fixed", factor=3, fitting="none")

        def forward(self, features, guide, output_size):
            return F.interpolate(features, size=output_size, mode="nearest")
    """
)


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_nearest.py"
    path.write_text(PLUGIN.format(name="plugin-nearest"))
    yield path
    registry.UPSAMPLERS.unregister("plugin-nearest")


def test_a_plugin_file_adds_a_method_to_the_command(tmp_path, plugin_file, tiny_timm_weights):
    write_images(tmp_path / "images", count=2, size=(32, 48))
    code = main(
        ["--plugin", str(plugin_file), "extract", str(tmp_path / "images"), "--upsampler", "plugin-nearest",
         "--backbone", TINY_TIMM_NAME, "--weights", str(tiny_timm_weights), "--size", "32x48",
         "--out", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    features, meta = load_features(next((tmp_path / "out").glob("*.safetensors")))
    assert features.shape[-2:] == (6, 9) and meta["upsampler"] == "plugin-nearest"  # its fixed factor 3


def test_plugins_from_the_environment_and_loading_twice(tmp_path, plugin_file, monkeypatch):
    monkeypatch.setenv("FEATLIFT_PLUGINS", str(plugin_file))
    with pytest.raises(SystemExit):  # --version exits in argparse, after the plugins were loaded
        main(["--version"])
    assert "plugin-nearest" in available_upsamplers()
    assert load_plugin(str(plugin_file)) is load_plugin(str(plugin_file))  # imported once, not re-registered


def test_bad_plugins_are_named(tmp_path, capsys):
    assert main(["--plugin", str(tmp_path / "missing.py"), "extract", "x"]) == 2
    assert "plugin " + str(tmp_path / "missing.py") + ": no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(FeatliftError, match=r"plugin .*broken.py: importing it failed \(ModuleNotFoundError"):
        load_plugin(str(broken))
    with pytest.raises(FeatliftError, match=r"plugin no_such_module_xyz: importing it failed"):
        load_plugin("no_such_module_xyz")
