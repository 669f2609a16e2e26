"""``python -m lora_studio mix``: apply LoRAs at strengths to a base model, render, compare.

    python -m lora_studio mix --base demo --lora a.safetensors:0.8 --lora b.safetensors:0.5 \\
        --prompt "a red circle" --grid --xy "strength=0,0.5,1" --xy "lora=a,b" --out outputs/mix

``--lora FILE[:STRENGTH[:TE_STRENGTH]]`` (a name instead of a file is looked up in ``--lora-dir``); the prompt
may also pick LoRAs from ``--lora-dir`` with A1111 tags (``<lora:name:0.7>``). Settings given on the command
line win over those of ``--preset`` and of ``--from-png FILE`` (re-render a picture from A1111 or LoRA Studio).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

from .. import models
from ..errors import ConfigError
from ..mix.args import SlotSpec, apply_blocks_args, find_lora_arg, parse_blocks_arg, parse_lora_arg
from ..mix.compare import parse_axis
from ..mix.from_png import recipe_from_png
from ..mix.presets import MixPreset, load_mix_preset, preset_slots, save_mix_preset
from ..mix.session import MixSession, model_name
from ..prompt import parse_prompt, resolve_requests
from ..render import save_png
from ..progress import text_progress

DESCRIPTION = """Apply LoRAs at strengths to a base model, render, and compare.

example:
  python -m lora_studio mix --base demo --lora a.safetensors:0.8 --lora b.safetensors:0.5 \\
      --prompt "a red circle" --grid --xy "strength=0,0.5,1" --xy "lora=a,b" --out outputs/mix

--lora FILE[:STRENGTH[:TE_STRENGTH]] (a name instead of a file is looked up in --lora-dir). The prompt may
also pick LoRAs from --lora-dir with A1111 tags: <lora:name:0.7>, or <lora:name:TE:UNET>. Settings given on
the command line win over those of --preset. Images are PNGs with A1111 "parameters" and a JSON sidecar.

--from-png FILE re-renders a picture made by A1111 or LoRA Studio: its prompt, settings and LoRAs (found by name
or hash in --lora-dir), its checkpoint from --base or by name or hash in --model-dir. What is not found is
noted; settings given on the command line win over the picture's."""


def register(sub) -> None:
    p = sub.add_parser("mix", help="apply LoRAs at strengths to a base model and render (comparison and X/Y grids)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="base model: 'demo' (built in), a diffusers folder, a .safetensors "
                                                "checkpoint or a hub id (default: the preset's, else demo)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH[:TE]]",
                   help="a LoRA file (or a name in --lora-dir) with its strength and optional text-encoder "
                        "strength; repeat for several. Negative strengths are allowed")
    p.add_argument("--blocks", action="append", default=[], metavar="NAME:KEY=W,...",
                   help="per-block weights for one LoRA of the mix, e.g. stripes:down=0,mid=0.5,up=1 "
                        "(keys: down, mid, up, other, down.N, up.N)")
    p.add_argument("--prompt", default=None, help="the prompt; <lora:name:0.7> tags pick LoRAs from --lora-dir")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=None, help="seed (-1: random; default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default 4.0)")
    p.add_argument("--sampler", default=None, help="A1111 sampler name: DDIM, Euler, Euler a, DPM++ 2M Karras, ...")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--grid", action="store_true", help="also render base / each LoRA / mix side by side")
    p.add_argument("--xy", action="append", default=[], metavar="KIND=V1,V2",
                   help="an X/Y grid axis (first --xy is X, second Y): strength=0,0.5,1  strength:NAME=0,1  "
                        "te_strength=..  lora=a,b,none  seed=1,2  steps=10,20  cfg=3,5  sampler=DDIM,Euler a  "
                        "prompt=red,blue (Prompt S/R)")
    p.add_argument("--lora-dir", default=None, help="the LoRA folder for names and <lora:...> tags")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="re-render a PNG made by A1111 or LoRA Studio (its parameters; options given here win)")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="a checkpoint folder where --from-png looks for the picture's model by name or hash")
    p.add_argument("--preset", default=None, help="a mixing preset (JSON file or presets/ name, e.g. mix-demo)")
    p.add_argument("--save-preset", default=None, metavar="FILE", help="save this mix as a preset JSON file")
    p.add_argument("--allow-partial", action="store_true",
                   help="apply a LoRA even when some of its modules match no layer (they are listed)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt base model (unpickling runs code)")
    p.add_argument("--out", default="outputs/mix", help="output folder (default outputs/mix)")
    p.set_defaults(func=run)


def load_base(source: str, allow_pickle: bool = False):
    """The base pipeline (the session's loader)."""
    loaded = models.load_base(source, allow_pickle=allow_pickle, progress=text_progress())
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded.pipe


