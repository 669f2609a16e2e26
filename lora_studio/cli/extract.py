"""`python -m lora_studio extract` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("extract", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'extract' is not built yet", flush=True)
    return 1
