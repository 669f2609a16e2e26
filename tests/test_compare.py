"""compare.py: the base / each LoRA / mix grid and X/Y grids, on the demo model with real LoraMixer.

Re-weighting between cells must read no file: the tests count reads and move the LoRA files away after
adding them, so any read would fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_factories import demo_or_random_pipeline, write_kohya_lora
from lora_studio.mix.compare import Axis, comparison_grid, parse_axis, xy_grid
from lora_studio.errors import ConfigError
from lora_studio.render import GenParams, parse_infotext, read_png_parameters, render

PARAMS = GenParams("a red circle", steps=2, seed=3, width=32, height=32)   # small: the CPU is shared


@pytest.fixture()
def pipe():
    return demo_or_random_pipeline()


@pytest.fixture()
def two_loras(tmp_path, pipe):
    a = write_kohya_lora(tmp_path / "loras" / "alpha_style.safetensors", pipe, rank=4, alpha=4.0, seed=1)
    b = write_kohya_lora(tmp_path / "loras" / "beta_style.safetensors", pipe, rank=4, alpha=4.0, seed=2)
    return a, b


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_comparison_grid_tiles_base_each_lora_and_mix(pipe, two_loras, tmp_path, lora_reads):
    from lora_studio.mix import LoraMixer

    base_weights = _weights(pipe)
    base_picture = np.asarray(render(pipe, PARAMS).image)
    mixer = LoraMixer(pipe)
    name_a = mixer.add(two_loras[0], strength=0.3)          # strengths in the mixer are put back afterwards
    name_b = mixer.add(two_loras[1], strength=0.7, te_strength=0.2)
    assert lora_reads["n"] == 4  # two reads through read_lora, two through the safetensors loader
    for p in two_loras:            # any later read would now fail
        p.rename(p.with_suffix(".moved"))

    res = comparison_grid(pipe, mixer, PARAMS, [(name_a, 4.0), (name_b, 0.0)], tmp_path / "out")
    assert lora_reads["n"] == 4
    assert res.labels == ["base", "alpha_style 4", "beta_style 0", "mix"]
    assert len(res.image_paths) == 4 and all(p.exists() and p.with_suffix(".json").exists() for p in res.image_paths)
    tiles = [_pixels(p) for p in res.image_paths]
    assert np.array_equal(tiles[0], base_picture)            # the base tile is the plain base render
    assert not np.array_equal(tiles[1], tiles[0])            # a strong LoRA changes the picture
    assert np.array_equal(tiles[2], tiles[0])                # strength 0 gives the base picture exactly
    assert np.array_equal(tiles[3], tiles[1])                # mix = a at 4 + b at 0
    # each tile records its own LoRAs; the grid records the mix
    assert parse_infotext(read_png_parameters(res.image_paths[1]))["loras"] == [("alpha_style", 4.0, None)]
    assert parse_infotext(read_png_parameters(res.image_paths[0]))["loras"] == []
    grid_info = parse_infotext(read_png_parameters(res.grid_path))
    assert grid_info["loras"] == [("alpha_style", 4.0, None), ("beta_style", 0.0, None)]
    with Image.open(res.grid_path) as g:  # one row of 4 tiles at scale 2
        assert g.width >= 4 * 64 and 64 <= g.height < 2 * 64
    # base weights restored bit-identically; the mixer's own strengths are as they were
    after = _weights(pipe)
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)
    strengths = {e.name: (e.strength, e.te_strength) for e in mixer.entries}
    assert strengths == {name_a: (0.3, None), name_b: (0.7, 0.2)}


def test_comparison_grid_adds_files_by_path_or_folder_name(pipe, two_loras, tmp_path):
    """Files are found by path, or by name in a LoRA folder, before they reach the mixer (``mix.args``); the
    comparison row is built from the mixer's entries."""
    from lora_studio.mix import LoraMixer
    from lora_studio.mix.args import find_lora_arg

    mixer = LoraMixer(pipe)
    folder = str(two_loras[0].parent)
    for ref, strength in [(str(two_loras[0]), 1.0), ("beta_style", 0.5)]:
        mixer.add(find_lora_arg(ref, folder), strength=strength)
    res = comparison_grid(pipe, mixer, PARAMS, [(e.name, e.strength) for e in mixer.entries], tmp_path / "o")
    assert [e.name for e in mixer.entries] == ["alpha_style", "beta_style"]
    assert res.labels == ["base", "alpha_style 1", "beta_style 0.5", "mix"]
    with pytest.raises(Exception, match="no LoRA named 'gamma'"):
        find_lora_arg("gamma", folder)


