"""Checkpoints on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REV]`` downloads, cache, offline, errors; push-to-hub.

Downloads go through the real ``huggingface_hub.hf_hub_download`` against `FakeHub`, a local HTTP server on
127.0.0.1 that answers the requests it makes (``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with the
``X-Repo-Commit`` and ``ETag`` headers, and the hub's ``X-Error-Code`` on a 404). Uploads are checked at the
``HfApi`` boundary (`RecordingApi` stands in for ``HfApi``): the upload protocol (preupload, LFS/Xet, commit
NDJSON) is huggingface_hub's own and changes between its versions, while what featlift decides (which repo,
branch, visibility, files and bytes) is all in the calls it makes. The round-trip test then serves exactly the
files such a push committed and loads them back through ``hf-hub:``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TIMM_NAME, write_images

import featlift
from featlift import CheckpointError, create_backbone
from featlift.checkpoint import read_checkpoint_config, save_checkpoint
from featlift.cli import main
from featlift.hub import HubReference, download_checkpoint, parse_hub_reference, push_checkpoint
from featlift.model_card import CARD_MARKER, model_card
from featlift.upsamplers import LiFT


class FakeHub:
    """A hub-shaped file server: repos with branches and commits, each commit a dict of file bytes."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.corrupt: dict[
            tuple[str, str], bytes
        ] = {}  # (repo, file) -> bytes served instead of the real ones

    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        listing = repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())) + branch
        commit = hashlib.sha1(listing.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["refs"][branch] = commit
        repo["commits"][commit] = dict(files)
        return commit

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.resolve(send_body=False)

            def do_GET(self):
                self.resolve(send_body=True)

            def resolve(self, send_body):
                hub.requests.append((self.command, self.path))
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                repo = hub.repos.get(match.group(1)) if match else None
                if repo is None:
                    return self.error("RepoNotFound")
                repo_id, revision, filename = match.groups()
                commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
                if commit is None:
                    return self.error("RevisionNotFound")
                files = repo["commits"][commit]
                if filename not in files:
                    return self.error("EntryNotFound")
                body = hub.corrupt.get((repo_id, filename), files[filename])
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(files[filename]).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def error(self, code):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    torch.manual_seed(0)
    lift = LiFT(backbone.channels, backbone.patch_size)
    for parameter in lift.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    save_checkpoint(tmp_path / "ckpt", lift.eval(), backbone, training={"epochs": 1})
    return tmp_path / "ckpt", backbone, lift.eval()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running `FakeHub`, with HF_ENDPOINT pointing at it and an empty hub cache (HF_HUB_CACHE)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_references_parse_and_bad_ones_are_refused():
    assert parse_hub_reference("hf-hub:org/name") == HubReference("org/name", None)
    assert parse_hub_reference("hf-hub:org/na.me-1@v1.0") == HubReference("org/na.me-1", "v1.0")
    assert str(parse_hub_reference("hf-hub:org/name@abc")) == "hf-hub:org/name@abc"
    for bad, message in [
        ("hf-hub:name", "expected ORG/NAME"),
        ("hf-hub:org/na/me", "expected ORG/NAME"),
        ("hf-hub:org/-name", "expected ORG/NAME"),
        ("hf-hub:org/name@", "empty revision"),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            parse_hub_reference(bad)
        assert bad in str(info.value)


def test_load_checkpoint_downloads_caches_and_works_offline(hub, tiny_checkpoint, monkeypatch):
    directory, backbone, lift = tiny_checkpoint
    commit = hub.add("org/tiny-lift", checkpoint_files(directory))
    loaded, config = featlift.load_checkpoint("hf-hub:org/tiny-lift", backbone=backbone)
    features, image = torch.randn(1, backbone.channels, 3, 3), torch.rand(1, 3, 48, 48)
    torch.testing.assert_close(loaded(features, image, (6, 6)), lift(features, image, (6, 6)))
    assert config.training == {"epochs": 1}
    # both files from the commit `main` resolved to, into the hub's own cache layout
    resolved = [path for method, path in hub.requests if method == "GET"]
    assert resolved == [
        "/org/tiny-lift/resolve/main/config.json",
        f"/org/tiny-lift/resolve/{commit}/model.safetensors",
    ]
    snapshot = download_checkpoint("hf-hub:org/tiny-lift")
    assert snapshot.parts[-3:] == ("models--org--tiny-lift", "snapshots", commit)
    # offline: no request reaches the server, the cache answers
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded_offline, _ = featlift.load_checkpoint("hf-hub:org/tiny-lift", backbone=backbone)
    assert hub.requests == []
    torch.testing.assert_close(loaded_offline(features, image, (6, 6)), lift(features, image, (6, 6)))
    assert download_checkpoint(f"hf-hub:org/tiny-lift@{commit}") == snapshot
    # offline and never downloaded: a clear error naming the repo and the file
    with pytest.raises(
        CheckpointError, match=r"hf-hub:org/other: config.json is not in the hub cache .*offline"
    ):
        featlift.load_checkpoint("hf-hub:org/other")


def test_revisions_select_the_commit(hub, tiny_checkpoint, tmp_path, tiny_backbone):
    directory, backbone, _ = tiny_checkpoint
    hub.add("org/tiny-lift", checkpoint_files(directory))
    other_lift = LiFT(backbone.channels, backbone.patch_size, output_scale=0.5)
    save_checkpoint(tmp_path / "v2", other_lift, backbone)
    commit_v2 = hub.add("org/tiny-lift", checkpoint_files(tmp_path / "v2"), branch="v2")
    _, main_config = featlift.load_checkpoint("hf-hub:org/tiny-lift")
    _, v2_config = featlift.load_checkpoint("hf-hub:org/tiny-lift@v2")
    _, by_commit = featlift.load_checkpoint(f"hf-hub:org/tiny-lift@{commit_v2}")
    assert main_config.upsampler_args["output_scale"] == 1.0
    assert v2_config.upsampler_args["output_scale"] == 0.5 == by_commit.upsampler_args["output_scale"]


def test_wrong_repo_revision_or_file_name_what_is_missing(hub, tiny_checkpoint):
    directory, _, _ = tiny_checkpoint
    files = checkpoint_files(directory)
    hub.add("org/tiny-lift", files)
    hub.add("org/no-weights", {"config.json": files["config.json"]})
    with pytest.raises(
        CheckpointError, match=r"hf-hub:org/nope: no repository org/nope on http://127\.0\.0\.1"
    ):
        featlift.load_checkpoint("hf-hub:org/nope")
    with pytest.raises(
        CheckpointError, match=r"hf-hub:org/tiny-lift@v9: repository org/tiny-lift has no revision 'v9'"
    ):
        featlift.load_checkpoint("hf-hub:org/tiny-lift@v9")
    with pytest.raises(
        CheckpointError,
        match=r"hf-hub:org/no-weights: repository org/no-weights has no file model\.safetensors",
    ):
        featlift.load_checkpoint("hf-hub:org/no-weights")


def test_corrupt_download_is_refused_and_dropped_from_the_cache(hub, tiny_checkpoint):
    directory, _, _ = tiny_checkpoint
    files = checkpoint_files(directory)
    hub.add("org/tiny-lift", files)
    flipped = bytearray(files["model.safetensors"])
    flipped[-1] ^= 0x01  # same length, one bit off: only the SHA-256 can tell
    hub.corrupt[("org/tiny-lift", "model.safetensors")] = bytes(flipped)
    with pytest.raises(CheckpointError) as info:
        featlift.load_checkpoint("hf-hub:org/tiny-lift")
    message = str(info.value)
    assert message.startswith("hf-hub:org/tiny-lift: the downloaded model.safetensors has sha256")
    assert hashlib.sha256(flipped).hexdigest() in message
    assert read_checkpoint_config(directory).weights_sha256 in message
    # the bad file is not kept: once the server is right again, the next load downloads and succeeds
    del hub.corrupt[("org/tiny-lift", "model.safetensors")]
    featlift.load_checkpoint("hf-hub:org/tiny-lift")


def test_config_without_hash_or_not_valid_is_refused(hub, tiny_checkpoint):
    directory, _, _ = tiny_checkpoint
    files = checkpoint_files(directory)
    config = json.loads(files["config.json"])
    del config["weights_sha256"]
    hub.add("org/unhashed", {**files, "config.json": json.dumps(config).encode()})
    hub.add("org/broken", {**files, "config.json": b"{not json"})
    with pytest.raises(CheckpointError, match=r"hf-hub:org/unhashed: config\.json records no weights_sha256"):
        featlift.load_checkpoint("hf-hub:org/unhashed")
    with pytest.raises(
        CheckpointError, match=r"hf-hub:org/broken: config\.json is not a valid featlift checkpoint"
    ):
        featlift.load_checkpoint("hf-hub:org/broken")


def test_unreachable_hub_without_cache_names_repo_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FakeHub() as server:
        url = server.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    # huggingface_hub retries 5 times with back-off (23 s of sleep) before it gives up on an uncached file
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None, raising=False)
    with pytest.raises(CheckpointError, match=r"hf-hub:org/tiny-lift: config\.json is not in the hub cache"):
        featlift.load_checkpoint("hf-hub:org/tiny-lift")


def test_extract_cli_takes_a_hub_checkpoint(hub, tmp_path, tiny_timm_weights, monkeypatch):
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size), backbone)
    hub.add("org/tiny-lift", checkpoint_files(tmp_path / "ckpt"))
    write_images(tmp_path / "images", count=1, size=(32, 32))
    argv = [
        "extract",
        str(tmp_path / "images"),
        "--backbone",
        TINY_TIMM_NAME,
        "--weights",
        str(tiny_timm_weights),
    ]
    argv += ["--size", "32", "--checkpoint", "hf-hub:org/tiny-lift", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    (output,) = (tmp_path / "out").glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(output), "pt") as handle:
        assert handle.metadata()["checkpoint"] == "hf-hub:org/tiny-lift"
        assert handle.get_tensor("features").shape == (192, 4, 4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*argv[:-4], "--checkpoint", "hf-hub:org/missing", "--out", str(tmp_path / "out2")]) == 2


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records each call and keeps the committed files' bytes."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.committed: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", (repo_id,), kwargs))
        for op in operations:
            source = op.path_or_fileobj
            self.committed[op.path_in_repo] = (
                source if isinstance(source, bytes) else Path(source).read_bytes()
            )
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()


