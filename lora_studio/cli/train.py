"""`python -m lora_studio train` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("train", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'train' is not built yet", flush=True)
    return 1
