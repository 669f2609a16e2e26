"""``pip install .``: the wheel holds every module of the tree and the data files, and an installed copy finds
its presets, demo model and configs inside the package (not in a clone beside it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
from lora_studio.preset_files import PRESETS_DIR
from lora_studio.train.config import list_presets
from lora_studio.demo import ASSETS
from lora_studio.configs import ROOT as CONFIGS_DIR
print(json.dumps({"presets": str(PRESETS_DIR), "train": list_presets(), "assets": str(ASSETS),
                  "configs": str(CONFIGS_DIR), "module": __import__("lora_studio").__file__}))
"""


def test_the_wheel_installs_a_complete_package(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    wheel = next(wheels.glob("lora_studio-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {p.relative_to(REPO).as_posix() for p in (REPO / "lora_studio").rglob("*.py")}
    assert tree <= names, f"missing from the wheel (add the package to pyproject.toml): {sorted(tree - names)}"
    shipped = {f"lora_studio/presets/{p.name}" for p in (REPO / "presets").glob("*.json")}
    assert shipped and shipped <= names
    assert "lora_studio/assets/demo-model/unet/diffusion_pytorch_model.safetensors" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lora-studio = lora_studio.cli.main:entry" in scripts and "lora-studio-app" in scripts

    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    for key in ("module", "presets", "assets", "configs"):
        assert Path(got[key]).is_relative_to(target), (key, got[key])
    assert {"demo-cpu", "style-sd15"} <= set(got["train"])