def _next_image_path(out: Path, seed: int) -> Path:
    """A1111-style numbering: 00000-SEED.png, 00001-SEED.png, ... never overwriting."""
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))] if out.is_dir() else []
    return out / f"{max(taken, default=-1) + 1:05d}-{seed}.png"


def _from_png(args, preset: MixPreset):
    """Fill ``preset`` from the picture's parameters (the command line's options are applied after this)."""
    recipe = recipe_from_png(args.from_png, args.lora_dir or preset.lora_dir, args.model_dir, args.base)
    for note in recipe.notes:
        print(f"note: {note}")
    if recipe.base is None:
        raise ConfigError(f"cannot re-render {args.from_png}: its checkpoint {recipe.params.model_name!r} was not "
                          "found. Give it with --base FILE, or the folder that holds it with --model-dir DIR.")
    p = recipe.params
    preset.prompt, preset.negative_prompt, preset.steps, preset.cfg = p.prompt, p.negative_prompt, p.steps, p.cfg
    preset.seed, preset.width, preset.height, preset.sampler = p.seed, p.width, p.height, p.sampler
    preset.base = recipe.base
    return recipe


def run(args) -> int:
    if len(args.xy) > 2:
        raise ConfigError(f"--xy was given {len(args.xy)} times; a grid has two axes (X, then Y).")
    axes = [parse_axis(a) for a in args.xy]
    preset, preset_dir = MixPreset(), None
    if args.preset:
        preset, preset_file = load_mix_preset(args.preset)
        preset_dir = preset_file.parent
    recipe = _from_png(args, preset) if args.from_png else None
    for arg, key in (("prompt", "prompt"), ("negative", "negative_prompt"), ("seed", "seed"), ("steps", "steps"),
                     ("cfg", "cfg"), ("sampler", "sampler"), ("width", "width"), ("height", "height"),
                     ("base", "base"), ("lora_dir", "lora_dir")):
        if getattr(args, arg) is not None:
            setattr(preset, key, getattr(args, arg))
    if not preset.prompt:
        raise ConfigError("no prompt: pass --prompt \"...\" (or a --preset with a prompt).")
    requests = parse_prompt(preset.prompt).loras        # checked before the model loads
    lora_refs = [parse_lora_arg(x) for x in args.lora]
    blocks = [parse_blocks_arg(x) for x in args.blocks]
    params = preset.gen_params(model_name(preset.base))
    if recipe is not None:
        params = replace(params, clip_skip=recipe.params.clip_skip)

    lora_dir = preset.lora_dir
    if args.lora_dir is None and lora_dir and preset_dir is not None and (preset_dir / lora_dir).is_dir():
        lora_dir = str(preset_dir / lora_dir)          # a preset's relative lora_dir counts from the preset
    if (args.grid or any(a.kind in ("strength", "te_strength", "lora") for a in axes)) \
            and not (preset.loras or lora_refs or requests):
        raise ConfigError("--grid and LoRA axes of --xy need at least one LoRA: add --lora FILE:STRENGTH.")

    # find every file before the (slow) model load, so a typo fails fast
    slots = preset_slots(preset, preset_dir, lora_dir)
    slots += [SlotSpec(str(find_lora_arg(a.ref, lora_dir)), a.strength, a.te_strength) for a in lora_refs]
    if recipe is not None:     # a --lora naming the picture's LoRA sets its strength instead
        given = {Path(s.path).resolve() for s in slots}
        slots += [s for s in recipe.slots if Path(s.path).resolve() not in given]
    slots += [SlotSpec(str(path), req.strength, req.te_strength) for req, path in resolve_requests(requests, lora_dir)]
    apply_blocks_args(slots, blocks)

    session = MixSession(loader=lambda base: load_base(base, args.allow_pickle))
    session.set_loras(preset.base, slots, allow_partial=args.allow_partial)
    print(session.report())
    if not slots:
        print("note: no LoRA given; rendering the base model alone.")

    out = Path(args.out)
    rendered = session.render(params, progress=text_progress())
    print(f"image: {save_png(rendered, _next_image_path(out, rendered.params.seed))}")
    if args.grid:
        res = session.compare(preset.base, slots, rendered.params, out, progress=text_progress())
        print(f"comparison grid: {res.grid_path} ({len(res.image_paths)} tiles: {', '.join(res.labels)})")
    if axes:
        res = session.xy(preset.base, slots, rendered.params, axes[0], axes[1] if len(axes) > 1 else None, out,
                         progress=text_progress())
        print(f"X/Y grid: {res.grid_path} ({len(res.image_paths)} cells in {out / 'xy-cells'})")
    if args.save_preset:
        print(f"preset: {save_mix_preset(session.to_preset(rendered.params, preset.lora_dir), args.save_preset)}")
    return 0
