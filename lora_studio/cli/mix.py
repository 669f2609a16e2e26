"""`python -m lora_studio mix` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("mix", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'mix' is not built yet", flush=True)
    return 1