def test_xy_grid_strength_by_lora_reweights_without_reading(pipe, two_loras, tmp_path, lora_reads):
    from lora_studio.mix import LoraMixer

    base_weights = _weights(pipe)
    mixer = LoraMixer(pipe)
    names = [mixer.add(p, strength=1.0) for p in two_loras]
    before = lora_reads["n"]
    for p in two_loras:
        p.rename(p.with_suffix(".moved"))
    x = parse_axis("strength=0,3")
    y = Axis("lora", names)
    res = xy_grid(pipe, mixer, PARAMS, x, y, tmp_path / "xy")
    assert lora_reads["n"] == before
    assert len(res.image_paths) == 4 and all(p.exists() for p in res.image_paths)
    cells = [[_pixels(p) for p in res.image_paths[r * 2:(r + 1) * 2]] for r in range(2)]
    assert np.array_equal(cells[0][0], cells[1][0])          # strength 0 of either LoRA is the base
    assert not np.array_equal(cells[0][1], cells[0][0])
    assert not np.array_equal(cells[0][1], cells[1][1])      # the two LoRAs differ
    tags = [parse_infotext(read_png_parameters(p))["loras"] for p in res.image_paths]
    assert tags == [[], [(names[0], 3.0, None)], [], [(names[1], 3.0, None)]]
    grid_text = read_png_parameters(res.grid_path)
    assert "X Type: Strength" in grid_text and 'X Values: "0.0, 3.0"' in grid_text and "Y Type: LoRA" in grid_text
    side = json.loads(res.grid_path.with_suffix(".json").read_text())
    assert len(side["cells"]) == 4
    after = _weights(pipe)
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)


def test_xy_grid_seeds_by_steps_cell_count_and_settings(pipe, tmp_path):
    from lora_studio.mix import LoraMixer

    res = xy_grid(pipe, LoraMixer(pipe), PARAMS, parse_axis("seed=1,2,3"), parse_axis("steps=1,2"), tmp_path)
    assert len(res.image_paths) == 6
    infos = [parse_infotext(read_png_parameters(p)) for p in res.image_paths]
    assert [(i["seed"], i["steps"]) for i in infos] == [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)]
    assert np.array_equal(_pixels(res.image_paths[4]), np.asarray(render(pipe, GenParams(
        "a red circle", steps=2, seed=2, width=32, height=32)).image))


def test_prompt_sr_axis_and_axis_errors(pipe, tmp_path):
    from lora_studio.mix import LoraMixer

    mixer = LoraMixer(pipe)
    res = xy_grid(pipe, mixer, PARAMS, parse_axis("prompt=red,blue"), None, tmp_path)
    prompts = [parse_infotext(read_png_parameters(p))["prompt"] for p in res.image_paths]
    assert prompts == ["a red circle", "a blue circle"]
    with pytest.raises(ConfigError, match="must occur in the prompt"):
        xy_grid(pipe, mixer, PARAMS, parse_axis("prompt=green,blue"), None, tmp_path)
    with pytest.raises(ConfigError, match="needs at least one LoRA"):
        xy_grid(pipe, mixer, PARAMS, parse_axis("strength=0,1"), None, tmp_path)
    with pytest.raises(ConfigError, match="unknown grid axis 'colour'"):
        parse_axis("colour=1,2")
    with pytest.raises(ConfigError, match="KIND=V1,V2"):
        parse_axis("strength")
    with pytest.raises(ConfigError, match="unknown sampler"):
        parse_axis("sampler=DDIM,Nope")


def test_te_strength_axis_and_stop_flag(pipe, two_loras, tmp_path):
    from lora_studio.errors import StopRequested
    from lora_studio.mix import LoraMixer
    from lora_studio.progress import StopFlag

    base_weights = _weights(pipe)
    mixer = LoraMixer(pipe)
    name = mixer.add(two_loras[0], strength=2.0)
    res = xy_grid(pipe, mixer, PARAMS, parse_axis(f"te_strength:{name}=0,2"), None, tmp_path / "te")
    tags = [parse_infotext(read_png_parameters(p))["loras"] for p in res.image_paths]
    assert tags == [[(name, 2.0, 0.0)], [(name, 2.0, None)]]
    assert "<lora:alpha_style:0:2>" in read_png_parameters(res.image_paths[0])   # A1111 order: te, unet
    assert not np.array_equal(_pixels(res.image_paths[0]), _pixels(res.image_paths[1]))

    stop = StopFlag()
    seen = []

    def on_progress(ev):
        seen.append(ev.current)
        stop.request()          # ask to stop after the first cell

    with pytest.raises(StopRequested, match="after 1 image"):
        xy_grid(pipe, mixer, PARAMS, parse_axis("strength=1,2,3"), None, tmp_path / "stop",
                progress=on_progress, stop=stop)
    assert seen == [1] and len(list((tmp_path / "stop" / "xy-cells").glob("*.png"))) == 1
    after = _weights(pipe)
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)
    assert [(e.strength, e.te_strength) for e in mixer.entries] == [(2.0, None)]


def test_bad_cells_fail_before_any_render(pipe, tmp_path):
    from lora_studio.mix import LoraMixer

    with pytest.raises(ConfigError, match="Steps: 0.*at least 1"):
        xy_grid(pipe, LoraMixer(pipe), PARAMS, parse_axis("steps=2,0"), None, tmp_path)
    assert not (tmp_path / "xy-cells").exists()
    with pytest.raises(ConfigError, match="only strength and te_strength"):
        parse_axis("seed:alpha=1,2")
