"""library/: the user's WebUI and ComfyUI folders (extra_model_paths.yaml too), sidecars, hashes, the scan cache
and `python -m lora_studio library`, on folder trees written here with small LoRA files and a tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from lora_factories import demo_or_random_pipeline, write_kohya_lora, write_loha, write_lokr
from tiny_families import tiny_pipeline, write_ldm_checkpoint
from lora_studio.cli.main import main
from lora_studio.errors import InputFileError
from lora_studio.fileio import load_safetensors
from lora_studio.library import ScanCache, gather_folders, read_extra_model_paths, scan_models

LORA_FIELDS = {"path", "name", "family", "kind", "rank", "sha256", "autov2", "preview", "trigger_words",
               "activation_text", "preferred_weight", "civitai", "problem"}
CHECKPOINT_FIELDS = {"path", "name", "family", "sha256", "autov2"}
EXTRA_PATHS = """\
a111:
    base_path: ../webui/
    checkpoints: models/Stable-diffusion
    configs: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
    upscale_models: models/ESRGAN
    embeddings: embeddings
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("apps")
    pipe = demo_or_random_pipeline()
    webui, comfy, loose = base / "webui", base / "comfy", base / "outputs"
    lora_dir = webui / "models" / "Lora"
    for sub in ("models/Stable-diffusion/sd15", "models/Lora/styles", "models/LyCORIS", "models/VAE", "embeddings"):
        (webui / sub).mkdir(parents=True, exist_ok=True)
    write_ldm_checkpoint(tiny_pipeline("sd1"), webui / "models/Stable-diffusion/sd15/tiny.safetensors")

    tags = {"10_stripes": {"stripes": 24, "circle": 3}}
    write_kohya_lora(lora_dir / "stripes.safetensors", pipe, rank=4, te=False,
                     metadata={"ss_tag_frequency": json.dumps(tags), "modelspec.trigger_phrase": "striped style"})
    (lora_dir / "stripes.preview.png").write_bytes(b"\x89PNG preview")
    (lora_dir / "stripes.png").write_bytes(b"\x89PNG second choice")
    (lora_dir / "stripes.civitai.info").write_text(json.dumps(
        {"name": "v2.0", "baseModel": "SD 1.5", "trainedWords": ["stripey, zebra"], "model": {"name": "Stripes"}}))
    (lora_dir / "stripes.json").write_text(json.dumps(
        {"activation text": "stripes, bold lines", "preferred weight": 0.7, "sd version": "SD1",
         "description": "lines"}))
    write_loha(lora_dir / "styles" / "hatch.safetensors", pipe, rank=2)
    (lora_dir / "styles" / "hatch.jpeg").write_bytes(b"\xff\xd8 jpeg")
    (lora_dir / "styles" / "hatch.json").write_text(json.dumps({"preferred weight": 0, "activation text": ""}))
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"emb_params": torch.zeros(2, 768)}, str(lora_dir / "embedding.safetensors"))
    (lora_dir / "notes.txt").write_text("not a model")
    write_lokr(webui / "models" / "LyCORIS" / "kron.safetensors", pipe, rank=2)

    (comfy / "models" / "loras").mkdir(parents=True)
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "previews").mkdir()
    write_kohya_lora(comfy / "models" / "loras" / "managed.safetensors", pipe, rank=2, te=False, seed=3)
    (comfy / "previews" / "managed.webp").write_bytes(b"RIFF webp")
    (comfy / "models" / "loras" / "managed.metadata.json").write_text(json.dumps(
        {"model_name": "Managed", "preview_url": str(comfy / "previews" / "managed.webp"),
         "civitai": {"trainedWords": ["managed look"], "name": "v1", "baseModel": "SD 1.5",
                     "model": {"name": "Managed LoRA"}}}))
    (comfy / "extra_model_paths.yaml").write_text(EXTRA_PATHS)

    run = loose / "runs" / "r1"
    write_kohya_lora(run / "r1.safetensors", pipe, rank=1, te=False, seed=4)
    write_kohya_lora(run / "state" / "step-000010" / "adapter.safetensors", pipe, rank=1, te=False, seed=5)
    (run / "r1.metadata.json").write_text(json.dumps(
        {"model_name": "R1", "trainedWords": ["r1 look"], "preview_url": "https://example.invalid/r1.jpeg"}))
    (run / "samples").mkdir()
    os.symlink(run.parent, run / "samples" / "loop")   # a link back up the tree is followed once, not forever
    return {"webui": webui, "comfy": comfy, "loose": loose}


