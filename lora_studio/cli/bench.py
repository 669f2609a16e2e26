"""`python -m lora_studio bench` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'bench' is not built yet", flush=True)
    return 1
