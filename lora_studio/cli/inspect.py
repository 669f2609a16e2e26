"""`python -m lora_studio inspect` (not built yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("inspect", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("'inspect' is not built yet", flush=True)
    return 1
