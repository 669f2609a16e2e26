"""kill -9 during an export leaves the atomic writer's hidden temporary file (or folder) behind. The next atomic
write into that folder removes such leftovers, and never a temporary file that a live writer still owns."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lora_studio import fileio

REPO = Path(__file__).resolve().parents[1]
MINUTE, DAY = 60, 86400

KILLED_WRITER = """
import sys, time
from pathlib import Path
from lora_studio.fileio import atomic_dir, atomic_path
folder = Path(sys.argv[1])
with atomic_path(folder / "lora.safetensors") as tmp, atomic_dir(folder / "model") as tmp_dir:
    tmp.write_bytes(b"half a LoRA")
    (tmp_dir / "unet").mkdir()
    (tmp_dir / "unet" / "weights.safetensors").write_bytes(b"half a UNet")
    print("writing", flush=True)
    time.sleep(600)
"""


def _killed_mid_write(folder: Path) -> list[Path]:
    """Start an export of a file and a folder into ``folder`` and kill -9 it half-way; returns what it left."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.wait()
    left = sorted(p for p in folder.iterdir() if p.name.endswith(".part"))
    assert len(left) == 2 and any(p.is_dir() for p in left), left
    return left


def _age(path: Path, seconds: float) -> None:
    """Make ``path``, and everything in it, look unmodified for ``seconds``."""
    t = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def _make(path: Path, seconds_old: float, folder: bool = False) -> Path:
    if folder:
        (path / "unet").mkdir(parents=True)
        (path / "unet" / "w.bin").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    _age(path, seconds_old)
    return path


def test_next_write_removes_what_killed_writes_left_and_keeps_live_ones(tmp_path):
    killed = _killed_mid_write(tmp_path)
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
    stale = {  # an earlier version's names (no pid in them), two days old
        _make(tmp_path / ".style.safetensors.k2j4h5g1.part", DAY * 2),
        _make(tmp_path / ".merged.q8w7e6r5.part", DAY * 2, folder=True),
    }
    kept = {
        _make(tmp_path / ".other.safetensors.a1b2c3d4.part", 0),  # an earlier version may be writing it now
        _make(tmp_path / f".shared.safetensors.4242-{'0' * 6 if host != '0' * 6 else '1' * 6}.abcdefgh.part",
              10 * MINUTE),  # another machine's on a shared folder: its pid cannot be checked from here
        _make(tmp_path / ".notes.part", DAY * 2),  # names of other programs, however old
        _make(tmp_path / "lora.safetensors.part", DAY * 2),
        _make(tmp_path / ".step-000010.part", DAY * 2, folder=True),
    }
    with fileio.atomic_path(tmp_path / "live.safetensors") as live:  # this process's own write, still going on
        live.write_bytes(b"being written")
        _age(live, DAY * 2)
        fileio.write_text_atomic(tmp_path / "a.txt", "x")
        # killed seconds ago: left for now (a pid can belong to another container's pid namespace)
        assert {p for p in tmp_path.iterdir() if p.name.endswith(".part")} == kept | set(killed) | {live}
        assert not any(p.exists() for p in stale)
        for p in killed:
            _age(p, 10 * MINUTE)
        with fileio.atomic_dir(tmp_path / "model") as folder:
            (folder / "config.json").write_text("{}")
        assert not any(p.exists() for p in killed)
        assert {p for p in tmp_path.iterdir() if p.name.endswith(".part")} == kept | {live}
    assert (tmp_path / "live.safetensors").read_bytes() == b"being written"
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "a.txt").read_text() == "x"
    long_name = tmp_path / ("long" * 61 + ".txt")  # 248 bytes: the pid and host in the temporary name still fit
    fileio.write_text_atomic(long_name, "y")
    assert long_name.read_text() == "y"
