"""The web page at /, in a real headless Chromium (Debian's) driven by Playwright.

Upload the car, wait for the cut-out, download it, check its alpha; a screenshot
of the page lands in test-output/web.png.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, OUTPUT, Service, load_image

CHROMIUM = Path("/usr/bin/chromium")
CAR = FIXTURES / "car-1.jpg"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]

# Offline and quiet: no sync, no component updates, no background fetches.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_upload_see_and_download_the_cutout(
    service: Service, browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, Request, expect

    assert isinstance(browser, Browser)
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 820})
    page = context.new_page()
    outside: list[str] = []

    def only_local(request: Request) -> None:
        if not request.url.startswith((service.url, "blob:", "data:")):
            outside.append(request.url)

    page.on("request", only_local)
    try:
        page.goto(service.url + "/")
        expect(page).to_have_title("rembg-serve: remove the background")
        # The model list comes from GET /models.
        expect(page.locator("#model option")).to_have_text(["u2netp (default)"])
        page.set_input_files("#file", str(CAR))
        expect(page.locator("body")).to_have_attribute("data-state", "done", timeout=120_000)
        expect(page.locator("#status")).to_contain_text("Done")
        expect(page.locator("#after-info")).to_contain_text("480\u00d7360, u2netp")

        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "car-1-cutout.png"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "web.png"), full_page=True)

        # Options re-run the image: only the mask, as a grey PNG.
        page.check("#only-mask")
        expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
        expect(page.locator("body")).to_have_attribute("data-state", "done")
        mask_url = page.get_attribute("#download", "href")
        assert mask_url and mask_url.startswith("blob:")
    finally:
        context.close()

    cut = Image.open(io.BytesIO(saved.read_bytes()))
    assert cut.format == "PNG" and cut.mode == "RGBA" and cut.size == load_image(CAR).size
    alpha = np.asarray(cut.getchannel("A"))
    assert (alpha == 0).mean() > 0.1, "no transparent background"
    assert (alpha >= 240).mean() > 0.1, "no opaque foreground"
    # The page works offline: nothing but the service itself was requested.
    assert outside == []


def test_an_error_is_shown(service: Service, browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image")
    page = browser.new_page()
    try:
        page.goto(service.url + "/")
        page.set_input_files("#file", str(bogus))
        expect(page.locator("body")).to_have_attribute("data-state", "error", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("415 unsupported_image")
    finally:
        page.close()
