"""A corpus of bad inputs: each builder writes one broken file (or folder) into a given folder and returns its path.

Used by tests/test_bad_*.py, test_pickles.py and test_fuzz_reader.py. Every case is paired with the words its
error message must contain, so a test checks that the message says *what* is wrong, not only that it raised.

Counts (kept in step with the tests and the README section "Bad inputs and faults"):
    inputs tried:    147 hand-made bad inputs: 6 validation/tracker settings and 7 options of another LoRA
                     network refused by TrainConfig, and these 134 (32 safetensors incl. JSON/HTML/LFS/picture/
                     pickle/zip files and deep or over-long headers; 19 LoRA contents incl. int/bool/complex factors, vector and peft
                     alphas, a 3e38 alpha, + 5 family/NaN/overflow cases; 5 pickles + 7 pickle-only or LFS
                     diffusers folders and checkpoints; 21 pictures/captions/folders incl. BOM-less UTF-16,
                     control characters, a 1 MB caption, a latin-1 file name, absurd repeats; 25 configs/presets/
                     CLI settings incl. names that leave the run folder; 8 damaged training states; 12 mix/launch
                     arguments: F:nan, F:abc, missing files and folders, a preset's lora_dir, --listen/--share
                     without --auth, a sampler whose package is missing) in about 380 (input, reader) checks,
                     plus 200 hypothesis inputs x 2 readers (read_lora, inspect_lora)
    faults injected: 18 (StopFlag at 3 seeded steps, SIGINT, SIGTERM; ENOSPC half-way through a LoRA save, a
                     state save, a single-file export and the demo sample grid; a real EFBIG (RLIMIT_FSIZE) in
                     safetensors, torch.save and a diffusers-folder export; a file in the way of the run folder,
                     the state folder, an atomic write and an export; torch.OutOfMemoryError in a step; kill -9
                     during an export, then the next write)
    failures found and fixed: 46 (listed in the README section)

Safetensors files are written byte by byte here (not with the safetensors library) so that a header can say
exactly the wrong thing. Layout: 8-byte little-endian header length, the JSON header, then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

# A small valid kohya LoRA module for the demo UNet (to_q of the first transformer: 32 -> 32).
MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def raw_safetensors(path: Path, header: dict | bytes, data: bytes, declared_len: int | None = None) -> Path:
    """Write ``header`` (a dict dumped to JSON, or raw bytes) with ``declared_len`` as its length field."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def valid_parts(rank: int = 2, width: int = 32) -> tuple[dict, bytes]:
    """Header and data of a valid kohya LoRA file with one module (down, up, alpha), float32."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"{MODULE}.lora_down.weight": torch.randn(rank, width, generator=g) * 0.1,
               f"{MODULE}.lora_up.weight": torch.randn(width, rank, generator=g) * 0.1,
               f"{MODULE}.alpha": torch.tensor(float(rank))}
    header: dict = {"__metadata__": {"ss_network_dim": str(rank)}}
    data, offset = b"", 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


def write_valid(folder: Path, name: str = "valid.safetensors") -> Path:
    header, data = valid_parts()
    return raw_safetensors(Path(folder) / name, header, data)


def _edit(folder: Path, name: str, change: Callable[[dict], None]) -> Path:
    header, data = valid_parts()
    change(header)
    return raw_safetensors(Path(folder) / name, header, data)


def _entry(h: dict, suffix: str = "lora_down.weight") -> dict:
    return h[f"{MODULE}.{suffix}"]


# --------------------------------------------------------------------------- broken safetensors files
def zero_byte(folder: Path) -> Path:
    p = Path(folder) / "empty.safetensors"
    p.write_bytes(b"")
    return p


def too_short(folder: Path) -> Path:
    p = Path(folder) / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    return p


def truncated_data(folder: Path) -> Path:
    """A download cut off in the tensor data: the header is whole, the data is not."""
    good = write_valid(folder, "whole.safetensors").read_bytes()
    p = Path(folder) / "truncated.safetensors"
    p.write_bytes(good[:-40])
    return p


def truncated_header(folder: Path) -> Path:
    """A download cut off inside the JSON header."""
    good = write_valid(folder, "whole.safetensors").read_bytes()
    p = Path(folder) / "truncated-header.safetensors"
    p.write_bytes(good[:30])
    return p


def header_longer_than_file(folder: Path) -> Path:
    header, data = valid_parts()
    return raw_safetensors(Path(folder) / "longheader.safetensors", header, data, declared_len=10_000_000)


def huge_header(folder: Path) -> Path:
    """A length field of 2**40 bytes: a reader that trusted it would try to allocate a terabyte."""
    header, data = valid_parts()
    return raw_safetensors(Path(folder) / "huge.safetensors", header, data, declared_len=2 ** 40)


def invalid_json(folder: Path) -> Path:
    return raw_safetensors(Path(folder) / "badjson.safetensors", b'{"a": {"dtype": "F32", "shape": [1', b"\0" * 4)


def non_utf8_header(folder: Path) -> Path:
    return raw_safetensors(Path(folder) / "latin.safetensors", b'{"\xff\xfe": 1}', b"")


def header_not_object(folder: Path) -> Path:
    return raw_safetensors(Path(folder) / "list.safetensors", b"[1, 2, 3]", b"")


def offsets_out_of_range(folder: Path) -> Path:
    def change(h):
        _entry(h, "alpha")["data_offsets"] = [512, 10_000]
    return _edit(folder, "outside.safetensors", change)


def offsets_overlap(folder: Path) -> Path:
    """Two tensors claim the same bytes (lora_up set to lora_down's span, both 256 bytes)."""
    def change(h):
        _entry(h, "lora_up.weight")["data_offsets"] = list(_entry(h)["data_offsets"])
    return _edit(folder, "overlap.safetensors", change)


def offsets_reversed(folder: Path) -> Path:
    def change(h):
        _entry(h)["data_offsets"] = [256, 0]
    return _edit(folder, "reversed.safetensors", change)


def offsets_wrong_size(folder: Path) -> Path:
    """Offsets inside the file, but 128 bytes for a (2, 32) float32 tensor that needs 256."""
    def change(h):
        _entry(h)["data_offsets"] = [0, 128]
    return _edit(folder, "wrongsize.safetensors", change)


def offsets_malformed(folder: Path) -> Path:
    def change(h):
        _entry(h)["data_offsets"] = [0]
    return _edit(folder, "oneoffset.safetensors", change)


def wrong_dtype(folder: Path) -> Path:
    def change(h):
        _entry(h)["dtype"] = "float32"
    return _edit(folder, "dtype.safetensors", change)


def shape_malformed(folder: Path) -> Path:
    def change(h):
        _entry(h)["shape"] = [-2, "32"]
    return _edit(folder, "shape.safetensors", change)


def entry_malformed(folder: Path) -> Path:
    def change(h):
        del _entry(h)["dtype"]
    return _edit(folder, "entry.safetensors", change)


def metadata_not_object(folder: Path) -> Path:
    def change(h):
        h["__metadata__"] = ["ss_network_dim", "2"]
    return _edit(folder, "meta.safetensors", change)


def deep_nesting(folder: Path) -> Path:
    """A header of 100,000 nested lists (before the fix: RecursionError in the JSON parser)."""
    body = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return raw_safetensors(Path(folder) / "nested.safetensors", body, b"")


def header_over_library_limit(folder: Path) -> Path:
    """A length field of 100,000,001: over the safetensors library's 100 MB bound, under 100 MiB. The file is
    sparse and that long, so a reader that trusted the field would read (and parse) 100 MB of zeros."""
    p = Path(folder) / "overlimit.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(8 + 100_000_001 + 16)
    return p


# --------------------------------------------------------------------------- other files saved as .safetensors
def _text_as(folder: Path, name: str, text: str) -> Path:
    p = Path(folder) / name
    p.write_text(text)
    return p


def json_reply(folder: Path) -> Path:
    """What a download site answers instead of the file (saved by a script under the model's name)."""
    return _text_as(folder, "api.safetensors",
                    '{"error": "Unauthorized", "message": "log in to download this model"}')


def html_page(folder: Path) -> Path:
    return _text_as(folder, "page.safetensors",
                    "\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n")


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 3438167536\n")


def lfs_pointer(folder: Path) -> Path:
    """What `git clone` of a Hugging Face repository leaves without Git LFS."""
    return _text_as(folder, "pointer.safetensors", LFS_POINTER)


def _picture_as(folder: Path, name: str, fmt: str) -> Path:
    from PIL import Image

    p = Path(folder) / name
    with open(p, "wb") as fh:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(fh, format=fmt)
    return p


def png_picture(folder: Path) -> Path:
    return _picture_as(folder, "preview.safetensors", "PNG")


def jpeg_picture(folder: Path) -> Path:
    return _picture_as(folder, "photo.safetensors", "JPEG")


def webp_picture(folder: Path) -> Path:
    return _picture_as(folder, "thumb.safetensors", "WEBP")


def pickle_renamed(folder: Path) -> Path:
    """An old-style (pre-zip) torch checkpoint, renamed .safetensors."""
    p = Path(folder) / "old.safetensors"
    torch.save({f"{MODULE}.lora_down.weight": torch.ones(2, 32)}, p, _use_new_zipfile_serialization=False)
    return p


def torch_zip_renamed(folder: Path) -> Path:
    """A torch.save checkpoint (zip of data.pkl + tensors), renamed .safetensors."""
    p = Path(folder) / "saved.safetensors"
    torch.save({f"{MODULE}.lora_down.weight": torch.ones(2, 32)}, p)
    return p


def zip_archive(folder: Path) -> Path:
    """A zip holding a LoRA (as some sites ship them), saved as .safetensors."""
    import zipfile

    p = Path(folder) / "bundle.safetensors"
    with zipfile.ZipFile(p, "w") as archive:
        archive.writestr("style.safetensors", write_valid(folder, "inner.safetensors").read_bytes())
    (Path(folder) / "inner.safetensors").unlink()
    return p


def text_reply(folder: Path) -> Path:
    """The Hugging Face hub's answer for a file that is not there."""
    return _text_as(folder, "hub.safetensors", "Entry not found")


def directory(folder: Path) -> Path:
    p = Path(folder) / "folder.safetensors"
    p.mkdir()
    return p


def missing(folder: Path) -> Path:
    return Path(folder) / "nowhere.safetensors"


# name -> (builder, words the message must contain (any one of each tuple, case-insensitive))
SAFETENSORS_CASES: dict[str, tuple[Callable[[Path], Path], tuple[tuple[str, ...], ...]]] = {
    "zero_byte": (zero_byte, (("0 bytes", "empty"),)),
    "too_short": (too_short, (("too short", "3 bytes"),)),
    "truncated_data": (truncated_data, (("truncated", "cut off"),)),
    "truncated_header": (truncated_header, (("truncated", "cut off"),)),
    "header_longer_than_file": (header_longer_than_file, (("header",), ("truncated",))),
    "huge_header": (huge_header, (("header",), ("limit", "larger than"))),
    "invalid_json": (invalid_json, (("json",),)),
    "non_utf8_header": (non_utf8_header, (("json", "utf-8"),)),
    "header_not_object": (header_not_object, (("json object",),)),
    "offsets_out_of_range": (offsets_out_of_range, (("outside",),)),
    "offsets_overlap": (offsets_overlap, (("overlap",),)),
    "offsets_reversed": (offsets_reversed, (("offsets",),)),
    "offsets_wrong_size": (offsets_wrong_size, (("bytes",), ("shape",))),
    "offsets_malformed": (offsets_malformed, (("data_offsets",),)),
    "wrong_dtype": (wrong_dtype, (("dtype",), ("float32",))),
    "shape_malformed": (shape_malformed, (("shape",),)),
    "entry_malformed": (entry_malformed, (("malformed", "missing"),)),
    "metadata_not_object": (metadata_not_object, (("__metadata__",),)),
    "deep_nesting": (deep_nesting, (("nests more than",), ("levels",))),
    "header_over_library_limit": (header_over_library_limit, (("100,000,000",), ("limit",))),
    "json_reply": (json_reply, (("json text",), ("unauthorized",))),
    "html_page": (html_page, (("web page",), ("<!doctype html>",))),
    "lfs_pointer": (lfs_pointer, (("git lfs pointer",), ("git lfs pull",))),
    "png_picture": (png_picture, (("png picture",),)),
    "jpeg_picture": (jpeg_picture, (("jpeg picture",),)),
    "webp_picture": (webp_picture, (("webp picture",),)),
    "pickle_renamed": (pickle_renamed, (("pickle",), ("unpickling",), ("allow-pickle",))),
    "torch_zip_renamed": (torch_zip_renamed, (("pytorch checkpoint",), ("zip",), ("unpickling",))),
    "zip_archive": (zip_archive, (("zip archive",), ("unpack",))),
    "text_reply": (text_reply, (("plain text",), ("entry not found",))),
    "directory": (directory, (("folder",),)),
    "missing": (missing, (("does not exist",),)),
}


# --------------------------------------------------------------------------- diffusers folders
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def demo_copy(folder: Path) -> Path:
    """A copy of the demo model's diffusers folder, to break."""
    import shutil

    from lora_studio.demo import ensure_demo_model

    return Path(shutil.copytree(ensure_demo_model(), Path(folder) / "model"))


def pickle_diffusers_folder(folder: Path, component: str = "unet", payload: object = None) -> Path:
    """The demo model whose ``component`` weights are a pickle ``.bin`` (as older hub repositories hold them:
    ``diffusion_pytorch_model.bin``, ``pytorch_model.bin``) and no ``.safetensors``; with ``payload``, the
    pickle also holds that object."""
    from safetensors.torch import load_file

    model = demo_copy(folder)
    weights = model / component / f"{WEIGHT_FILES[component]}.safetensors"
    tensors: dict = load_file(str(weights))
    if payload is not None:
        tensors["payload"] = payload
    torch.save(tensors, model / component / ("pytorch_model.bin" if component.startswith("text_encoder")
                                             else "diffusion_pytorch_model.bin"))
    weights.unlink()
    return model


# --------------------------------------------------------------------------- LoRA contents
def lora_file(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    p = Path(folder) / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=metadata or {})
    return p


def lora_pair(rank: int = 2, out: int = 32, inp: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{MODULE}.lora_down.weight": torch.randn(rank, inp, generator=g) * 0.1,
            f"{MODULE}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1,
            f"{MODULE}.alpha": torch.tensor(float(max(rank, 1)))}


def unknown_scheme(folder: Path) -> Path:
    return lora_file(folder, "unknown.safetensors", {"encoder.layer1.adapter.weight": torch.zeros(2, 2),
                                                     "model.blocks.0.w": torch.zeros(3)})


def shape_mismatch(folder: Path) -> Path:
    """Names of the demo model's layers, widths of another model (48 inputs where the layer has 32)."""
    return lora_file(folder, "wrongshape.safetensors", lora_pair(inp=48))


def nan_weights(folder: Path) -> Path:
    t = lora_pair()
    t[f"{MODULE}.lora_up.weight"][3, 1] = float("nan")
    return lora_file(folder, "nan.safetensors", t)


def inf_weights_fp16(folder: Path) -> Path:
    t = {k: v.half() for k, v in lora_pair().items()}
    t[f"{MODULE}.lora_down.weight"][0, 0] = float("inf")
    return lora_file(folder, "inf16.safetensors", t)


def rank_zero(folder: Path) -> Path:
    return lora_file(folder, "rank0.safetensors", lora_pair(rank=0))


def missing_up(folder: Path) -> Path:
    t = lora_pair()
    del t[f"{MODULE}.lora_up.weight"]
    return lora_file(folder, "noup.safetensors", t)


def ranks_disagree(folder: Path) -> Path:
    t = lora_pair()
    t[f"{MODULE}.lora_up.weight"] = torch.zeros(32, 3)
    return lora_file(folder, "ranks.safetensors", t)


def loha_inner_mismatch(folder: Path) -> Path:
    """LoHa whose factors cannot multiply: hada_w1_a is (32, 4) but hada_w1_b is (3, 32)."""
    return lora_file(folder, "loha-bad.safetensors", {
        f"{MODULE}.hada_w1_a": torch.zeros(32, 4), f"{MODULE}.hada_w1_b": torch.zeros(3, 32),
        f"{MODULE}.hada_w2_a": torch.zeros(32, 4), f"{MODULE}.hada_w2_b": torch.zeros(4, 32),
        f"{MODULE}.alpha": torch.tensor(4.0)})


def lokr_rank_zero(folder: Path) -> Path:
    """LoKr with empty factors (w1 = w1_a @ w1_b over rank 0): its delta would be all zeros."""
    return lora_file(folder, "lokr0.safetensors", {
        f"{MODULE}.lokr_w1_a": torch.zeros(4, 0), f"{MODULE}.lokr_w1_b": torch.zeros(0, 4),
        f"{MODULE}.lokr_w2": torch.zeros(8, 8), f"{MODULE}.alpha": torch.tensor(1.0)})


def one_dim_factor(folder: Path) -> Path:
    """lora_down stored as a 1-D vector (a damaged or hand-edited file)."""
    t = lora_pair()
    t[f"{MODULE}.lora_down.weight"] = torch.zeros(2)
    return lora_file(folder, "flat.safetensors", t)


def scalar_factor(folder: Path) -> Path:
    """lora_down stored as a 0-D scalar (before the fix: IndexError in the reader)."""
    t = lora_pair()
    t[f"{MODULE}.lora_down.weight"] = torch.tensor(0.5)
    return lora_file(folder, "scalar.safetensors", t)


def empty_alpha(folder: Path) -> Path:
    t = lora_pair()
    t[f"{MODULE}.alpha"] = torch.zeros(0)
    return lora_file(folder, "emptyalpha.safetensors", t)


def nan_alpha(folder: Path) -> Path:
    t = lora_pair()
    t[f"{MODULE}.alpha"] = torch.tensor(float("nan"))
    return lora_file(folder, "nanalpha.safetensors", t)


def _factor_as(folder: Path, name: str, dtype: torch.dtype) -> Path:
    t = lora_pair()
    t[f"{MODULE}.lora_down.weight"] = (t[f"{MODULE}.lora_down.weight"] * 100).to(dtype)
    return lora_file(folder, name, t)


def int_factor(folder: Path) -> Path:
    """lora_down stored as int32 (before the fix: converted to float and applied)."""
    return _factor_as(folder, "int.safetensors", torch.int32)


def bool_factor(folder: Path) -> Path:
    """lora_down stored as bool (before the fix: applied as 0/1)."""
    return _factor_as(folder, "bool.safetensors", torch.bool)


def complex_factor(folder: Path) -> Path:
    """lora_down stored as complex64 (before the fix: its imaginary part dropped and the rest applied)."""
    return _factor_as(folder, "complex.safetensors", torch.complex64)


def vector_alpha(folder: Path) -> Path:
    """alpha stored as a vector of 4 values (before the fix: its first element was used)."""
    t = lora_pair()
    t[f"{MODULE}.alpha"] = torch.tensor([2.0, 5.0, 5.0, 5.0])
    return lora_file(folder, "vecalpha.safetensors", t)


def huge_alpha(folder: Path) -> Path:
    """alpha 3e38: finite in fp32, so the reader takes it, but its delta is ~1e37, about 1e37 times the weight it
    changes (before the fix: mixed in silently, and written as inf by a fp16 merge)."""
    t = lora_pair()
    t[f"{MODULE}.alpha"] = torch.tensor(3e38)
    return lora_file(folder, "hugealpha.safetensors", t)


def peft_alpha_not_a_number(folder: Path) -> Path:
    """diffusers/peft layout whose ``lora_adapter_metadata`` gives lora_alpha as a list (before the fix: a
    TypeError traceback from float())."""
    t = lora_pair()
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{prefix}.lora_A.weight": t[f"{MODULE}.lora_down.weight"],
               f"{prefix}.lora_B.weight": t[f"{MODULE}.lora_up.weight"]}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": [4, 4]})}
    return lora_file(folder, "peftalpha.safetensors", tensors, meta)


