"""Correctness checks of the CUDA-only paths, for a session with a GPU (CI has none, so tests cannot reach them).

Not a benchmark: it prints one PASS/FAIL line per check and exits non-zero if any failed. It covers what the
trainer and the mixer do only on CUDA:

* training in fp16 (frozen weights cast to fp16, fp32 LoRA weights, a GradScaler), in bf16 with the UNet
  compiled (``compile_unet``, in the default mode and in "reduce-overhead", which replays CUDA graphs), each with channels-last, fused AdamW and the VAE/text encoder offloaded after
  caching: the losses are finite, the LoRA file is written with non-zero up weights, and the passed-in fp32
  CPU pipeline gets every weight back bit for bit (``give_back=True``, the default);
* ``lean_backward`` under CUDA's own autocast (norms in fp32, which the CPU tests only emulate): one step of
  the demo UNet (bf16 and fp16, channels-last, fp32 LoRA layers) with and without it gives the same output and
  gradients (compared with how much two plain steps differ, in case a kernel is not deterministic) and keeps
  less for the backward;
* ``LoraMixer`` on a CUDA pipeline, with W0 kept on the GPU and kept in CPU memory, writes the same fp32
  weights as on the CPU (to fp32 rounding), also after a strength change, and ``restore`` puts W0 back
  exactly.

    python bench/cuda_check.py
"""

from __future__ import annotations

import math
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import quiet_libraries  # noqa: E402

DEVICE = "cuda"  # --dry-run on a machine without one sets "cpu": the script's own code runs, the checks mean little


def _weights(pipe) -> dict[str, "torch.Tensor"]:
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        for k, v in getattr(pipe, comp).state_dict().items():
            out[f"{comp}.{k}"] = v.detach().clone()
    return out


def _same(before: dict, after: dict) -> str | None:
    """None when every tensor came back with its device, dtype, layout and bits; else what differs."""
    import torch

    if before.keys() != after.keys():
        return f"keys differ: {sorted(before.keys() ^ after.keys())[:4]}"
    for k, a in before.items():
        b = after[k]
        if (a.device, a.dtype, a.shape, a.stride()) != (b.device, b.dtype, b.shape, b.stride()):
            return f"{k}: {a.device}/{a.dtype}/{a.stride()} came back as {b.device}/{b.dtype}/{b.stride()}"
        if not torch.equal(a, b):
            return f"{k}: values changed"
    return None


def check_train(precision: str, compile_unet: bool, tmp: Path, compile_mode: str = "default") -> str:
    from bench.shapes import demo_pipeline, write_dataset
    from lora_studio.lora.formats import read_lora
    from lora_studio.train import trainer as tr
    from lora_studio.train.config import TrainConfig

    pipe = demo_pipeline()
    before = _weights(pipe)
    data = write_dataset(tmp / f"data-{precision}", 4, 64)
    cfg = TrainConfig(data_dir=str(data), output_dir=str(tmp / "runs"), run_name=f"{precision}-{compile_unet}",
                      resolution=64, rank=4, alpha=4.0, steps=6, batch_size=2, learning_rate=1e-3,
                      mixed_precision=precision, compile_unet=compile_unet, compile_mode=compile_mode, seed=0)
    result = tr.train(cfg, pipeline=pipe)
    assert result.steps_done == 6, result.steps_done
    assert all(math.isfinite(x) for x in result.losses), result.losses
    lf = read_lora(result.lora_path)
    ups = [t for m in lf.modules.values() for s, t in m.tensors.items() if s.startswith("lora_up")]
    assert ups and any(bool(t.float().abs().max() > 0) for t in ups), "every lora_up is still zero"
    problem = _same(before, _weights(pipe))
    assert problem is None, f"the pipeline did not get its weights back: {problem}"
    return f"{len(result.losses)} finite losses ({result.losses[0]:.4f} .. {result.losses[-1]:.4f}), " \
           f"{len(lf.modules)} modules written, weights given back bit for bit"