def test_push_commits_the_checkpoint_and_card_then_loads_back(hub, tiny_checkpoint):
    directory, backbone, lift = tiny_checkpoint
    api = RecordingApi()
    result = push_checkpoint(directory, "org/pushed", "card text", private=True, revision="v1", api=api)
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1:] == (("org/pushed",), {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][2]["branch"] == "v1" and api.calls[1][2]["exist_ok"] is True
    assert api.calls[2][2]["revision"] == "v1"
    assert api.committed == {**checkpoint_files(directory), "README.md": b"card text"}
    assert result.files == ("config.json", "model.safetensors", "README.md") and result.revision == "v1"
    # not private and no revision: visibility left to the hub, no branch made
    push_checkpoint(directory, "org/pushed", "card", api=(plain := RecordingApi()))
    assert [name for name, _, _ in plain.calls] == ["create_repo", "create_commit"]
    assert plain.calls[0][2]["private"] is None and plain.calls[1][2]["revision"] is None
    # what was committed is a checkpoint featlift loads from the hub
    hub.add("org/pushed", api.committed, branch="v1")
    loaded, _ = featlift.load_checkpoint("hf-hub:org/pushed@v1", backbone=backbone)
    features, image = torch.randn(1, backbone.channels, 3, 3), torch.rand(1, 3, 48, 48)
    torch.testing.assert_close(loaded(features, image, (6, 6)), lift(features, image, (6, 6)))


def eval_results(folder: Path, task: str = "warp") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task,
        "settings": {"data": "images"},
        "results": [
            {
                "variant": "bilinear",
                "metrics": {"PCK@0.1": 40.25},
                "ms_per_image": 1.5,
                "peak_memory_mib": 3.0,
            },
            {"variant": "lift", "metrics": {"PCK@0.1": 47.125}, "ms_per_image": 2.5, "peak_memory_mib": 4.0},
        ],
    }
    (folder / "results.json").write_text(json.dumps(payload))
    return folder / "results.json"