# name -> (builder, message words); all must be refused by read_lora or by LoraMixer.add on the demo model
LORA_CASES: dict[str, tuple[Callable[[Path], Path], tuple[tuple[str, ...], ...]]] = {
    "unknown_scheme": (unknown_scheme, (("known lora scheme",), ("encoder.layer1",))),
    "shape_mismatch": (shape_mismatch, (("do not fit",), ("another size", "48"))),
    "nan_weights": (nan_weights, (("nan",),)),
    "inf_weights_fp16": (inf_weights_fp16, (("inf",),)),
    "rank_zero": (rank_zero, (("rank 0",),)),
    "missing_up": (missing_up, (("incomplete",), ("lora_up",))),
    "ranks_disagree": (ranks_disagree, (("ranks disagree",),)),
    "loha_inner_mismatch": (loha_inner_mismatch, (("hada_w1",),)),
    "lokr_rank_zero": (lokr_rank_zero, (("rank 0",),)),
    "one_dim_factor": (one_dim_factor, (("lora_down",), ("2 dimensions", "dimension"))),
    "scalar_factor": (scalar_factor, (("lora_down",), ("2 dimensions",))),
    "empty_alpha": (empty_alpha, (("alpha",), ("finite number",))),
    "nan_alpha": (nan_alpha, (("alpha",), ("finite number",))),
    "int_factor": (int_factor, ((f"{MODULE}.lora_down.weight",), ("int32",), ("floating-point",))),
    "bool_factor": (bool_factor, ((f"{MODULE}.lora_down.weight",), ("bool",), ("floating-point",))),
    "complex_factor": (complex_factor, ((f"{MODULE}.lora_down.weight",), ("complex64",), ("floating-point",))),
    "vector_alpha": (vector_alpha, ((f"{MODULE}.alpha",), ("4 values",), ("one finite number",))),
    "peft_alpha_not_a_number": (peft_alpha_not_a_number, (("unet.lora_alpha",), ("[4, 4]",), ("finite number",))),
    "huge_alpha": (huge_alpha, ((MODULE,), ("hugealpha.safetensors",), ("times",), ("lower the strength",))),
}
# refused only where the base model is known: the reader cannot tell these from good files (the first by
# LoraMixer.add, the rest by LoraMixer.apply, which measures each delta against the weight it changes)
REFUSED_BY_APPLY = ("huge_alpha",)
NEEDS_BASE_MODEL = ("shape_mismatch", *REFUSED_BY_APPLY)


