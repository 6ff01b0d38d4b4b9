#!/usr/bin/env bash
# CI: build featlift's wheel (python -m build: sdist, then the wheel from it), install that wheel -- not the
# checkout -- into a fresh virtual environment, and run `featlift extract` with it on ../shared's images.
#
# Installing torch & co. into a fresh venv would download ~5 GB; instead the fresh venv sees the project venv's
# packages through a .pth file added *after* the wheel is installed (so pip installs the wheel instead of
# finding the project's editable featlift). A line in a .pth file only adds its folder to sys.path: the
# editable install's own .pth (which points at the checkout) is not processed, so `import featlift` can only
# find the wheel's copy, which the script checks.
#
# Environment: PROJECT_PYTHON (default .venv/bin/python, the venv .ci/run makes; needs `build`, a dev
# dependency), SHARED (default ../shared), WHEEL_CHECK_IMAGES (how many images to extract; default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROJECT_PYTHON=${PROJECT_PYTHON:-$ROOT/.venv/bin/python}
SHARED=${SHARED:-$ROOT/../shared}
IMAGES=${WHEEL_CHECK_IMAGES:-16}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/featlift-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "wheel_check: [$((SECONDS - start)) s] $*"; }

step "building the wheel from a copy of pyproject.toml, README.md, LICENSE, src/"
mkdir -p "$WORK/project"
cp pyproject.toml README.md LICENSE "$WORK/project/"
tar --exclude=__pycache__ --exclude='*.egg-info' -cf - src | tar -xf - -C "$WORK/project"
"$PROJECT_PYTHON" -m build --no-isolation --outdir "$WORK/dist" "$WORK/project" > "$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/featlift-*-py3-none-any.whl)
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

step "installing it into a fresh venv"
"$PROJECT_PYTHON" -m venv --without-pip "$WORK/venv"  # the project's pip installs into it: no ensurepip (~30 s)
"$PROJECT_PYTHON" -m pip --python "$WORK/venv/bin/python" install --quiet --no-deps --no-index "$WHEEL"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PROJECT_PYTHON" -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])" |
    sort -u > "$SITE/zz_project_dependencies.pth"

cd "$WORK"  # nothing of the checkout on sys.path
"$WORK/venv/bin/python" - "$SITE" <<'PY'
import sys
from pathlib import Path

import featlift
from featlift.pretrained import shipped_checkpoints

site = Path(sys.argv[1]).resolve()
where = Path(featlift.__file__).resolve()
assert site in where.parents, f"featlift was imported from {where}, not from the wheel in {site}"
assert (where.parent / "py.typed").is_file(), "py.typed is missing"
assert shipped_checkpoints(), "no shipped checkpoint in the installed wheel"
print(f"wheel_check: featlift {featlift.__version__} imported from {where.parent}")
PY
step "installed and imported"

WEIGHTS=$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors
DATA=$SHARED/data/imagenet-sample
if [[ ! -f $WEIGHTS || ! -d $DATA ]]; then
    "$WORK/venv/bin/featlift" --version  # the console script works
    step "SKIPPED featlift extract: $WEIGHTS or $DATA not found (../shared is absent)"
    exit 0
fi
mapfile -t PICKED < <(find "$DATA" -maxdepth 1 -type f -iname '*.jpeg' | sort | head -n "$IMAGES")
step "featlift extract (the wheel's) on ${#PICKED[@]} images of $DATA"
"$WORK/venv/bin/featlift" -q extract "${PICKED[@]}" --weights "$WEIGHTS" --out "$WORK/features"
"$WORK/venv/bin/python" - "$WORK/features" "${#PICKED[@]}" "$SITE" <<'PY'
import sys
from pathlib import Path

from safetensors import safe_open

folder, expected, site = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]).resolve()
files = sorted(folder.glob("*.safetensors"))
assert len(files) == expected, f"{len(files)} feature files in {folder}, expected {expected}"
for path in files:
    with safe_open(str(path), "pt") as handle:
        features, meta = handle.get_tensor("features"), handle.metadata()
    assert tuple(features.shape) == (384, 32, 32), f"{path}: features {tuple(features.shape)}"
    assert features.isfinite().all(), f"{path}: non-finite features"
    assert site in Path(meta["checkpoint"]).resolve().parents, f"{path}: checkpoint {meta['checkpoint']}"
print(f"wheel_check: {len(files)} feature maps [384, 32, 32] made with the wheel's shipped LiFT")
PY
step "done"
