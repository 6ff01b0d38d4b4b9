"""The explorer page in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download).

The page loads with no console error; a click on a known point gives, for every variant, a similarity map
whose maximum is at the cell under the point (read from the page's result, from its JavaScript's map, which
must equal the cosine similarity of the decoded codes computed here, and from the canvas pixels); the other
image can be switched to; a screenshot is saved in the test's tmp dir. Skips, saying why, only when Playwright
or the browser cannot be found (.ci/run installs both).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_explorer import decoded_cells, explore, page_data

from featlift.explorer import cosine_maps

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    explicit = os.environ.get("FEATLIFT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright (pip install -e '.[dev]') is not installed"
    )
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install -y chromium; or set FEATLIFT_CHROMIUM=PATH)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_file(tmp_path_factory, tiny_timm_weights):
    from PIL import Image
    from skimage import data as skdata

    folder = tmp_path_factory.mktemp("explorer")
    chelsea, coffee = folder / "chelsea.jpg", folder / "coffee.png"
    Image.fromarray(skdata.chelsea()).save(chelsea)  # 451x300: a swapped x/y would show
    Image.fromarray(skdata.coffee()[:, :400]).save(coffee)
    out = folder / "explore.html"
    assert explore([chelsea, coffee], tiny_timm_weights, out, "--variant", "none,bilinear,input-2x") == 0
    return out


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    problems = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(path.as_uri())
    page.wait_for_function("window.featliftExplorer && window.featliftExplorer.ready")
    return page, problems


def canvas_pixel(page, element_id, row, col):
    return page.evaluate(
        "([id, r, c]) => Array.from(document.getElementById(id).getContext('2d').getImageData(c, r, 1, 1).data)",
        [element_id, row, col],
    )


def test_click_gives_similarity_maps_peaking_at_the_point(browser, page_file, tmp_path):
    data = page_data(page_file.read_text())
    lut = np.frombuffer(base64.b64decode(data["lut"]), dtype=np.uint8).reshape(256, 3)
    page, problems = open_page(browser, page_file)
    image = data["images"][0]
    width, height = image["size"]
    point = (300.0, 90.0)  # pixels of the 451x300 photo: right of centre, near the top

    box = page.locator("#photo").bounding_box()
    page.mouse.click(box["x"] + point[0] / width * box["width"], box["y"] + point[1] / height * box["height"])
    result = page.evaluate("window.featliftExplorer.result()")
    assert result is not None and len(result["variants"]) == 3

    for index, (variant, shown) in enumerate(zip(image["variants"], result["variants"], strict=True)):
        rows, cols = variant["grid"]
        cell = [int(point[1] / height * rows), int(point[0] / width * cols)]
        assert shown["label"] == variant["label"] and shown["grid"] == [rows, cols]
        assert shown["queryCell"] == cell and shown["argmax"] == cell
        assert shown["max"] == pytest.approx(1.0, abs=1e-5)
        # the browser's map is the cosine similarity of the decoded codes
        in_browser = np.array(page.evaluate(f"window.featliftExplorer.similarity({index})"))
        here = cosine_maps(decoded_cells(variant), np.array([cell[0] * cols + cell[1]]))[0]
        assert np.abs(in_browser - here).max() < 1e-5
        # the canvas shows it: the clicked cell in the colour map's top colour, the row's minimum at its bottom
        assert canvas_pixel(page, f"sim-{index}", *cell)[:3] == lut[255].tolist()
        if shown["min"] == result["scaleLow"]:
            low = int(np.argmin(in_browser))
            assert canvas_pixel(page, f"sim-{index}", low // cols, low % cols)[:3] == lut[0].tolist()
    assert result["scaleHigh"] == pytest.approx(1.0, abs=1e-5)
    assert "pinned" in page.inner_text("#status")

    # pinned: moving the pointer elsewhere changes nothing
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    assert page.evaluate("window.featliftExplorer.result()")["u"] == result["u"]

    # a click on a variant's panel queries the same place of the image
    panel = page.locator("#sim-2").bounding_box()
    page.mouse.click(panel["x"] + 0.1 * panel["width"], panel["y"] + 0.8 * panel["height"])
    moved = page.evaluate("window.featliftExplorer.result()")
    assert moved["variants"][2]["queryCell"] == moved["variants"][2]["argmax"] == [6, 0]  # 8x8 grid

    # the PCA views decode to pictures of each grid; the embedded table is shown
    for index, variant in enumerate(image["variants"]):
        natural = page.evaluate(f"[document.getElementById('pca-{index}').naturalHeight, "
                                f"document.getElementById('pca-{index}').naturalWidth]")  # fmt: skip
        assert natural == variant["grid"]
    assert "192 channels" in page.inner_text("#embedded")

    # image switching
    page.get_by_role("button", name="coffee.png").click()
    assert page.evaluate("window.featliftExplorer.image()") == 1
    box = page.locator("#photo").bounding_box()
    page.mouse.click(box["x"] + 0.9 * box["width"], box["y"] + 0.3 * box["height"])
    switched = page.evaluate("window.featliftExplorer.result()")
    assert [v["argmax"] for v in switched["variants"]] == [[1, 3], [2, 7], [2, 7]]

    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert problems == []
    page.close()