# --------------------------------------------------------------------------- pickles
class WritesMarker:
    """Unpickling this object calls ``Path(marker).write_text("pwned")``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def malicious_pickle(folder: Path, suffix: str, marker: Path) -> Path:
    """A torch-saved checkpoint whose state_dict also holds an object that writes ``marker`` when unpickled."""
    p = Path(folder) / f"evil{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2), "payload": WritesMarker(marker)}}, p)
    return p


def plain_pickle(folder: Path, suffix: str) -> Path:
    """A harmless torch checkpoint of plain tensors (what ``allow_pickle`` is for)."""
    p = Path(folder) / f"plain{suffix}"
    torch.save({"state_dict": {f"{MODULE}.lora_down.weight": torch.ones(2, 32)}}, p)
    return p


# --------------------------------------------------------------------------- images and captions
def _save(img, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def image_cases(folder: Path) -> dict[str, Path]:
    """Write every picture case into ``folder`` (flat); returns name -> path. Good ones get a caption sidecar."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    good = _save(rgb, folder / "good.jpg", quality=90)
    out["truncated_jpeg"] = folder / "truncated.jpg"
    out["truncated_jpeg"].write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out["cmyk_jpeg"] = _save(rgb.convert("CMYK"), folder / "cmyk.jpg")
    arr16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    out["png16"] = _save(Image.fromarray(arr16), folder / "grey16.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    out["palette_transparent"] = _save(pal, folder / "palette.png", transparency=0)
    # a tall picture (40 wide, 64 high) tagged "rotate 90" (EXIF orientation 6): shown, it is 64 wide, 40 high
    tall = Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif_rotated"] = _save(tall, folder / "rotated.jpg", exif=exif.tobytes())
    out["one_pixel"] = _save(Image.new("RGB", (1, 1), (200, 10, 10)), folder / "dot.png")
    out["not_an_image"] = folder / "notes.png"
    out["not_an_image"].write_text("this is a text file with an image extension\n")
    good.unlink()
    return out


def large_image(folder: Path, width: int, height: int) -> Path:
    """A plain PNG of ``width`` x ``height`` (compresses to a few KB, decompresses to width*height*3 bytes)."""
    from PIL import Image

    p = Path(folder) / f"large-{width}x{height}.png"
    Image.new("RGB", (width, height), (30, 90, 200)).save(p, optimize=False)
    return p


def caption_cp1252(path: Path) -> Path:
    path.write_bytes("café crème, naïve résumé – “quoted”".encode("cp1252"))
    return path


def caption_utf16(path: Path) -> Path:
    path.write_bytes("\ufeffcafé crème, naïve".encode("utf-16-le"))
    return path


def caption_utf16_be_no_bom(path: Path) -> Path:
    """UTF-16 without a byte-order mark, high byte first (before the fix: text full of NULs)."""
    path.write_bytes("café crème, naïve\r\n".encode("utf-16-be"))
    return path


def caption_utf16_le_no_bom(path: Path) -> Path:
    path.write_bytes("café crème, naïve\r\n".encode("utf-16-le"))
    return path


def caption_control_chars(path: Path) -> Path:
    """NUL, escape, bell, DEL, a vertical tab between lines and a tab inside a line."""
    path.write_bytes(b"red\x00 circle,\tstriped\x0b\x1bblue\x07 square\x7f\n")
    return path


def caption_huge(path: Path) -> Path:
    """A 1 MB caption of 100,000 distinct tags (before the fix: all of it copied into ss_tag_frequency)."""
    path.write_text(", ".join(f"tag{i:05d}" for i in range(100_000)) + "\n", encoding="utf-8")
    return path


def caption_file_too_large(path: Path) -> Path:
    """A 17 MB file (sparse: written in an instant) beside a picture: not a caption."""
    with open(path, "wb") as fh:
        fh.truncate(17 * 1024 * 1024)
    return path


# name -> (writer of a caption file, the caption training reads from it)
CAPTION_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "cp1252": (caption_cp1252, "café crème, naïve résumé – “quoted”"),
    "utf16_bom": (caption_utf16, "café crème, naïve"),
    "utf16_be_no_bom": (caption_utf16_be_no_bom, "café crème, naïve"),
    "utf16_le_no_bom": (caption_utf16_le_no_bom, "café crème, naïve"),
    "control_chars": (caption_control_chars, "red circle, striped, blue square"),
}


