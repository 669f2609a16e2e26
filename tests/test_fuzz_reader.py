"""Property: any bytes given to the LoRA reader and the inspector either load or raise ``LoraStudioError``;
never another exception (a crash in the UI). Inputs: random bytes and mutations of valid LoRA files (bit
flips, truncation, splices, header edits of dtype/shape/offsets/names/metadata). Deterministic for CI."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import bad_inputs as B
from lora_studio.errors import LoraStudioError
from lora_studio.lora.formats import read_lora
from lora_studio.lora.inspect import inspect_lora

M = B.MODULE


def _seeds() -> list[bytes]:
    """Valid files of several layouts: kohya LoRA, LoHa, LoKr (factored), peft, with metadata."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    lora = {f"{M}.lora_down.weight": r(2, 32), f"{M}.lora_up.weight": r(32, 2), f"{M}.alpha": torch.tensor(2.0)}
    loha = {f"{M}.hada_w1_a": r(32, 2), f"{M}.hada_w1_b": r(2, 32), f"{M}.hada_w2_a": r(32, 2),
            f"{M}.hada_w2_b": r(2, 32), f"{M}.alpha": torch.tensor(1.0)}
    lokr = {f"{M}.lokr_w1_a": r(4, 2), f"{M}.lokr_w1_b": r(2, 4), f"{M}.lokr_w2": r(8, 8)}
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": r(2, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": r(32, 2)}
    meta = {"ss_network_dim": "2", "ss_tag_frequency": json.dumps({"10_stripes": {"stripes": 3}})}
    return [save(t, metadata=meta) for t in (lora, loha, lokr)] + [save(peft)]


SEEDS = _seeds()
for seed in SEEDS:  # the seeds themselves are valid, so what fails below is caused by the mutation
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "s.safetensors").write_bytes(seed)
        read_lora(Path(d) / "s.safetensors")

JUNK = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.text(max_size=6), st.none(), st.booleans(),
                 st.floats(allow_nan=True), st.lists(st.integers(-3, 2 ** 40), max_size=5),
                 st.lists(st.integers(0, 600), min_size=2, max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def mutated(draw) -> bytes:
    base = bytearray(draw(st.sampled_from(SEEDS)))
    how = draw(st.sampled_from(["flip", "truncate", "splice", "header", "header", "length"]))
    if how == "flip":
        for pos in draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=8)):
            base[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(base)
    if how == "truncate":
        return bytes(base[: draw(st.integers(0, len(base) - 1))])
    if how == "splice":
        at = draw(st.integers(0, len(base)))
        return bytes(base[:at]) + draw(st.binary(max_size=64)) + bytes(base[at:])
    header, data = _split(bytes(base))
    if how == "length":
        body = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1))) + body + data
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    edit = draw(st.sampled_from(["field", "rename", "drop", "metadata", "alias", "reshape", "retype"]))
    if edit == "reshape":  # same bytes, another shape: the format stays valid, the LoRA may not
        numel = 1
        for d in header[name]["shape"]:
            numel *= d
        header[name]["shape"] = draw(st.sampled_from([[], [numel], [1, numel], [numel, 1], [numel, 1, 1, 1],
                                                      [1, 1, numel], [0, numel]] if numel else [[0], [0, 4]]))
        if header[name]["shape"] == []:
            header[name]["shape"] = [numel] if numel != 1 else []
    elif edit == "retype":  # same width, another type: integer or unsigned "weights"
        header[name]["dtype"] = draw(st.sampled_from(["I32", "U32", "F32"]))
    elif edit == "field":
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
            st.one_of(JUNK, st.sampled_from(["F16", "BF16", "I8", "BOOL", "F64", "U8"])))
    elif edit == "rename":
        header[draw(st.one_of(st.text(max_size=40), st.sampled_from([
            f"{M}.lora_mid.weight", f"{M}.dora_scale", f"{M}.oft_blocks", "bundle_emb.x", "text_encoder:0:up",
            "lora_te2_x.lora_down.weight", "unet.x.lora_A.weight", f"{M}.hada_t1", f"{M}.diff"])))] = header.pop(name)
    elif edit == "drop":
        del header[name]
    elif edit == "metadata":
        header["__metadata__"] = draw(st.one_of(JUNK, st.dictionaries(
            st.sampled_from(["ss_tag_frequency", "lora_adapter_metadata", "ss_base_model_version",
                             "modelspec.architecture", "unet", "text_encoder"]), st.one_of(st.text(max_size=20), JUNK),
            max_size=3)))
    else:  # two names share one tensor's bytes
        header[draw(st.text(min_size=1, max_size=10))] = dict(header[name])
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(st.binary(max_size=400), mutated(), mutated(), mutated()))
def test_reader_and_inspector_load_or_raise_lora_studio_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(data)
        for read in (read_lora, inspect_lora):
            try:
                read(path)
            except LoraStudioError as err:
                assert str(err).strip()
