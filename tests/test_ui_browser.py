"""The GUI in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): open the page, train
a few steps and see it finish, reload and see the job again, move a strength slider, render the comparison,
and check what is visible. A screenshot of each stage goes to the test's tmp_path."""

from __future__ import annotations

import re
import shutil

import pytest

from ui_server import base_model_for_tests, start_app

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def page(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 1000})
            pg.set_default_timeout(120_000)  # a busy 2-core machine renders the page slowly
            yield pg
        finally:
            browser.close()


@pytest.mark.browser
def test_train_then_mix_in_the_browser(page, tmp_path, tmp_path_factory):
    expect = sync_api.expect
    expect.set_options(timeout=120_000)   # a busy 2-core machine renders the page slowly
    base, allow = base_model_for_tests(tmp_path_factory)
    app = start_app(tmp_path / "outputs", allow)
    try:
        page.goto(app.url, timeout=180_000)
        expect(page.get_by_text("Train, mix and export Stable Diffusion LoRAs")).to_be_visible()
        # --- Train: the demo dataset, a preview, two steps
        page.get_by_role("button", name="Use the demo dataset").click()
        folder = page.get_by_label("Training image folder")
        expect(folder).to_have_value(re.compile(r"datasets/demo$"))
        page.get_by_role("button", name="Preview dataset").click()
        expect(page.get_by_text("24 images in")).to_be_visible()
        page.get_by_label("Base model ('demo'", exact=False).first.fill(base)
        page.get_by_label("Run name", exact=False).fill("browser-run")
        page.get_by_label("Steps", exact=True).first.fill("2")
        page.get_by_label("Batch size", exact=True).fill("2")
        page.get_by_role("button", name="Start", exact=True).click()
        status = page.locator("#train-status-text")
        expect(status).to_have_attribute("data-state", "done", timeout=150_000)
        expect(status).to_contain_text("done: step 2/2 (100%)")
        expect(status).to_contain_text("browser-run.safetensors")
        expect(page.get_by_label("LoRA file")).to_have_value(re.compile(r"browser-run\.safetensors$"))
        page.screenshot(path=str(tmp_path / "1-trained.png"), full_page=True)
        # --- a reload finds the job again
        page.reload()
        expect(page.locator("#train-status-text")).to_contain_text("done: step 2/2", timeout=30_000)
        # --- Mix: scan the outputs folder, pick the new LoRA, move its slider, render
        page.get_by_role("tab", name="Mix").click()
        mix_base = page.get_by_label("Base model ('demo'", exact=False).nth(1)
        mix_base.fill(base)
        page.get_by_role("button", name="Scan library").click()
        expect(page.get_by_text("runs/browser-run/browser-run", exact=True).filter(visible=True).first).to_be_visible()
        page.get_by_label("LoRA 1", exact=True).click()
        page.get_by_role("option", name="runs/browser-run/browser-run").click()
        slider = page.locator("#mix-strength-1 input[type=range]")
        slider.focus()
        for _ in range(10):                     # ten steps of 0.05 to the left: 1.0 -> 0.5
            slider.press("ArrowLeft")
        expect(page.locator("#mix-strength-1 input[type=number]")).to_have_value("0.5")
        page.get_by_role("button", name="Render comparison").click()
        info = page.locator("#mix-info")
        expect(info).to_contain_text("Rendered: base, browser-run 0.5", timeout=120_000)
        expect(info).to_contain_text("Model loads this session: 1; LoRA file reads: 1.")
        grid = page.locator("#mix-grid img")
        expect(grid).to_be_visible()
        assert grid.evaluate("img => img.naturalWidth") >= 2 * 64
        page.screenshot(path=str(tmp_path / "2-mixed.png"), full_page=True)
        # --- Inspect: a path outside the allowed folders is refused with a readable message
        page.get_by_role("tab", name="Inspect").click()
        page.get_by_label("...or a path", exact=False).fill("/etc/passwd")
        page.get_by_role("button", name="Inspect", exact=True).click()
        expect(page.get_by_text("outside the folders LoRA Studio may open").first).to_be_visible()
        assert "Traceback" not in page.content()
        page.screenshot(path=str(tmp_path / "3-refused.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        app.close()
