"""``python -m lora_studio resize IN --out OUT (--rank N | --ratio R | --energy P) [--spectrum PNG]``."""

from __future__ import annotations

from ..progress import text_progress
from ..spectrum import plot_spectrum
from ..export import resize_lora


def add_rank_args(p, required: bool = True) -> None:
    """The three ways to choose a rank per module; exactly one is given."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rank", type=int, metavar="N", help="the same rank N for every module (capped at its rank)")
    g.add_argument("--ratio", type=float, metavar="R",
                   help="keep singular values >= largest / R, per module (e.g. 10)")
    g.add_argument("--energy", type=float, metavar="P",
                   help="keep the smallest rank whose squared singular values hold >= P of the total (e.g. 0.9)")


def rank_rule(args, default: tuple[str, float] | None = None) -> tuple[str, float]:
    if args.rank is not None:
        return "fixed", float(args.rank)
    if args.ratio is not None:
        return "ratio", float(args.ratio)
    if args.energy is not None:
        return "energy", float(args.energy)
    assert default is not None, "argparse requires one of --rank/--ratio/--energy"
    return default


def print_spectrum(stats, png, energy: float = 0.9) -> None:
    """Plot the spectra of the modules behind ``stats`` and print the rank advice."""

    summary = plot_spectrum({st.name: st for st in stats}, png, energy=energy)
    print(f"spectrum: {png}\n{summary.text()}")


def register(sub) -> None:
    p = sub.add_parser("resize", help="shrink a LoRA's rank by SVD (fixed rank, singular-value ratio or energy kept)",
                       description="Resize every module of a LoRA by SVD and write a kohya-format LoRA. "
                                   "Alpha keeps each module's alpha/rank ratio, so the effect is preserved.")
    p.add_argument("lora", help="the LoRA file to resize (.safetensors; kohya, LyCORIS LoHa/LoKr, diffusers/peft)")
    p.add_argument("--out", required=True, help="where to write the resized LoRA")
    add_rank_args(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="dtype of the written file (default: the input's)")
    p.add_argument("--spectrum", metavar="PNG", help="also plot singular values and energy per module")
    p.set_defaults(func=run)


def run(args) -> int:

    method, value = rank_rule(args)
    rep = resize_lora(args.lora, args.out, method, value, dtype=args.dtype, progress=text_progress())
    print(rep.text())
    if args.spectrum:
        print_spectrum(rep.stats, args.spectrum, energy=value if method == "energy" else 0.9)
    return 0
