"""The GUI's wiring, through gradio_client against a running app on the demo model: train a few steps, render
a mix, export, inspect; errors come back as messages; paths outside the allowed folders are refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from lora_studio.errors import InputFileError
from lora_studio.ui.paths import PathPolicy

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

from ui_server import base_model_for_tests, start_app  # noqa: E402


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    base, allow = base_model_for_tests(tmp_path_factory)
    secret_dir = tmp_path_factory.mktemp("not-allowed")
    (secret_dir / "secret.safetensors").write_bytes(b"x" * 64)
    app = start_app(tmp_path_factory.mktemp("app") / "outputs", allow)
    client = gradio_client.Client(app.url, verbose=False)
    try:
        yield app, client, base, secret_dir
    finally:
        app.close()


def _image_path(item) -> str:
    """A gallery item as gradio_client returns it: {"image": path or {"path": ...}, "caption": ...}."""
    image = item["image"]
    return image if isinstance(image, str) else image["path"]


def _poll_until_finished(client, timeout=150.0, states=("done", "error")) -> list:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        out = client.predict(api_name="/train_poll")
        if isinstance(out[0], str):
            last = out
            if any(f"data-state='{st}'" in out[0] for st in states):
                return out
        time.sleep(0.5)
    raise AssertionError(f"training did not finish; last status: {last and last[0]}")


@pytest.fixture(scope="module")
def trained(running):
    app, client, base, _ = running
    data = client.predict(api_name="/train_demo_dataset")
    assert Path(data).is_dir() and Path(data).is_relative_to(app.outputs)
    preview_text, gallery = client.predict(folder=data, trigger="", resolution=64, api_name="/train_preview")
    assert "24 images" in preview_text and "64x64: 240" in preview_text
    assert len(gallery) == 24 and gallery[0]["caption"]
    # rank 4 on the attention projections only: the assertions below on kind and rank follow from these knobs
    client.predict(preset="demo-cpu", data_dir=data, base=base, run_name="ui-run", steps=2, batch_size=2,
                   sample_every_n_steps=2, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                   api_name="/train_start")
    status, losses, samples, log, lora_file = _poll_until_finished(client)[:5]
    lora = Path(lora_file)
    return {"status": status, "losses": losses, "samples": samples, "log": log, "lora": lora, "data": data}


def test_train_through_the_api(running, trained):
    app, *_ = running
    assert "done: step 2/2 (100%)" in trained["status"] and "it/s" in trained["status"]
    assert trained["lora"] == app.outputs / "runs" / "ui-run" / "ui-run.safetensors" and trained["lora"].is_file()
    assert [row[0] for row in trained["losses"]["data"]] == [1, 2]              # the loss plot's points
    assert len(trained["samples"]) == 1
    with Image.open(_image_path(trained["samples"][0])) as im:               # 2 prompts x 1 seed, 64 px x2
        assert im.width >= 2 * 64 * 2
    assert "[save] step 2" in trained["log"]
    job = app.registry.get(app.registry.current())                               # the job the page follows
    assert job.snapshot().state == "done"


def test_reload_reattaches_to_the_job(running, trained):
    app, _, _, _ = running
    fresh = gradio_client.Client(app.url, verbose=False)     # a new browser session knows no job id
    status = fresh.predict(api_name="/train_poll")[0]
    assert "done: step 2/2" in status and "ui-run.safetensors" in status


def test_mix_render_and_reweight_without_reloading(running, trained, monkeypatch):
    app, client, base, _ = running
    # the server runs in this process: count the real model loads and LoRA file reads behind the page's counters
    import lora_studio.mix.mixer as mix
    import lora_studio.models as models

    calls = {"load": 0, "read": 0}
    real_load, real_read = models.load_pipeline, mix.read_lora

    def counting_load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def counting_read(*a, **k):
        calls["read"] += 1
        return real_read(*a, **k)

    monkeypatch.setattr(models, "load_pipeline", counting_load)
    monkeypatch.setattr(mix, "read_lora", counting_read)
    rows = client.predict(folder=str(app.outputs), api_name="/mix_scan")[0]
    names = [r[0] for r in rows["data"]]
    assert "runs/ui-run/ui-run" in names
    row = rows["data"][names.index("runs/ui-run/ui-run")]
    assert row[1:4] == ["sd1", "LoRA", 4]
    common = dict(base=base, prompt="a red circle", steps=3, seed=0, width=64, height=64,
                  lora_1=str(trained["lora"]))
    grid, tiles, info = client.predict(strength_1=1.0, api_name="/mix_render", **common)
    assert "Rendered: base, ui-run 1" in info and len(tiles) == 2
    texts = []
    for t in tiles:
        with Image.open(t) as im:
            assert im.size == (64, 64)
            texts.append(im.text["parameters"])
    assert "<lora:" not in texts[0] and "<lora:ui-run:1>" in texts[1]          # base, then the LoRA alone
    with Image.open(grid) as im:
        assert im.width >= 2 * 64 and "parameters" in im.text
    assert "Model loads this session: 1; LoRA file reads: 1." in info and calls == {"load": 1, "read": 1}
    grid2, tiles2, info2 = client.predict(strength_1=0.5, api_name="/mix_render", **common)
    assert "Rendered: base, ui-run 0.5" in info2 and len(tiles2) == 2
    assert "Model loads this session: 1; LoRA file reads: 1." in info2     # the slider moved, nothing reloaded
    assert calls == {"load": 1, "read": 1}
    xy, info3 = client.predict(x_axis="strength=0,1", y_axis="seed=1,2", api_name="/mix_xy", **common)
    with Image.open(xy) as im:
        assert "X Type: Strength" in im.text["parameters"]
    assert "X/Y grid: 4 cells" in info3 and "Model loads this session: 1; LoRA file reads: 1." in info3
    assert calls == {"load": 1, "read": 1}
    with pytest.raises(AppError, match="block weight 'mid' should look like NAME=NUMBER"):
        client.predict(strength_1=0.5, blocks_1="down=1, mid", api_name="/mix_render", **common)


def test_export_and_inspect(running, trained):
    app, client, base, _ = running
    lora = trained["lora"]
    text = client.predict(base=base, loras=f"{lora}:0.8", fmt="single_file", dtype="fp16", name="merged",
                          api_name="/export_checkpoint")
    out = app.outputs / "exports" / "merged.safetensors"
    assert out.is_file() and "merged ui-run.safetensors:0.8" in text
    text, plot = client.predict(lora=str(lora), method="fixed", value=2, name="small", api_name="/export_resize")
    assert (app.outputs / "exports" / "small.safetensors").is_file() and "4->2" in text
    with Image.open(plot) as im:
        assert im.width > 400
    text = client.predict(loras=f"{lora}:1\n{lora}:0.5", method="concat", name="two", api_name="/export_merged_lora")
    assert (app.outputs / "exports" / "two.safetensors").is_file()
    report, modules = client.predict(file=None, text=str(app.outputs / "exports" / "two.safetensors"),
                                     api_name="/inspect")
    assert "Kind:     LoRA" in report and "rank 8" in report                     # concat: ranks add up
    assert {row[4] for row in modules["data"]} == {8}
    report, _ = client.predict(file=None, text=str(out), api_name="/inspect")
    assert "a base model (single_file), not a LoRA" in report and "SD 1" in report


def test_uploads_and_extract(running, trained):
    app, client, base, _ = running
    from gradio_client import handle_file

    images = sorted(Path(trained["data"]).rglob("*.png"))[:3]
    captions = [p.with_suffix(".txt") for p in images]
    folder = client.predict(files=[handle_file(str(p)) for p in images + captions], name="mine",
                            api_name="/train_use_uploads")
    assert Path(folder) == app.outputs / "datasets" / "mine"
    text = client.predict(folder=folder, trigger="", resolution=64, api_name="/train_preview")[0]
    assert "3 images" in text and "10_images (3 images)" in text
    report, _ = client.predict(file=handle_file(str(trained["lora"])), text="", api_name="/inspect")
    assert "Kind:     LoRA" in report and "rank 4" in report and "stripes" in report   # dropped file, trigger word
    # the Mix tab's session (rendered above) exported as a diffusers folder, then a LoRA extracted from it
    text = client.predict(base=base, use_mix=True, loras="", fmt="diffusers", dtype="fp32", name="mixed-model",
                          api_name="/export_checkpoint")
    assert (app.outputs / "exports" / "mixed-model" / "model_index.json").is_file() and "diffusers" in text
    text, plot = client.predict(tuned=str(app.outputs / "exports" / "mixed-model"), base=base, method="energy",
                                value=0.99, targets="attn", name="extracted", api_name="/export_extract")
    assert (app.outputs / "exports" / "extracted.safetensors").is_file() and "extract: wrote" in text
    assert plot and Path(plot).is_file()


def test_stop_and_resume_through_the_api(running, trained):
    app, client, base, _ = running
    client.predict(preset="demo-cpu", data_dir=trained["data"], base=base, run_name="stop-run", steps=400,
                   batch_size=1, api_name="/train_start")
    deadline = time.monotonic() + 120
    while app.registry.snapshot(app.registry.current()).step < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.predict(api_name="/train_stop")
    status = _poll_until_finished(client, states=("stopped", "error"))[0]
    assert "data-state='stopped'" in status and "Resume continues" in status
    step = app.registry.snapshot(app.registry.current()).step
    assert 1 <= step < 400
    client.predict(preset="demo-cpu", data_dir=trained["data"], base=base, run_name="stop-run", steps=step + 1,
                   batch_size=1, api_name="/train_resume")
    status = _poll_until_finished(client)[0]
    assert f"done: step {step + 1}/{step + 1}" in status


def test_preset_fills_the_knobs(running):
    _, client, _, _ = running
    values = client.predict(name="style-sd15", api_name="/train_load_preset")
    from lora_studio.train.config import load_preset
    from lora_studio.ui.train_tab import KNOB_FIELDS

    cfg = load_preset("style-sd15")
    got = dict(zip(KNOB_FIELDS, values))
    assert got["rank"] == cfg.rank and got["resolution"] == cfg.resolution and got["steps"] == cfg.steps
    assert got["target_modules"]["value"] == cfg.target_modules        # sent as an update with its choices
    assert set(cfg.target_modules) <= {c[0] if isinstance(c, list) else c for c in got["target_modules"]["choices"]}


def test_launch_options():
    from lora_studio.ui.launch import exposure_refusal, free_port, parse_args

    assert "--auth user:pass" in exposure_refusal(parse_args(["--listen"]))
    assert "--share --auth" in exposure_refusal(parse_args(["--share"]))
    assert exposure_refusal(parse_args(["--listen", "--auth", "me:pw"])) is None
    assert exposure_refusal(parse_args([])) is None
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert free_port("127.0.0.1", port) > port                 # the next free one, not the busy one


def test_errors_are_messages_not_tracebacks(running, trained):
    _, client, base, _ = running
    with pytest.raises(AppError) as err:
        client.predict(preset="demo-cpu", data_dir=trained["data"], base=base, run_name="bad", steps=2, learning_rate=0,
                       api_name="/train_start")
    assert "learning_rate = 0.0 is out of range" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(AppError, match="does not exist"):
        client.predict(file=None, text=str(trained["lora"].with_name("nope.safetensors")), api_name="/inspect")


@pytest.mark.parametrize("api,kwargs", [
    ("/inspect", {"file": None, "text": "/etc/passwd"}),
    ("/inspect", {"file": None, "text": "../../../../../../etc/passwd"}),
    ("/mix_scan", {"folder": "/etc"}),
    ("/export_resize", {"lora": "SECRET", "method": "fixed", "value": 2, "name": "x"}),
    ("/export_resize", {"lora": "LORA", "method": "fixed", "value": 2, "name": "../../escape"}),
    ("/train_preview", {"folder": "/", "trigger": "", "resolution": 64}),
])
def test_paths_outside_the_allowed_folders_are_refused(running, trained, api, kwargs):
    _, client, _, secret_dir = running
    kwargs = {k: (str(secret_dir / "secret.safetensors") if v == "SECRET" else
                  str(trained["lora"]) if v == "LORA" else v) for k, v in kwargs.items()}
    with pytest.raises(AppError) as err:
        client.predict(api_name=api, **kwargs)
    msg = str(err.value)
    assert "outside the folders LoRA Studio may open" in msg or "must be a plain name" in msg
    assert not (Path("/etc") / "escape.safetensors").exists()


def test_path_policy_resolves_links_and_dots(tmp_path):
    outputs = tmp_path / "outputs"
    policy = PathPolicy(outputs)
    (outputs / "a.txt").write_text("ok")
    (tmp_path / "secret.txt").write_text("no")
    (outputs / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert policy.readable(outputs / "a.txt") == (outputs / "a.txt").resolve()
    for bad in (outputs / "link.txt", outputs / ".." / "secret.txt", tmp_path / "secret.txt"):
        with pytest.raises(InputFileError, match="outside the folders"):
            policy.readable(bad)
    assert policy.output("merged.safetensors", "exports", ".safetensors") == outputs.resolve() / "exports" / "merged.safetensors"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(InputFileError, match="plain name"):
            policy.output(bad, "exports")


def test_new_output_numbers_instead_of_replacing(tmp_path):
    policy = PathPolicy(tmp_path / "outputs")
    exports = policy.outputs / "exports"
    exports.mkdir()
    assert policy.new_output("merged", "exports", ".safetensors") == exports / "merged.safetensors"
    (exports / "merged.safetensors").touch()
    assert policy.new_output("merged.safetensors", "exports", ".safetensors") == exports / "merged-0001.safetensors"
    (exports / "merged-0001.safetensors").touch()
    assert policy.new_output("merged", "exports", ".safetensors") == exports / "merged-0002.safetensors"
    (exports / "model.v2").mkdir()  # a diffusers-folder export: the dot is part of the name
    assert policy.new_output("model.v2", "exports") == exports / "model.v2-0001"


def test_gui_exports_with_the_same_name_are_all_kept(running, trained):
    """Every export of the Export tab, run twice under one name, keeps both files (numbered), and a merged
    checkpoint written there opens again as the tuned model of an extraction."""
    app, client, base, _ = running
    lora, exports = trained["lora"], app.outputs / "exports"
    for _ in range(2):
        client.predict(base=base, loras=f"{lora}:0.8", fmt="single_file", dtype="fp32", name="twice",
                       api_name="/export_checkpoint")
        client.predict(loras=f"{lora}:1", method="concat", name="twice-lora", api_name="/export_merged_lora")
        client.predict(lora=str(lora), method="fixed", value=2, name="twice-small", api_name="/export_resize")
    for name in ("twice", "twice-lora", "twice-small"):
        assert (exports / f"{name}.safetensors").is_file() and (exports / f"{name}-0001.safetensors").is_file()
    first = (exports / "twice.safetensors").read_bytes()
    for _ in range(2):
        text, _ = client.predict(tuned=str(exports / "twice.safetensors"), base=base, method="fixed", value=2,
                                 targets="attn", name="twice-extracted", api_name="/export_extract")
    assert "twice-extracted-0001.safetensors" in text
    assert (exports / "twice-extracted.safetensors").is_file()
    assert (exports / "twice.safetensors").read_bytes() == first