def _picture(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def latin1_file_name(folder: Path) -> Path:
    """A picture named in Latin-1 bytes (b"caf\\xe9_cr\\xe8me.png"), as an old Windows tool or a zip file leaves
    it; Python shows the name with surrogates. Returns the folder; skips where the file system refuses it."""
    import os

    import pytest

    try:
        _picture(Path(folder) / os.fsdecode(b"caf\xe9_cr\xe8me.png"))
    except (OSError, UnicodeError) as err:
        pytest.skip(f"this file system cannot hold a file name that is not UTF-8 ({err})")
    return Path(folder)


def absurd_repeats(folder: Path) -> Path:
    """A kohya folder asking for 999,999,999 repeats (before the fix: hours of listing them, nothing printed)."""
    _picture(Path(folder) / "999999999_x" / "a.png")
    return Path(folder)


def huge_epoch(folder: Path) -> Path:
    """1,001 pictures in a folder at the repeat limit: 10,010,000 pictures an epoch (one small PNG copied)."""
    data = _picture(Path(folder) / "10000_a" / "0000.png").read_bytes()
    for i in range(1, 1001):
        (Path(folder) / "10000_a" / f"{i:04d}.png").write_bytes(data)
    return Path(folder)


def too_large_caption_folder(folder: Path) -> Path:
    caption_file_too_large(_picture(Path(folder) / "a.png").with_suffix(".txt"))
    return Path(folder)


# name -> (builder of a training folder, words of the DatasetError that scanning it must raise)
FOLDER_CASES: dict[str, tuple[Callable[[Path], Path], tuple[tuple[str, ...], ...]]] = {
    "absurd_repeats": (absurd_repeats, (("999999999_x",), ("999,999,999 repeats",), ("limit of 10,000",))),
    "huge_epoch": (huge_epoch, (("10,010,000 pictures",), ("limit of 10,000,000",), ("10000_a",))),
    "caption_file_too_large": (too_large_caption_folder, (("a.txt",), ("17 MB",), ("too large to be a caption",))),
}


# --------------------------------------------------------------------------- configs and presets
CONFIG_CASES: dict[str, tuple[dict, tuple[tuple[str, ...], ...]]] = {
    "unknown_key": ({"stepz": 10}, (("unknown key",), ("stepz",))),
    "wrong_type_str_for_int": ({"steps": "ten"}, (("wrong type",), ("steps",), ("whole number",))),
    "wrong_type_bool_for_int": ({"rank": True}, (("wrong type",), ("rank",))),
    "wrong_type_list": ({"target_modules": "to_q"}, (("wrong type",), ("list of strings",))),
    "zero_steps": ({"steps": 0}, (("steps = 0",), ("positive",))),
    "negative_steps": ({"steps": -5}, (("steps = -5",), ("positive",))),
    "negative_lr": ({"learning_rate": -1e-4}, (("learning_rate",), ("greater than 0",))),
    "nan_lr": ({"learning_rate": float("nan")}, (("learning_rate",), ("greater than 0",))),
    "not_an_object": ([1, 2, 3], (("json object",),)),
    "output_name_escapes": ({"output_name": "../../evil"}, (("output_name",), ("'../../evil'",), ("plain name",))),
    "output_name_backslash": ({"output_name": "..\\evil"}, (("output_name",), ("plain name",))),
    "run_name_hidden": ({"run_name": ".."}, (("run_name",), ("plain name",), ("dot",))),
    "output_name_device": ({"output_name": "NUL"}, (("output_name",), ("device",))),
    "output_name_too_long": ({"output_name": "x" * 200}, (("output_name",), ("200 bytes",))),
    "validation_split_one": ({"validation_split": 1.0}, (("validation_split = 1.0",), ("[0, 1)",))),
    "validation_split_negative": ({"validation_split": -0.1}, (("validation_split = -0.1",), ("[0, 1)",))),
    "validate_every_negative": ({"validate_every_n_steps": -1}, (("validate_every_n_steps = -1",), ("0 or more",))),
    "validate_without_a_set": ({"validate_every_n_steps": 5}, (("validate_every_n_steps",), ("validation_split",))),
    "validation_split_and_dir": ({"validation_split": 0.1, "validation_dir": "val"},
                                 (("validation_split",), ("validation_dir",), ("choose one",))),
    "log_with_unknown": ({"log_with": "mlflow"}, (("log_with",), ("'mlflow'",), ("tensorboard",))),
}


# --------------------------------------------------------------------------- checking messages
# Words that start the "what to do" part of a message (every LoraStudioError must say what to do).
ADVICE = ("download", "check", "use ", "give", "choose", "convert", "remove", "lower", "fix", "pass ", "put ",
          "free ", "export", "resume", "set ", "start", "load a", "pick", "rename", "copy", "add ", "turn on",
          "swap", "name ", "train", "move", "install", "must be", "must start", "should")


def assert_helpful(err: BaseException, words: tuple[tuple[str, ...], ...] = (), path: Path | None = None) -> None:
    """The message names the problem (one word of each tuple), names the file when given, and gives advice."""
    from lora_studio.errors import LoraStudioError

    assert isinstance(err, LoraStudioError), f"{type(err).__name__} is not a LoraStudioError: {err}"
    msg = str(err)
    low = msg.lower()
    for options in words:
        assert any(w.lower() in low for w in options), f"message lacks any of {options}: {msg}"
    if path is not None:
        assert Path(path).name in msg, f"message does not name {Path(path).name}: {msg}"
    assert any(a in low for a in ADVICE), f"message gives no advice: {msg}"
    assert "Traceback" not in msg
