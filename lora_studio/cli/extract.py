"""``python -m lora_studio extract --tuned MODEL --base MODEL --out OUT (--rank N | --energy P) [--all-layers]``."""

from __future__ import annotations

from ..progress import text_progress
from .resize import add_rank_args, print_spectrum, rank_rule
from ..export import extract_lora


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint and its base (SVD of the difference)",
                       description="Extract a kohya-format LoRA approximating TUNED - BASE layer by layer. "
                                   "Attention projections by default; --all-layers covers every linear and conv layer.")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (diffusers folder or single .safetensors)")
    p.add_argument("--base", required=True, help="the model it was tuned from")
    p.add_argument("--out", required=True, help="where to write the LoRA")
    add_rank_args(p)
    p.add_argument("--all-layers", action="store_true", help="every linear/conv layer, not only attention")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16", help="dtype of the written file")
    p.add_argument("--spectrum", metavar="PNG", help="also plot singular values and energy per module")
    p.add_argument("--config-dir", help="config-only diffusers folder for loading single-file models offline")
    p.set_defaults(func=run)


def run(args) -> int:

    method, value = rank_rule(args)
    rep = extract_lora(args.tuned, args.base, args.out, method, value,
                       targets="all" if args.all_layers else "attn", dtype=args.dtype, config_dir=args.config_dir,
                       progress=text_progress())
    print(rep.text())
    if args.spectrum:
        print_spectrum(rep.stats, args.spectrum, energy=value if method == "energy" else 0.9)
    return 0
