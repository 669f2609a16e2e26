"""``python -m lora_studio export``: fuse LoRAs into a checkpoint, or merge them into one LoRA (``--as-lora``).

    python -m lora_studio export --base MODEL --lora a.safetensors:0.8 --lora b.safetensors:0.5 --out merged.safetensors
    python -m lora_studio export --base MODEL --lora a.safetensors:0.8 --out merged-folder --format diffusers
    python -m lora_studio export --as-lora --lora a.safetensors:0.8 --lora b.safetensors:0.5 --out ab.safetensors [--energy 0.95]
"""

from __future__ import annotations

from ..errors import ConfigError
from ..export import export_merged_checkpoint, merge_loras
from ..mix.args import parse_lora_arg
from ..progress import text_progress
from .resize import add_rank_args, rank_rule


def register(sub) -> None:
    p = sub.add_parser("export", help="merge LoRAs into a checkpoint (single file or diffusers folder) or into one LoRA",
                       description="Fuse LoRAs at strengths into a base model and write an original-layout single "
                                   ".safetensors (AUTOMATIC1111, ComfyUI, diffusers from_single_file) or a diffusers "
                                   "folder. With --as-lora, merge the LoRAs into one LoRA file instead.")
    p.add_argument("--base", help="base model: diffusers folder, single .safetensors file or hub id "
                                  "(not needed with --as-lora)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA and its strength (default 1), e.g. style.safetensors:0.8; repeat for more")
    p.add_argument("--out", required=True, help="the file (single_file, --as-lora) or folder (diffusers) to write")
    p.add_argument("--format", choices=("single_file", "diffusers"), default="single_file", dest="fmt")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="dtype of the written weights (checkpoint default fp16; LoRA default fp16)")
    p.add_argument("--config-dir", help="config-only diffusers folder for loading a single-file base offline")
    p.add_argument("--as-lora", action="store_true", help="write one LoRA with the mix instead of a checkpoint")
    p.add_argument("--method", choices=("concat", "svd"), default=None,
                   help="--as-lora: 'concat' stacks ranks (exact, default) or 'svd' approximates the sum "
                        "(give --rank, --ratio or --energy)")
    add_rank_args(p, required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    loras = [parse_lora_arg(x) for x in args.lora]
    rank_given = any(v is not None for v in (args.rank, args.ratio, args.energy))
    if args.as_lora:
        if not loras:
            raise ConfigError("--as-lora needs at least one --lora FILE[:STRENGTH].")
        method = args.method or ("svd" if rank_given else "concat")
        if method == "concat" and rank_given:
            raise ConfigError("--rank/--ratio/--energy choose the rank of an SVD merge; "
                              "drop them or pass --method svd.")
        rule = rank_rule(args, default=("energy", 0.99))
        if any(a.te_strength is not None for a in loras):
            raise ConfigError("--as-lora merges each LoRA at one strength; drop the text-encoder strength "
                              "(FILE:STRENGTH).")
        rep = merge_loras([(a.ref, a.strength) for a in loras], args.out, method=method, rank_method=rule[0], value=rule[1],
                          dtype=args.dtype or "fp16", progress=text_progress())
        print(rep.text())
        return 0
    if rank_given or args.method:
        raise ConfigError("--method/--rank/--ratio/--energy only apply with --as-lora.")
    if not args.base:
        raise ConfigError("export needs --base MODEL (the checkpoint to merge into), or --as-lora to merge "
                          "the LoRAs into one LoRA file.")
    res = export_merged_checkpoint(args.base, loras, args.out, fmt=args.fmt, dtype=args.dtype or "fp16",
                                   config_dir=args.config_dir, progress=text_progress())
    print(res.text())
    return 0