def test_webui_tree_gives_every_field(trees, tmp_path):
    webui = trees["webui"]
    lib = scan_models(gather_folders(webui_dirs=[webui]), cache=tmp_path / "cache.json")
    loras = {lo.name: lo for lo in lib.loras}
    assert sorted(loras) == ["broken", "embedding", "kron", "stripes", "styles/hatch"]
    for lo in loras.values():
        assert lo.sha256 == _sha(lo.path) and lo.autov2 == lo.sha256[:10]

    s = loras["stripes"]
    assert (s.family, s.kind, s.rank, s.problem) == ("sd1", "LoRA", 4, None)
    assert s.preview == webui / "models/Lora/stripes.preview.png"
    assert s.trigger_words == ["stripey", "zebra", "striped style", "stripes"]
    assert (s.activation_text, s.preferred_weight) == ("stripes, bold lines", 0.7)
    assert s.civitai == {"model_name": "Stripes", "version_name": "v2.0", "base_model": "SD 1.5"}

    h = loras["styles/hatch"]
    assert (h.family, h.kind, h.rank, h.problem) == ("sd1", "LoHa", 2, None)
    assert h.preview == webui / "models/Lora/styles/hatch.jpeg"
    assert (h.activation_text, h.preferred_weight, h.civitai, h.trigger_words) == (None, None, None, [])
    assert loras["kron"].kind == "LoKr" and loras["kron"].problem is None

    assert "broken.safetensors" in loras["broken"].problem and loras["broken"].family is None
    assert "no key follows a known LoRA scheme" in loras["embedding"].problem

    (ckpt,) = lib.checkpoints
    path = webui / "models/Stable-diffusion/sd15/tiny.safetensors"
    assert (ckpt.path, ckpt.name, ckpt.family, ckpt.problem) == (path, "sd15/tiny", "sd1", None)
    assert ckpt.sha256 == _sha(path) and ckpt.autov2 == _sha(path)[:10]


def test_extra_model_paths_yaml_maps_the_webui_folders(trees):
    mapped = read_extra_model_paths(trees["comfy"] / "extra_model_paths.yaml")
    webui = trees["comfy"] / "../webui/"
    assert mapped["loras"] == [webui / "models/Lora", webui / "models/LyCORIS"]
    assert mapped["checkpoints"] == [webui / "models/Stable-diffusion"]
    assert mapped["embeddings"] == [webui / "embeddings"] and mapped["vae"] == []


def test_comfy_tree_reads_its_own_folders_and_the_mapped_ones(trees):
    folders = gather_folders(comfy_dirs=[trees["comfy"]], webui_dirs=[trees["webui"]])
    assert len(folders.loras) == 3                  # comfy loras, webui Lora and LyCORIS, each once
    lib = scan_models(folders)
    names = [lo.name for lo in lib.loras]
    assert sorted(names) == ["broken", "embedding", "kron", "managed", "stripes", "styles/hatch"]
    m = next(lo for lo in lib.loras if lo.name == "managed")
    assert (m.family, m.kind, m.rank, m.problem) == ("sd1", "LoRA", 2, None)
    assert m.preview == trees["comfy"] / "previews" / "managed.webp"
    assert m.trigger_words == ["managed look"]
    assert m.civitai == {"model_name": "Managed LoRA", "version_name": "v1", "base_model": "SD 1.5"}
    assert [c.name for c in lib.checkpoints] == ["sd15/tiny"]


def test_training_internals_are_listed_with_a_problem(trees):
    lib = scan_models(gather_folders(lora_dirs=[trees["loose"]]))
    loras = {lo.name: lo for lo in lib.loras}
    assert sorted(loras) == ["runs/r1/r1", "runs/r1/state/step-000010/adapter"]
    r1 = loras["runs/r1/r1"]
    assert (r1.problem, r1.trigger_words, r1.preview, r1.civitai) == (None, ["r1 look"], None, None)
    internal = loras["runs/r1/state/step-000010/adapter"]
    assert "internal state" in internal.problem and internal.sha256 == _sha(internal.path)
    # the run's state folder given on its own is still recognised
    alone = scan_models(gather_folders(lora_dirs=[trees["loose"] / "runs" / "r1" / "state"]))
    assert ["internal state" in lo.problem for lo in alone.loras] == [True]


