"""Entry point: builds the parser from the command modules and turns user errors into exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..cpu_memory import tune_glibc_malloc
from ..errors import LoraStudioError

# Each name is a module in this package with a ``register(subparsers)`` function.
COMMANDS = ("demo", "train", "mix", "inspect", "export", "resize", "extract", "library", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_studio",
        description="Train, mix and export Stable Diffusion LoRAs. Every command works offline on the built-in demo model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraStudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The process entry point (``python -m lora_studio``, the ``lora-studio`` command): tunes the process,
    then runs ``main``. ``main`` itself changes no process setting, so tests and scripts can call it."""
    tune_glibc_malloc()
    raise SystemExit(main())
