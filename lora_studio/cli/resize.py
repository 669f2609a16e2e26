"""`python -m lora_studio resize` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("resize", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'resize' is not built yet", flush=True)
    return 1
