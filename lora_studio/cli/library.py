"""`python -m lora_studio library`: the checkpoints and LoRAs of a WebUI, a ComfyUI and loose folders, with
family, kind, rank, hashes, previews, trigger words and why a file cannot be used."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputFileError
from ..library import ModelLibrary, ScanCache, gather_folders, scan_models
from ..library.civitai import DEFAULT_URL, check_base_url, lookup_civitai
from ..progress import text_progress

DEFAULT_CACHE = Path("outputs") / "cache" / "library.json"


def register(sub) -> None:
    p = sub.add_parser("library", help="list the checkpoints and LoRAs of your WebUI / ComfyUI / loose folders "
                                       "(family, kind, rank, hashes, previews, trigger words)")
    p.add_argument("--webui-dir", action="append", default=[], metavar="DIR",
                   help="an A1111 / Forge / SD.Next folder (models/Stable-diffusion, models/Lora, models/LyCORIS)")
    p.add_argument("--comfy-dir", action="append", default=[], metavar="DIR",
                   help="a ComfyUI folder (models/checkpoints, models/loras and what extra_model_paths.yaml maps)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="a loose folder of LoRAs")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR", help="a loose folder of checkpoints")
    p.add_argument("--json", action="store_true", help='print one JSON object {"checkpoints": [...], "loras": [...]}')
    p.add_argument("--cache", default=str(DEFAULT_CACHE), metavar="FILE",
                   help=f"the scan cache (hashes and what each file holds; default {DEFAULT_CACHE})")
    p.add_argument("--civitai-lookup", action="store_true",
                   help="ask Civitai (by SHA-256) about each LoRA that has no NAME.civitai.info, and write that file "
                        "and a preview beside it; without this flag nothing is sent anywhere")
    p.add_argument("--civitai-url", default=DEFAULT_URL, metavar="URL", help=f"Civitai's address (default {DEFAULT_URL})")
    p.add_argument("--civitai-retry", action="store_true",
                   help="with --civitai-lookup: ask again about LoRAs Civitai did not know last time")
    p.set_defaults(func=_run)


def _cell(value, width: int) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= width else text[: width - 1] + "~"


def format_library(library: ModelLibrary) -> str:
    lines = [f"Checkpoints ({len(library.checkpoints)})"]
    for c in library.checkpoints:
        lines.append(f"  {_cell(c.name, 40):40} {_cell(c.family, 5):5} {_cell(c.autov2, 10):10}"
                     + (f"  ! {c.problem}" if c.problem else ""))
    lines.append(f"LoRAs ({len(library.loras)})")
    lines.append(f"  {'name':40} {'family':6} {'kind':8} {'rank':>4} {'autov2':10} {'weight':>6}  triggers / problem")
    for lo in library.loras:
        tail = f"! {lo.problem}" if lo.problem else ", ".join(lo.trigger_words)
        weight = f"{lo.preferred_weight:g}" if lo.preferred_weight is not None else "-"
        lines.append(f"  {_cell(lo.name, 40):40} {_cell(lo.family, 6):6} {_cell(lo.kind, 8):8} "
                     f"{_cell(lo.rank, 4):>4} {_cell(lo.autov2, 10):10} {weight:>6}  {tail}")
    return "\n".join(lines)


def _run(args) -> int:
    if not (args.webui_dir or args.comfy_dir or args.lora_dir or args.model_dir):
        raise InputFileError("say where your models are: --webui-dir DIR, --comfy-dir DIR, --lora-dir DIR or "
                             "--model-dir DIR (each may be given several times).")
    if args.civitai_lookup:
        check_base_url(args.civitai_url)
    folders = gather_folders(args.webui_dir, args.comfy_dir, args.lora_dir, args.model_dir)
    progress = text_progress() if sys.stderr.isatty() else None
    cache = ScanCache(args.cache)
    library = scan_models(folders, cache=cache, progress=progress)
    status = 0
    if args.civitai_lookup:
        looked = lookup_civitai(library.loras, cache, args.civitai_url, retry_missing=args.civitai_retry,
                                progress=progress)
        cache.save()
        for result in looked.results:
            print(f"civitai: {result.message}", file=sys.stderr)
        if looked.stopped:
            print(f"civitai: stopped: {looked.stopped}", file=sys.stderr)
            status = 1
        if looked.written:
            library = scan_models(folders, cache=cache)  # the new sidecars (every file a cache hit)
    if args.json:
        print(json.dumps(library.to_json(), indent=2))
    else:
        print(format_library(library))
    return status
