"""Every broken safetensors file in the corpus, through every public reader: a clear ``InputFileError`` that
says what is wrong with the file and what to do, never another exception type."""

from __future__ import annotations

import pytest

import bad_inputs as B
from lora_studio.fileio import tensors as fileio
from lora_studio.errors import InputFileError
from lora_studio.lora.formats import read_lora
from lora_studio.lora.inspect import inspect_lora
from lora_studio.mix import LoraMixer
from lora_studio.models import describe_checkpoint, load_pipeline


@pytest.fixture(scope="module")
def pipe():
    from lora_factories import demo_or_random_pipeline

    return demo_or_random_pipeline()


READERS = {
    "load_safetensors": lambda p, pipe: fileio.load_safetensors(p),
    "read_safetensors_header": lambda p, pipe: fileio.read_safetensors_header(p),
    "read_lora": lambda p, pipe: read_lora(p),
    "inspect_lora": lambda p, pipe: inspect_lora(p),
    "load_pipeline": lambda p, pipe: load_pipeline(p),
    "describe_checkpoint": lambda p, pipe: describe_checkpoint(p),
    "LoraMixer.add": lambda p, pipe: LoraMixer(pipe).add(p),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", B.SAFETENSORS_CASES)
def test_broken_file_is_refused_clearly(case, reader, tmp_path, pipe):
    build, words = B.SAFETENSORS_CASES[case]
    path = build(tmp_path)
    with pytest.raises(InputFileError) as info:
        READERS[reader](path, pipe)
    # load_pipeline/describe_checkpoint read a folder as a diffusers model: they say that instead
    folder_reader = case == "directory" and reader in ("load_pipeline", "describe_checkpoint")
    B.assert_helpful(info.value, (("folder",),) if folder_reader else words, path)


def test_the_valid_file_the_corpus_breaks_loads(tmp_path):
    """The corpus edits a file that is itself valid, so each refusal is caused by the edit."""
    path = B.write_valid(tmp_path)
    tensors, meta = fileio.load_safetensors(path)
    assert set(tensors) == {f"{B.MODULE}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert meta == {"ss_network_dim": "2"}
    assert read_lora(path).modules[B.MODULE].rank == 2
    assert inspect_lora(path).problem is None


def _count_reads(monkeypatch) -> list[int]:
    """The sizes of every ``read`` on files opened from now on (the list fills as they are read)."""
    reads: list[int] = []
    real_open = open

    def counting_open(*a, **kw):
        fh = real_open(*a, **kw)
        real_read = fh.read
        fh.read = lambda n=-1: reads.append(n) or real_read(n)  # noqa: E731
        return fh

    monkeypatch.setattr("builtins.open", counting_open)
    return reads


def test_header_bound_is_enforced_before_reading(tmp_path, monkeypatch):
    """A header that is really longer than the bound (not only a lying length field) is refused unread."""
    path = B.write_valid(tmp_path)
    monkeypatch.setattr(fileio, "MAX_HEADER_BYTES", 64)
    reads = _count_reads(monkeypatch)
    with pytest.raises(InputFileError) as info:
        fileio.read_safetensors_header(path)
    B.assert_helpful(info.value, (("limit",),), path)
    # only the first bytes (the length field, and enough to tell what kind of file it is) may be read
    assert reads == [fileio.SNIFF_BYTES]


def test_header_limit_is_the_librarys_and_checked_unread(tmp_path, monkeypatch):
    """A length field just over the safetensors library's 100,000,000-byte bound (but under 100 MiB) is refused
    from the field alone, as the library refuses it, naming the limit; before, 100 MB were read and parsed."""
    from safetensors.torch import load_file

    path = B.header_over_library_limit(tmp_path)
    with pytest.raises(Exception, match="too large"):
        load_file(str(path))
    reads = _count_reads(monkeypatch)
    with pytest.raises(InputFileError) as info:
        fileio.read_safetensors_header(path)
    B.assert_helpful(info.value, (("limit of 100,000,000 bytes",),), path)
    assert reads == [fileio.SNIFF_BYTES]


def test_nesting_is_refused_before_parsing_and_counted_outside_strings(tmp_path, monkeypatch):
    """Deep nesting is refused without the JSON parser (which would recurse once per level); brackets and
    escaped quotes inside metadata strings are text, not nesting, so a valid file full of them still reads."""
    def no_parse(*a, **kw):
        raise AssertionError("the JSON parser was called on a too deeply nested header")

    with monkeypatch.context() as m:
        m.setattr(fileio.json, "loads", no_parse)
        for depth in (fileio.MAX_HEADER_DEPTH, 100_000):  # + 1 level for the header object itself
            body = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
            path = B.raw_safetensors(tmp_path / f"deep{depth}.safetensors", body, b"")
            with pytest.raises(InputFileError, match="nests more than"):
                fileio.read_safetensors_header(path)
    header, data = B.valid_parts()
    odd = "[" * 40 + '\\"{' * 40 + "]" * 90 + '\\' + "{" * 30
    header["__metadata__"].update({"ss_tag_frequency": odd, "[[[": "]]]"})
    path = B.raw_safetensors(tmp_path / "brackets.safetensors", header, data)
    assert fileio.read_safetensors_header(path)[1]["ss_tag_frequency"] == odd
    assert fileio.load_safetensors(path)[1]["[[["] == "]]]"


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_diffusers_folder_weights_go_through_the_checked_reader(component, tmp_path):
    """A diffusers folder cloned without Git LFS (pointer files where the weights should be) says so and names
    the file, as a single file does; before, the user got diffusers' "Error while deserializing header"."""
    model = B.demo_copy(tmp_path)
    weights = model / component / f"{B.WEIGHT_FILES[component]}.safetensors"
    weights.write_text(B.LFS_POINTER)
    with pytest.raises(InputFileError) as info:
        load_pipeline(model)
    B.assert_helpful(info.value, (("git lfs pointer",), ("git lfs pull",)), weights)
    assert str(weights) in str(info.value)


def test_header_reader_agrees_with_the_safetensors_library(tmp_path):
    """Each corrupt case the header check refuses, the library refuses too: the header check is not stricter
    than the format (the valid-file test above shows it accepts a good file)."""
    from safetensors.torch import load_file

    for name, (build, _) in B.SAFETENSORS_CASES.items():
        if name in ("directory", "missing"):
            continue
        folder = tmp_path / name
        folder.mkdir()
        path = build(folder)
        with pytest.raises(Exception):
            load_file(str(path))


def test_library_lists_every_broken_file_with_its_reason(tmp_path):
    """The LoRA folder browser keeps going past broken files (and pickles): each is listed with an error."""
    from lora_studio.library import scan_library

    for name, (build, _) in B.SAFETENSORS_CASES.items():
        if name not in ("directory", "missing"):
            folder = tmp_path / name
            folder.mkdir()
            build(folder)
            for helper in folder.glob("whole.safetensors"):  # the valid file some builders cut from
                helper.unlink()
    B.malicious_pickle(tmp_path, ".ckpt", tmp_path / "code-ran.txt")
    items = scan_library(tmp_path)
    assert len(items) == len(B.SAFETENSORS_CASES) - 2 + 1  # + the pickle
    assert all(item.error for item in items), [i.name for i in items if not i.error]
    assert not (tmp_path / "code-ran.txt").exists()