def test_cli_json_has_every_field(trees, tmp_path, capsys):
    cache = tmp_path / "c.json"
    rc = main(["library", "--comfy-dir", str(trees["comfy"]), "--lora-dir", str(trees["loose"]), "--json",
               "--cache", str(cache)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out) == {"checkpoints", "loras"} and cache.is_file()
    assert len(out["loras"]) == 8 and len(out["checkpoints"]) == 1
    for lo in out["loras"]:
        assert LORA_FIELDS <= set(lo)
        assert lo["sha256"] == hashlib.sha256(open(lo["path"], "rb").read()).hexdigest()
    for c in out["checkpoints"]:
        assert CHECKPOINT_FIELDS <= set(c) and c["family"] == "sd1"
    stripes = next(lo for lo in out["loras"] if lo["name"] == "stripes")
    assert stripes["preview"].endswith("stripes.preview.png") and stripes["preferred_weight"] == 0.7
    assert stripes["civitai"]["model_name"] == "Stripes"
    assert sum(lo["problem"] is not None for lo in out["loras"]) == 3   # broken, embedding, training state


def test_cli_table_and_user_errors(trees, tmp_path, capsys):
    assert main(["library", "--webui-dir", str(trees["webui"]), "--cache", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "Checkpoints (1)" in out and "LoRAs (5)" in out and "styles/hatch" in out and "! " in out
    assert main(["library", "--webui-dir", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "c.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["library", "--comfy-dir", str(trees["webui"]), "--cache", str(tmp_path / "c.json")]) == 2
    assert "not a ComfyUI folder" in capsys.readouterr().err
    assert main(["library"]) == 2
    assert "--webui-dir" in capsys.readouterr().err


def test_bad_extra_model_paths_is_a_user_error(tmp_path):
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "extra_model_paths.yaml").write_text("a: [unclosed\n")
    with pytest.raises(InputFileError, match="extra_model_paths.yaml"):
        gather_folders(comfy_dirs=[tmp_path])


def test_cache_reuses_unchanged_files_and_rereads_changed_ones(tmp_path, monkeypatch):
    pipe = demo_or_random_pipeline()
    folder = tmp_path / "loras"
    a = write_kohya_lora(folder / "a.safetensors", pipe, rank=2, te=False, seed=1)
    write_kohya_lora(folder / "b.safetensors", pipe, rank=2, te=False, seed=2)
    cache_file = tmp_path / "cache" / "library.json"
    scan_models(gather_folders(lora_dirs=[folder]), cache=cache_file)
    assert set(json.loads(cache_file.read_text())["files"]) == {str(a), str(folder / "b.safetensors")}

    cache = ScanCache(cache_file)
    scan_models(gather_folders(lora_dirs=[folder]), cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)

    cache = ScanCache(cache_file)                 # the same folder given relative to the working folder
    monkeypatch.chdir(tmp_path)
    scan_models(gather_folders(lora_dirs=["loras"]), cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)

    write_kohya_lora(a, pipe, rank=3, te=False, seed=7)
    os.utime(a, ns=(1, 1))
    (folder / "b.safetensors").unlink()
    cache = ScanCache(cache_file)
    (entry,) = scan_models(gather_folders(lora_dirs=[folder]), cache=cache).loras
    assert (cache.hits, cache.misses, entry.rank, entry.sha256) == (0, 1, 3, _sha(a))
    assert set(json.loads(cache_file.read_text())["files"]) == {str(a)}


def test_500_loras_rescan_in_seconds(tmp_path):
    folder = tmp_path / "Lora"
    template = write_kohya_lora(tmp_path / "template.safetensors", demo_or_random_pipeline(), rank=1, te=False)
    tensors, metadata = load_safetensors(template)
    first = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    for i in range(500):                         # 500 distinct files (one weight differs), written quickly
        tensors[first][0, 0] = float(i)
        (folder / f"set{i % 10}").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / f"set{i % 10}" / f"lora{i:03d}.safetensors"), metadata)
        if i % 5 == 0:
            (folder / f"set{i % 10}" / f"lora{i:03d}.preview.png").write_bytes(b"png")
    cache = tmp_path / "cache.json"
    t0 = time.perf_counter()
    first = scan_models(gather_folders(lora_dirs=[folder]), cache=cache)
    t1 = time.perf_counter()
    again = scan_models(gather_folders(lora_dirs=[folder]), cache=ScanCache(cache))
    t2 = time.perf_counter()
    print(f"500 LoRAs: first scan {t1 - t0:.2f} s, rescan {t2 - t1:.2f} s")
    assert len(again.loras) == 500 and all(lo.problem is None for lo in again.loras)
    assert len({lo.sha256 for lo in again.loras}) == 500
    assert [lo.sha256 for lo in again.loras] == [lo.sha256 for lo in first.loras]
    assert again.loras[0].sha256 == _sha(folder / "set0" / "lora000.safetensors")
    assert sum(lo.preview is not None for lo in again.loras) == 100
    assert t2 - t1 < 5.0