def check_lean(tmp: Path) -> str:
    import torch

    from bench.unet_steps import kept_step, lora_unet
    from lora_studio.train.lean import lean_backward

    said = []
    for dtype in (torch.bfloat16, torch.float16):
        unet, _, _ = lora_unet(dtype, channels_last=True, device=DEVICE)
        runs = []
        for lean in (False, False, True):
            with lean_backward(unet, lean):
                out, grads, acts = kept_step(unet, dtype, size=32)
            runs.append((out, grads, acts.bytes))

        def diff(a, b):
            return max([(a[0] - b[0]).abs().max().item()] + [(g - h).abs().max().item() for g, h in zip(a[1], b[1])])

        noise, lean_diff = diff(runs[0], runs[1]), diff(runs[0], runs[2])
        assert lean_diff <= noise, f"{dtype}: lean differs from plain by {lean_diff:.2e}, plain from plain by {noise:.2e}"
        assert runs[2][2] < 0.8 * runs[0][2], f"{dtype}: kept {runs[2][2]} bytes with lean, {runs[0][2]} without"
        said.append(f"{str(dtype)[6:]}: max difference {lean_diff:.1e} (plain vs plain {noise:.1e}), kept "
                    f"{runs[2][2] / 2**20:.1f} vs {runs[0][2] / 2**20:.1f} MiB")
    return "; ".join(said)


def check_mixer(tmp: Path) -> str:
    import torch

    from bench.mix_apply import write_attention_lora
    from bench.shapes import demo_pipeline
    from lora_studio.mix import LoraMixer

    cpu_pipe = demo_pipeline()
    path = tmp / "random.safetensors"
    write_attention_lora(cpu_pipe, path, rank=8)  # random factors on every attention projection, kohya keys
    mixer = LoraMixer(cpu_pipe)
    mixer.add(path, strength=0.7)
    mixer.apply()
    want = {k: v.detach().float() for k, v in cpu_pipe.unet.state_dict().items()}
    gpu_pipe = demo_pipeline().to(DEVICE)
    w0 = {k: v.clone() for k, v in gpu_pipe.unet.state_dict().items()}
    changed = [k for k in want if not torch.equal(want[k], w0[k].float().cpu())]
    assert changed, "the LoRA changed no weight"
    said = []
    for keep in (True, False):  # W0 kept on the GPU, and kept in CPU memory
        mixer = LoraMixer(gpu_pipe, keep_originals_on_device=keep)
        mixer.add(path, strength=0.3)
        mixer.apply()
        mixer.set_strength(mixer.entries[0].name, 0.7)
        mixer.apply()  # a strength change: from the kept originals, wherever they are
        where = {w.device.type for w in mixer._originals.values()}
        assert where == {DEVICE if keep else "cpu"}, f"keep_originals_on_device={keep}: originals on {where}"
        got = {k: v.detach().float().cpu() for k, v in gpu_pipe.unet.state_dict().items()}
        worst = max((want[k] - got[k]).abs().max().item() / max(1e-12, want[k].abs().max().item()) for k in changed)
        assert worst < 1e-5, f"GPU and CPU weights differ by {worst:.2e} (relative to each weight's max)"
        mixer.restore()
        problem = _same(w0, gpu_pipe.unet.state_dict())
        assert problem is None, f"restore (keep_originals_on_device={keep}): {problem}"
        said.append(f"originals on {'the GPU' if keep else 'the CPU'}: worst relative difference {worst:.1e}")
    return f"{len(changed)} weights changed; " + "; ".join(said) + "; restore exact"


def main() -> int:
    import torch

    global DEVICE
    quiet_libraries()
    if "--dry-run" in sys.argv[1:]:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this where the device tool lends a GPU)")
        return 2
    print(f"device: {torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'cpu (dry run)'}, torch {torch.__version__}")
    checks = [("train fp16 (GradScaler)", lambda t: check_train("fp16", False, t)),
              ("train bf16", lambda t: check_train("bf16", False, t)),
              ("train bf16 + torch.compile", lambda t: check_train("bf16", True, t)),
              ("train bf16 + torch.compile reduce-overhead (CUDA graphs)",
               lambda t: check_train("bf16", True, t, "reduce-overhead")),
              ("lean_backward under CUDA's autocast", check_lean),
              ("mixer on CUDA", check_mixer)]
    only = [w for w in sys.argv[1:] if not w.startswith("--")]  # words: run the checks whose names hold one
    checks = [(name, fn) for name, fn in checks if not only or any(w in name for w in only)]
    failed = 0
    for name, fn in checks:
        with tempfile.TemporaryDirectory(prefix="cuda-check-") as tmp:
            try:
                print(f"PASS {name}: {fn(Path(tmp))}", flush=True)
            except Exception as exc:  # noqa: BLE001  (report every check, then the count)
                failed += 1
                print(f"FAIL {name}: {exc!r}", flush=True)
                traceback.print_exc(limit=6)
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
