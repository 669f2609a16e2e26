"""Pickle files (.ckpt/.pt/.bin/.pth) are refused by default wherever a path is taken, and a hostile pickle never
runs its code, not even with allow_pickle (which reads with torch.load(weights_only=True))."""

from __future__ import annotations

import pytest
import torch

import bad_inputs as B
from lora_studio import fileio
from lora_studio.cli.main import main as cli_main
from lora_studio.errors import InputFileError, UnsafeFileError
from lora_studio.lora.formats import read_lora
from lora_studio.lora.inspect import inspect_lora
from lora_studio.mix import LoraMixer
from lora_studio.models import describe_checkpoint, load_pipeline

SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")


@pytest.fixture(scope="module")
def pipe():
    from lora_factories import demo_or_random_pipeline

    return demo_or_random_pipeline()


def _readers(pipe):
    return {
        "load_state_dict": lambda p: fileio.load_state_dict(p),
        "read_safetensors_header": fileio.read_safetensors_header,
        "load_safetensors": fileio.load_safetensors,
        "read_lora": read_lora,
        "inspect_lora": inspect_lora,
        "LoraMixer.add": lambda p: LoraMixer(pipe).add(p),
        "load_pipeline": load_pipeline,
        "describe_checkpoint": describe_checkpoint,
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_refused_by_default_everywhere_and_nothing_runs(suffix, tmp_path, pipe):
    marker = tmp_path / "code-ran.txt"
    path = B.malicious_pickle(tmp_path, suffix, marker)
    for name, read in _readers(pipe).items():
        with pytest.raises(UnsafeFileError) as info:
            read(path)
        B.assert_helpful(info.value, (("unpickling",), ("allow-pickle", "safetensors")), path)
        assert not marker.exists(), f"{name} ran the pickle's code"


def test_allow_pickle_still_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran.txt"
    path = B.malicious_pickle(tmp_path, ".ckpt", marker)
    for read in (lambda: fileio.load_state_dict(path, allow_pickle=True),
                 lambda: load_pipeline(path, allow_pickle=True)):
        with pytest.raises(UnsafeFileError) as info:
            read()
        B.assert_helpful(info.value, (("weights_only",), ("pathlib", "objects other than plain tensors")), path)
        assert not marker.exists()
    # control: the file really is hostile (a full unpickle runs its code)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_allow_pickle_reads_plain_tensors(tmp_path):
    path = B.plain_pickle(tmp_path, ".pt")
    tensors, meta = fileio.load_state_dict(path, allow_pickle=True)
    assert meta == {} and torch.equal(tensors[f"{B.MODULE}.lora_down.weight"], torch.ones(2, 32))


def test_damaged_pickle_with_allow_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    good = B.plain_pickle(tmp_path, ".ckpt").read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputFileError) as info:
        fileio.load_state_dict(path, allow_pickle=True)
    B.assert_helpful(info.value, (("damaged",),), path)


def test_cli_refuses_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "code-ran.txt"
    path = B.malicious_pickle(tmp_path, ".pt", marker)
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unpickling" in err and "Traceback" not in err
    assert cli_main(["mix", "--base", "demo", "--lora", f"{path}:0.5", "--prompt", "a red circle",
                     "--out", str(tmp_path / "x.png")]) == 2
    assert "unpickling" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_diffusers_folder_with_pickle_weights(component, tmp_path):
    """A diffusers folder whose weights are only .bin pickles is refused by default, naming the file and
    --allow-pickle (before, diffusers unpickled it without asking); allowed, it loads the same weights; a
    hostile .bin is still refused, and runs nothing."""
    folder = B.pickle_diffusers_folder(tmp_path / "plain", component)
    bin_name = "pytorch_model.bin" if component == "text_encoder" else "diffusion_pytorch_model.bin"
    with pytest.raises(UnsafeFileError) as info:
        load_pipeline(folder)
    B.assert_helpful(info.value, (("unpickling",), ("allow-pickle",), (bin_name,)), folder)

    loaded = load_pipeline(folder, allow_pickle=True)
    demo = load_pipeline("demo")
    got, want = getattr(loaded.pipe, component).state_dict(), getattr(demo.pipe, component).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    marker = tmp_path / "code-ran.txt"
    hostile = B.pickle_diffusers_folder(tmp_path / "hostile", component, payload=B.WritesMarker(marker))
    for allow in (False, True):
        with pytest.raises(UnsafeFileError) as info:
            load_pipeline(hostile, allow_pickle=allow)
    B.assert_helpful(info.value, (("objects other than plain tensors",), ("weights_only",)), hostile / component)
    assert not marker.exists()


def test_allow_pickle_names_a_file_that_is_no_pickle(tmp_path):
    """A .ckpt that is really a Git LFS pointer (a clone without Git LFS) says so, rather than 'damaged'."""
    path = tmp_path / "model.ckpt"
    path.write_text(B.LFS_POINTER)
    for read in (lambda: fileio.load_state_dict(path, allow_pickle=True),
                 lambda: load_pipeline(path, allow_pickle=True)):
        with pytest.raises(InputFileError) as info:
            read()
        B.assert_helpful(info.value, (("git lfs pointer",), ("git lfs pull",)), path)
