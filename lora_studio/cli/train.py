"""``python -m lora_studio train``: train a LoRA from an image folder.

Settings come from a preset (``--preset demo-cpu``) or a JSON file (``--config``), then the named options,
then ``--set key=value`` for any other TrainConfig key. Ctrl-C (SIGINT) or SIGTERM asks the trainer to stop:
it saves the LoRA and a resumable state, and ``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ..errors import ConfigError
from ..progress import StopFlag, text_progress
from ..train.config import TrainConfig, load_preset

# option name -> TrainConfig key, for the options that have their own flag
FLAGS = {"data": "data_dir", "base": "base", "steps": "steps", "rank": "rank", "alpha": "alpha",
         "network": "network", "use_dora": "use_dora", "conv_rank": "conv_rank", "conv_alpha": "conv_alpha",
         "factor": "lokr_factor", "use_tucker": "use_tucker", "decompose_both": "decompose_both",
         "lr": "learning_rate", "te_lr": "text_encoder_lr", "batch_size": "batch_size", "resolution": "resolution",
         "output_dir": "output_dir", "run_name": "run_name", "output_name": "output_name",
         "trigger": "trigger_word", "seed": "seed", "mixed_precision": "mixed_precision",
         "save_every": "save_every_n_steps", "save_state_every": "save_state_every_n_steps",
         "sample_every": "sample_every_n_steps", "sample_prompt": "sample_prompts", "init": "init",
         "gradient_checkpointing": "gradient_checkpointing", "cast_frozen_weights": "cast_frozen_weights",
         "channels_last": "channels_last", "fused_optimizer": "fused_optimizer", "compile": "compile_unet",
         "compile_mode": "compile_mode", "offload_cached_models": "offload_cached_models",
         "lean_backward": "lean_backward", "log_with": "log_with", "validation_split": "validation_split",
         "validation_dir": "validation_dir", "validate_every": "validate_every_n_steps"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a folder of images (+ .txt captions)",
                       description="Train a LoRA. Example: python -m lora_studio train --data outputs/demo/dataset "
                                   "--base demo --preset demo-cpu")
    p.add_argument("--data", help="folder of training images (recursive; kohya 'N_name' folders give N repeats)")
    p.add_argument("--base", help="base model: 'demo', a diffusers folder, a .safetensors checkpoint or a hub id")
    p.add_argument("--preset", help="a preset name from presets/ (e.g. demo-cpu, style-sd15) or a .json path")
    p.add_argument("--config", help="a TrainConfig JSON file (e.g. the config.json of an earlier run)")
    p.add_argument("--steps", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--network", choices=["lora", "locon", "loha", "lokr"], help="what to train: 'lora' (kohya "
                   "LoRA; conv targets become LoCon), 'locon' (the same, named as LyCORIS's LoCon), 'loha' or "
                   "'lokr' (LyCORIS LoHa / LoKr through peft); default lora")
    p.add_argument("--use-dora", action=argparse.BooleanOptionalAction, help="DoRA (weight-decomposed LoRA) on "
                   "top of --network lora or locon")
    p.add_argument("--conv-rank", type=int, help="rank of conv target layers (LyCORIS conv_dim; default --rank)")
    p.add_argument("--conv-alpha", type=float, help="alpha of conv target layers (default --alpha)")
    p.add_argument("--factor", type=int, help="LoKr's factor: split each size into two near this number "
                   "(default -1: near the square root)")
    p.add_argument("--use-tucker", action=argparse.BooleanOptionalAction, help="LoHa/LoKr: Tucker-decomposed "
                   "3x3 convs (peft's use_effective_conv2d)")
    p.add_argument("--decompose-both", action=argparse.BooleanOptionalAction, help="LoKr: factor the small "
                   "Kronecker matrix w1 too")
    p.add_argument("--lr", type=float, help="UNet LoRA learning rate")
    p.add_argument("--te-lr", type=float, help="text-encoder LoRA learning rate (with --train-text-encoder)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--output-dir", help="where run folders go (default outputs/)")
    p.add_argument("--run-name", help="the run folder's name (default: the data folder's name)")
    p.add_argument("--output-name", help="the LoRA file name without .safetensors (default: the run name)")
    p.add_argument("--trigger", help="trigger word put in front of every caption")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--init", choices=["gaussian", "pissa"])
    p.add_argument("--save-every", type=int, help="write the LoRA every N steps")
    p.add_argument("--save-state-every", type=int, help="write a resumable state every N steps")
    p.add_argument("--sample-every", type=int, help="render sample images every N steps")
    p.add_argument("--sample-prompt", action="append", help="a sample prompt (repeat for several)")
    p.add_argument("--log-with", choices=["tensorboard", "wandb", "none"], help="send loss, learning-rate and "
                   "validation curves to TensorBoard (event files in <run>/logs) or Weights & Biases")
    p.add_argument("--validation-split", type=float, help="share of the images held out of training to score a "
                   "validation loss on (e.g. 0.1; default 0: none)")
    p.add_argument("--validation-dir", help="a separate folder of validation images (instead of --validation-split)")
    p.add_argument("--validate-every", type=int, help="score the validation loss every N steps (and at the end); "
                   "written to validation.csv, the best step to best.json")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="also train a text-encoder LoRA")
    speed = p.add_argument_group("speed and memory (each --x has a --no-x; defaults from the preset/config)")
    on_off = argparse.BooleanOptionalAction
    speed.add_argument("--gradient-checkpointing", action=on_off, help="recompute activations in the backward "
                       "pass: much less memory, slower steps")
    speed.add_argument("--cast-frozen-weights", action=on_off, help="with --mixed-precision fp16/bf16, hold the "
                       "frozen UNet/VAE/text-encoder weights in that dtype; LoRA weights stay fp32 (default on)")
    speed.add_argument("--channels-last", action=on_off, help="channels-last UNet on CUDA (default on)")
    speed.add_argument("--fused-optimizer", action=on_off, help="fused AdamW kernel on CUDA (default on)")
    speed.add_argument("--compile", action=on_off, help="torch.compile the UNet on CUDA: minutes of compiling "
                       "before the first step, faster steps after (default off; ignored with a warning on a CPU)")
    speed.add_argument("--compile-mode", metavar="MODE", help="torch.compile's mode with --compile: 'default', "
                       "'reduce-overhead' (replays CUDA graphs: fewer kernel launches, more memory), 'max-autotune' "
                       "(also searches kernels; longer compile) or 'max-autotune-no-cudagraphs'")
    speed.add_argument("--offload-cached-models", action=on_off, help="on CUDA, move the VAE and frozen text "
                       "encoders to the CPU once their outputs are cached (default on)")
    speed.add_argument("--lean-backward", action=on_off, help="frozen convolutions and norms, SiLUs and GEGLUs "
                       "keep less for the backward pass, for bit-identical results: less GPU memory, some speed (default "
                       "off; on in the style-sdxl preset; numbers in bench/RESULTS.md)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="STATE",
                   help="continue the run's latest saved state (or the given state/run folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig setting; VALUE is JSON (e.g. --set min_snr_gamma=5 "
                        "--set 'target_modules=[\"to_q\",\"to_v\"]')")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is often fastest for small models on a "
                                                "busy machine)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    p.set_defaults(func=run)


def build_config(args):

    if args.preset and args.config:
        raise ConfigError("give either --preset or --config, not both.")
    cfg = load_preset(args.preset) if args.preset else TrainConfig.from_json(args.config) if args.config else TrainConfig()
    changes = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            changes[key] = value
    if args.train_text_encoder:
        changes["train_text_encoder"] = True
    if args.resume is not None:
        changes["resume"] = args.resume
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set min_snr_gamma=5.")
        try:
            changes[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key.strip()] = raw  # a bare word is a string: --set lr_scheduler=cosine
    return cfg.replace(**changes)


def run(args) -> int:
    from ..train.tracking import check_log_with, open_hint
    from ..train.trainer import TrainCallbacks, train  # peft and accelerate: not on the path of --help

    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_json(), end="")
        return 0
    if not cfg.data_dir:
        raise ConfigError("no training folder: pass --data DIR (a folder of images with .txt captions).")

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be 1 or more.")
        import torch

        torch.set_num_threads(args.threads)
    check_log_with(cfg.log_with)
    if open_hint(cfg):
        print(open_hint(cfg), file=sys.stderr, flush=True)
    stop = StopFlag()
    got: list[int] = []

    def on_signal(signum, frame):
        if got:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        got.append(signum)
        print("\nstopping after this step; saving the LoRA and a resumable state (Ctrl-C again to abort)...",
              file=sys.stderr, flush=True)
        stop.request()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        callbacks = TrainCallbacks(on_sample=lambda step, path: print(f"\nsamples: {path}", file=sys.stderr))
        result = train(cfg, progress=text_progress(), stop=stop, callbacks=callbacks)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"LoRA: {result.lora_path}")
    print(f"run folder: {result.run_dir} (loss.csv, loss.png, config.json, samples/"
          f"{', validation.csv, best.json' if cfg.validation_split or cfg.validation_dir else ''}"
          f"{', logs/' if cfg.log_with == 'tensorboard' else ''})")
    print(f"steps: {result.steps_done}/{cfg.steps}; trainable parameters: {result.trainable_params:,} "
          f"({result.trainable_percent:.3f}% of the base)")
    if result.stopped:
        print(f"stopped early; continue with: python -m lora_studio train --config {result.run_dir / 'config.json'} "
              "--resume")
        return 128 + got[0] if got else 1
    return 0
