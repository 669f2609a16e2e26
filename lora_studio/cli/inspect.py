"""`python -m lora_studio inspect FILE`: what a LoRA (or a base checkpoint) holds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..models import describe_checkpoint
from ..lora.inspect import format_lora_info, inspect_lora, looks_like_checkpoint


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a LoRA's family, kind, rank/alpha, modules, metadata and trigger words "
                                       "(or describe a base checkpoint)")
    p.add_argument("file", help="a LoRA .safetensors file, a checkpoint file or a diffusers model folder")
    p.add_argument("--modules", action="store_true", help="list every module with its kind, rank and alpha")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_run)


def _print_checkpoint(path: Path, as_json: bool) -> int:
    desc = describe_checkpoint(path)
    if as_json:
        print(json.dumps(desc, indent=2, default=str))
        return 0
    fam = desc.get("family")
    print(f"{path.name}: a base model ({desc.get('kind')}), not a LoRA")
    print(f"Family:     {getattr(fam, 'label', None) or 'unknown'}"
          + (f" ({desc['family_error']})" if desc.get("family_error") else ""))
    print(f"Tensors:    {desc.get('tensors')} ({desc.get('parameters', 0) / 1e6:.1f} M parameters), "
          f"dtype {desc.get('dtype')}, {desc.get('size_bytes', 0) / 1e6:.1f} MB")
    for name, n in (desc.get("components") or {}).items():
        print(f"  {name}: {n}")
    return 0


def _run(args) -> int:

    path = Path(args.file).expanduser()
    if path.is_dir() or (path.suffix.lower() == ".safetensors" and path.exists() and looks_like_checkpoint(path)):
        return _print_checkpoint(path, args.json)
    info = inspect_lora(path)
    if args.json:
        data = asdict(info)
        data["family"] = info.family.value if info.family else None
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_lora_info(info, all_modules=args.modules))
    return 0 if info.problem is None else 1