def test_model_card_header_and_contents(tiny_checkpoint, tmp_path):
    directory, backbone, _ = tiny_checkpoint
    config = read_checkpoint_config(directory)
    config.training = {
        "command": "featlift train IMAGES --out RUN",
        "resumed_with": ["featlift train IMAGES --out RUN --resume"],
        "args": {"images": "/data/imagenet-sample"},
        "images": 700,
        "val": [{"epoch": 0, "train_loss": 0.25, "val_cosine_lift": 0.91629, "val_cosine_bilinear": 0.90931}],
    }
    from featlift.model_card import read_results

    card = model_card(config, "org/tiny-lift", "Apache-2.0", [read_results(eval_results(tmp_path / "warp"))])
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {
        "license": "apache-2.0",
        "library_name": "featlift",
        "pipeline_tag": "image-feature-extraction",
        "tags": ["featlift", "feature-upsampling", "vision-transformer", "lift"],
    }  # no base_model: the tiny test backbone is not a timm model
    assert CARD_MARKER in card
    row = f"| `{backbone.name}` | {backbone.layer} | token | {backbone.channels} | 16 | `{backbone.fingerprint()}` |"
    assert row in card
    assert config.weights_sha256 in card
    assert "`/data/imagenet-sample`" in card and "700 images" in card
    assert "featlift train IMAGES --out RUN\nfeatlift train IMAGES --out RUN --resume" in card
    assert "| 0 | 0.25 | 0.9163 | 0.9093 |" in card
    assert "### warp" in card and "| `lift` | 47.12 | 2.5 | 4 |" in card
    assert "--checkpoint hf-hub:org/tiny-lift --out" in card
    # a timm backbone is the card's base_model (the hub repo timm takes its weights from); a branch is in the commands
    from featlift.pretrained import shipped_checkpoints

    shipped = read_checkpoint_config(shipped_checkpoints()[0])
    card = model_card(shipped, "org/lift", "MIT", revision="v2")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "timm/vit_small_patch14_dinov2.lvd142m"
    assert "--checkpoint hf-hub:org/lift@v2 --out" in card and 'load_checkpoint("hf-hub:org/lift@v2"' in card


