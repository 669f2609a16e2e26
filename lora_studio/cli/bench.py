"""`python -m lora_studio bench NAME [args]`: run one benchmark script from the repository's ``bench/`` folder.

The scripts are not part of the package (they compare against baselines and need a source checkout); this
command only finds one and runs it with the same Python, passing the remaining arguments through.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..errors import InputFileError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
NAMES = ("train_step", "mix_apply", "export")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (train_step, mix_apply, export) against its baseline",
                       description="Run bench/NAME.py; arguments after NAME go to the script "
                                   "(e.g. --size tiny --repeat 3; see --help of each).")
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(NAMES)}")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(func=_run)


def _run(args) -> int:
    name = args.name.removesuffix(".py")
    script = BENCH_DIR / f"{name}.py"
    if name not in NAMES or not script.is_file():
        where = "" if BENCH_DIR.is_dir() else f" ({BENCH_DIR} is missing: benchmarks need a source checkout)"
        raise InputFileError(f"unknown benchmark {args.name!r}{where}; choose one of {', '.join(NAMES)}.")
    return subprocess.run([sys.executable, str(script), *args.script_args], cwd=BENCH_DIR.parent).returncode
