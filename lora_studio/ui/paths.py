"""Which files the app may read and write: ``outputs/``, the folders named at launch, and gradio's uploads.

Every path that arrives from the page (or from an API call, which can send anything) goes through
``PathPolicy.readable`` before the core sees it, so ``/etc/passwd`` or ``../../secret`` is refused with a
message instead of being opened. Outputs are plain file names placed under ``outputs/<kind>/``. Symlinks are
resolved first, so a link inside an allowed folder cannot point outside it. No gradio import here: the policy
is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputFileError
from ..names import check_name, next_free_path


@dataclass
class PathPolicy:
    outputs: Path
    allowed: list[Path] = field(default_factory=list)      # folders the user chose at launch (--allow-dir)
    uploads: list[Path] = field(default_factory=list)      # gradio's upload cache (files dropped on the page)
    readonly: list[Path] = field(default_factory=list)     # shipped folders (demo model, presets)

    def __post_init__(self) -> None:
        self.outputs = Path(self.outputs).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.allowed = [Path(p).expanduser().resolve() for p in self.allowed]
        self.uploads = [Path(p).expanduser().resolve() for p in self.uploads]
        self.readonly = [Path(p).expanduser().resolve() for p in self.readonly]

    @property
    def roots(self) -> list[Path]:
        return [self.outputs, *self.allowed, *self.uploads, *self.readonly]

    def roots_text(self) -> str:
        return ", ".join(str(p) for p in [self.outputs, *self.allowed])

    def readable(self, text: str | Path | None, what: str = "file", must_exist: bool = True) -> Path:
        """The resolved path if it lies inside an allowed folder; ``InputFileError`` (naming it) otherwise.
        A relative path is taken relative to the working folder, as in a shell."""
        raw = str(text or "").strip()
        if not raw:
            raise InputFileError(f"no {what} given: type a path inside {self.roots_text()} or upload a file.")
        p = Path(raw).expanduser()
        p = p.resolve()
        if not any(p == root or root in p.parents for root in self.roots):
            raise InputFileError(f"{what} {raw!r} is outside the folders LoRA Studio may open "
                                 f"({self.roots_text()}). Copy it into outputs/, or start the app with "
                                 "--allow-dir FOLDER to let it read that folder.")
        if must_exist and not p.exists():
            raise InputFileError(f"{what} {raw!r} does not exist (looked for {p}). Check the path.")
        return p

    def output(self, name: str, kind: str, suffix: str = "") -> Path:
        """``outputs/<kind>/<name><suffix>`` for a plain file name (no folders, no ``..``)."""
        name = (name or "").strip()
        if suffix and name.lower().endswith(suffix.lower()):
            name = name[: -len(suffix)]
        check_name(name, "output name", InputFileError)
        return self.outputs / kind / f"{name}{suffix}"

    def new_output(self, name: str, kind: str, suffix: str = "") -> Path:
        """``output``, numbered (``name-0001``, ...) when that file or folder exists: the app never replaces an
        earlier output (the CLI writes exactly the ``--out`` it is given)."""
        return next_free_path(self.output(name, kind, suffix), suffix)