def test_push_to_hub_dry_run_writes_the_card_and_lists_the_files(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    directory, backbone, _ = tiny_checkpoint
    eval_results(directory / "eval-warp")
    extra = eval_results(tmp_path / "elsewhere", task="davis")

    def refuse_upload(*args, **kwargs):
        raise AssertionError("a dry run must not upload")

    monkeypatch.setattr("featlift.commands.push_to_hub.push_checkpoint", refuse_upload)
    argv = ["push-to-hub", str(directory), "org/tiny-lift", "--dry-run", "--results", str(extra)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dry run, nothing uploaded; would upload to org/tiny-lift@main" in out
    for name in ("config.json", "model.safetensors", "README.md"):
        assert f"  {name}  " in out
    card = (directory / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "mit"  # pyproject.toml's license
    assert "### warp" in card and "### davis" in card
    assert main([*argv, "--license", "cc-by-4.0"]) == 0  # its own card is replaced
    assert 'license: "cc-by-4.0"' in (directory / "README.md").read_text()
    # a README.md that featlift did not write is never overwritten
    (directory / "README.md").write_text("my notes")
    assert main(argv) == 2
    assert "was not written by featlift push-to-hub" in capsys.readouterr().err
    assert (directory / "README.md").read_text() == "my notes"


def test_push_to_hub_cli_uploads_through_hfapi(tiny_checkpoint, monkeypatch, capsys):
    directory, _, _ = tiny_checkpoint
    api = RecordingApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kwargs: api)
    assert main(["push-to-hub", str(directory), "org/tiny-lift", "--private", "--revision", "dev"]) == 0
    assert (
        "uploaded config.json, model.safetensors, README.md to org/tiny-lift@dev" in capsys.readouterr().out
    )
    assert api.calls[0][2]["private"] is True and api.calls[2][2]["revision"] == "dev"
    assert api.committed["model.safetensors"] == (directory / "model.safetensors").read_bytes()
    assert api.committed["README.md"].decode().startswith('---\nlicense: "mit"')


def test_push_to_hub_refuses_bad_input(tiny_checkpoint, tmp_path, capsys):
    directory, _, _ = tiny_checkpoint
    assert main(["push-to-hub", str(directory), "no-slash", "--dry-run"]) == 2
    assert "'no-slash' is not a hub repository id: expected ORG/NAME" in capsys.readouterr().err
    assert main(["push-to-hub", str(tmp_path / "nothing"), "org/x", "--dry-run"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert (
        main(["push-to-hub", str(directory), "org/x", "--dry-run", "--results", str(tmp_path / "bad.json")])
        == 2
    )
    assert "bad.json: not a featlift results.json" in capsys.readouterr().err
    # a checkpoint whose weights do not match its config is never pushed
    (directory / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes()[:-1] + b" ")
    assert main(["push-to-hub", str(directory), "org/x", "--dry-run"]) == 2
    assert "different saves" in capsys.readouterr().err


def test_the_shipped_lift_served_by_a_hub_loads_bitwise_equal(hub):
    from featlift.pretrained import shipped_checkpoints

    shipped = shipped_checkpoints()[0]
    hub.add("org/shipped-lift", checkpoint_files(shipped))  # 4.7 MB of weights through the HTTP path
    from_hub, hub_config = featlift.load_checkpoint("hf-hub:org/shipped-lift")
    local, local_config = featlift.load_checkpoint(shipped)
    assert hub_config.to_json() == local_config.to_json()
    hub_state, local_state = from_hub.state_dict(), local.state_dict()
    assert hub_state.keys() == local_state.keys()
    assert all(torch.equal(hub_state[k], local_state[k]) for k in local_state)


def test_push_failure_names_the_repo_and_step(tiny_checkpoint):
    import httpx2  # huggingface_hub's HTTP client (2.x): its errors carry the response
    from huggingface_hub.utils import HfHubHTTPError

    class Forbidden(RecordingApi):
        def create_commit(self, repo_id, operations, **kwargs):
            response = httpx2.Response(403, request=httpx2.Request("POST", "http://127.0.0.1/api/commit"))
            raise HfHubHTTPError("403 Forbidden: no write access", response=response)

    directory, _, _ = tiny_checkpoint
    with pytest.raises(featlift.FeatliftError, match=r"push to org/x: uploading failed: 403 Forbidden"):
        push_checkpoint(directory, "org/x", "card", api=Forbidden())


def test_offline_from_process_start(hub, tiny_checkpoint, tmp_path):
    """``HF_HUB_OFFLINE=1 featlift ...``: huggingface_hub imported in offline mode, the hub gone, the cache answers."""
    import os
    import subprocess
    import sys

    directory, _, _ = tiny_checkpoint
    hub.add("org/tiny-lift", checkpoint_files(directory))
    snapshot = download_checkpoint("hf-hub:org/tiny-lift")
    hub.__exit__()  # nothing listens any more
    code = (
        "import featlift, sys; module, config = featlift.load_checkpoint(sys.argv[1]); "
        "print(config.weights_sha256, module.channels)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(featlift.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code, "hf-hub:org/tiny-lift"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [read_checkpoint_config(snapshot).weights_sha256, "32"]
