"""Telling what a file is from its first bytes, and refusing pickles: a file given as weights that is something
else (a saved web page, a Git LFS pointer, a picture, a pickle) is named for what it is."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path


from ..errors import InputFileError, UnsafeFileError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
SNIFF_BYTES = 64  # how much of a file is looked at to tell what it is


def refuse_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Raise ``UnsafeFileError`` for pickle formats unless the user opted in."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeFileError(
            f"{path} is a {suffix} file: loading it means unpickling, which can run arbitrary code. "
            "Use a .safetensors file instead, or pass --allow-pickle if you trust its source "
            "(it is then read with torch.load(weights_only=True)).")


_PICKLE_ADVICE = ("loading it means unpickling, which can run arbitrary code. Use a .safetensors file instead, or, "
                  "if you trust its source, rename it to .ckpt and pass --allow-pickle (it is then read with "
                  "torch.load(weights_only=True)).")


def sniff(head: bytes) -> str | None:
    """What the file starting with ``head`` (its first ``SNIFF_BYTES``) is, when it is one of the files that get
    saved or renamed where model weights were expected: "png", "jpeg", "webp", "pickle", "zip", "lfs" (a Git LFS
    pointer), "html" (a web page or a server's XML reply), "json", "text"; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode, protocol 2-5
        return "pickle"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # the last character may be cut in two; a byte-order mark is not printable but starts many text files
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd").lstrip("\ufeff")
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    text = text.lstrip(" \t\r\n")
    if text.startswith("version https://git-lfs.github.com/spec/"):
        return "lfs"
    if text.startswith("<"):
        return "html"
    return "json" if text.startswith(("{", "[")) else "text"


def read_head(path: str | os.PathLike) -> bytes:
    """The first ``SNIFF_BYTES`` of a file, for ``sniff``; empty if it cannot be read (the caller reports that)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(SNIFF_BYTES)
    except OSError:
        return b""


def _excerpt(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd").lstrip("\ufeff \t\r\n")
    line = text.split("\n", 1)[0].rstrip("\r")
    cut = len(line) > 48 or ("\n" not in text and len(head) == SNIFF_BYTES)
    return repr(line[:48] + ("..." if cut else ""))


def not_weights_error(path: str | os.PathLike, head: bytes) -> InputFileError | None:
    """The error for a file that ``sniff`` recognises as something other than weights (None if it does not):
    it names what the file really is and what to do. A pickle or a PyTorch zip is an ``UnsafeFileError``."""
    p = Path(path)
    kind = sniff(head)
    if kind is None:
        return None
    expected = "a PyTorch checkpoint" if p.suffix.lower() in PICKLE_SUFFIXES else "a safetensors file"
    start = f"{p} is not {expected}: it is"
    if kind in ("png", "jpeg", "webp"):
        return InputFileError(f"{start} a {kind.upper().replace('WEBP', 'WebP')} picture, not model weights (a "
                              "preview image saved under the model's name?). Give the .safetensors file itself, or "
                              "download it again.")
    if kind == "pickle":
        return UnsafeFileError(f"{start} a Python pickle (an old-style PyTorch checkpoint): {_PICKLE_ADVICE}")
    if kind == "zip":
        try:
            with zipfile.ZipFile(p) as archive:  # reads the list of members only; nothing is unpickled
                torch_zip = any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
        except Exception:  # a damaged zip raises several types; it is then no checkpoint torch could read either
            torch_zip = False
        if torch_zip:
            return UnsafeFileError(f"{start} a PyTorch checkpoint in torch.save's zip format (a pickle, as "
                                   f".ckpt and .pt files are): {_PICKLE_ADVICE}")
        return InputFileError(f"{start} a zip archive. Unpack it and give the .safetensors file inside.")
    if kind == "lfs":
        return InputFileError(f"{start} a Git LFS pointer, a small text file that stands for the real weights: "
                              "the repository was cloned without Git LFS. Run `git lfs install` and then "
                              "`git lfs pull` in that repository, or download the file itself.")
    what = {"html": "a web page (HTML/XML)", "json": "JSON text", "text": "plain text"}[kind]
    start = f"{start} {what}, starting {_excerpt(head)}"
    if kind == "html":
        return InputFileError(f"{start}: the download failed and the site's page (a login, error or expired-link "
                              "page) was saved instead of the model. Download it again, logged in if the site "
                              "asks, and check that the file's size is what the site says.")
    if kind == "json":
        return InputFileError(f"{start}: a download site's error reply saved under the model's name, or a "
                              "metadata file (name.json, name.civitai.info) given instead of the model. Give the "
                              ".safetensors file itself, or download it again, logged in if the site asks.")
    return InputFileError(f"{start}: not model weights (a download's error message saved under the model's "
                          "name?). Download the file again and check that its size is what the site says.")


def weights_only_refusal(path: str | os.PathLike, err: BaseException) -> UnsafeFileError | None:
    """The error to show when ``err`` (or an error it was raised from, as diffusers re-raises) is
    ``torch.load(weights_only=True)`` refusing a pickle that holds more than tensors; None otherwise."""
    while err is not None:
        text = str(err)
        if "weights_only" in text or "Weights only" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" (it refers to {found.group(1)})" if found else ""
            return UnsafeFileError(f"{path} holds objects other than plain tensors{what}, so it was not loaded: "
                                   "torch.load(weights_only=True) refuses them, as unpickling them could run code. "
                                   "Convert it to .safetensors with a tool you trust, or use another file.")
        err = err.__cause__ or err.__context__
    return None


