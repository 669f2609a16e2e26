"""`python -m lora_studio export` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'export' is not built yet", flush=True)
    return 1
