"""Where a user's models live: the folders of an A1111/Forge/SD.Next WebUI, of ComfyUI (with the folders its
``extra_model_paths.yaml`` maps) and loose folders, gathered into one ``ModelFolders`` (read only)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import InputFileError

# kind -> folders inside the root of each app
WEBUI_LAYOUT = {"checkpoints": ("models/Stable-diffusion",), "loras": ("models/Lora", "models/LyCORIS"),
                "vae": ("models/VAE",), "embeddings": ("embeddings",)}
COMFY_LAYOUT = {"checkpoints": ("models/checkpoints",), "loras": ("models/loras",), "vae": ("models/vae",),
                "embeddings": ("models/embeddings",)}
KINDS = tuple(WEBUI_LAYOUT)
COMFY_EXTRA_PATHS = "extra_model_paths.yaml"


@dataclass
class ModelFolders:
    """Existing folders per kind ("checkpoints", "loras", "vae", "embeddings"), each once, in the order given."""

    folders: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, folder: Path) -> None:
        folder = folder.expanduser()
        if not folder.is_dir():
            return
        known = {os.path.realpath(p) for p in self.folders[kind]}
        if os.path.realpath(folder) not in known:
            self.folders[kind].append(folder)

    @property
    def checkpoints(self) -> list[Path]:
        return self.folders["checkpoints"]

    @property
    def loras(self) -> list[Path]:
        return self.folders["loras"]


def _root(folder: str | os.PathLike, what: str, layout: dict[str, tuple[str, ...]]) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputFileError(f"{what} folder {root} does not exist or is not a folder. Give the folder the app "
                             "is installed in.")
    expected = [sub for subs in layout.values() for sub in subs]
    if not any((root / sub).is_dir() for sub in expected):
        raise InputFileError(f"{root} holds none of {', '.join(expected)}, so it is not a {what} folder. Give the "
                             f"folder the app is installed in (the one with 'models' in it).")
    return root


def _paths_in(value) -> list[str]:
    """One or several paths: a string with one path a line (a YAML ``|`` block), or a list of strings."""
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, list):
        return [str(v).strip() for v in value if isinstance(v, str) and v.strip()]
    return []


def read_extra_model_paths(path: str | os.PathLike) -> dict[str, list[Path]]:
    """The folders a ComfyUI ``extra_model_paths.yaml`` maps, per kind: each named section's ``base_path``
    (relative to the file's folder, as ComfyUI reads it) joined with every path under ``checkpoints``,
    ``loras``, ``vae`` and ``embeddings``. Other keys (``configs``, ``upscale_models`` ...) are ignored."""
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - PyYAML is in requirements.txt
        raise InputFileError(f"reading {path} needs the PyYAML package: pip install pyyaml") from err
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputFileError(f"cannot read ComfyUI's {p} ({err}). Fix the file's YAML or move it aside.") from err
    found: dict[str, list[Path]] = {k: [] for k in KINDS}
    if data is None:
        return found
    if not isinstance(data, dict):
        raise InputFileError(f"{p} should hold named sections (name: with base_path: and checkpoints:, loras: ...), "
                             f"not a {type(data).__name__}. Fix the file or move it aside.")
    for section in data.values():
        if not isinstance(section, dict):
            continue
        base = os.path.expandvars(os.path.expanduser(str(section.get("base_path") or "")))
        base_path = Path(base) if os.path.isabs(base) else p.parent / base
        for kind in KINDS:
            for sub in _paths_in(section.get(kind)):
                sub = os.path.expandvars(os.path.expanduser(sub))
                found[kind].append(Path(sub) if os.path.isabs(sub) else base_path / sub)
    return found


def gather_folders(webui_dirs: Iterable[str | os.PathLike] = (), comfy_dirs: Iterable[str | os.PathLike] = (),
                   lora_dirs: Iterable[str | os.PathLike] = (),
                   model_dirs: Iterable[str | os.PathLike] = ()) -> ModelFolders:
    """Every existing model folder of the given apps and loose folders. An app folder that does not exist or does
    not look like that app is an error; a sub-folder the app has not made yet (no LyCORIS folder) is skipped."""
    out = ModelFolders()
    for webui in webui_dirs:
        root = _root(webui, "WebUI (A1111/Forge/SD.Next)", WEBUI_LAYOUT)
        for kind, subs in WEBUI_LAYOUT.items():
            for sub in subs:
                out.add(kind, root / sub)
    for comfy in comfy_dirs:
        root = _root(comfy, "ComfyUI", COMFY_LAYOUT)
        for kind, subs in COMFY_LAYOUT.items():
            for sub in subs:
                out.add(kind, root / sub)
        if (root / COMFY_EXTRA_PATHS).is_file():
            for kind, folders in read_extra_model_paths(root / COMFY_EXTRA_PATHS).items():
                for folder in folders:
                    out.add(kind, folder)
    for kind, given in (("loras", lora_dirs), ("checkpoints", model_dirs)):
        for folder in given:
            p = Path(folder).expanduser()
            if not p.is_dir():
                raise InputFileError(f"{kind[:-1]} folder {p} does not exist or is not a folder. Check the path.")
            out.add(kind, p)
    return out
