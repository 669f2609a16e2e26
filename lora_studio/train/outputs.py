"""Everything one run writes into ``<output_dir>/<run_name>/``: config.json, LoRA files, state, samples, losses."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TrainingError
from ..family import Family
from ..grid import labelled_grid
from ..models import modelspec_prediction_type
from .config import TrainConfig
from .dataset import BucketBatches
from .save import RESUME_MUST_MATCH, lora_metadata, save_state, write_losses, write_lora
from ..fileio import atomic_path


class RunWriter:
    def __init__(self, cfg: TrainConfig, run_dir: Path, family: Family, batches: BucketBatches,
                 tag_freq: dict) -> None:
        self.cfg, self.run_dir, self.family, self.batches, self.tag_freq = cfg, Path(run_dir), family, batches, tag_freq
        self.samples: list[Path] = []
        self.last_good: Path | None = None
        self.prediction_type = cfg.prediction_type
        self.created = False        # whether this run made run_dir (then a failure before step 1 removes it)

    def start(self) -> None:
        try:
            self.created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainingError(f"cannot create the run folder {self.run_dir}: {err.strerror or err}. Choose an "
                                "output folder you can write to (a file may be in the way).") from err
        self.cfg.to_json(self.run_dir / "config.json")

    def discard_if_unused(self) -> None:
        """After a failure: remove the run folder if this run made it and it holds only ``start``'s config.json,
        so a run that never trained leaves nothing behind. Anything else in it (a latent cache, saves) stays."""
        if not self.created:
            return
        config = self.run_dir / "config.json"
        try:
            if [p.name for p in self.run_dir.iterdir()] == [config.name]:
                config.unlink()
            self.run_dir.rmdir()  # only succeeds when empty
        except OSError:
            pass

    def _metadata(self, modules, step: int) -> dict[str, str]:
        items = self.batches.items
        dirs: dict[str, dict[str, int]] = {}
        for it in items:
            d = dirs.setdefault(f"{it.repeats}_{it.concept}", {"n_repeats": it.repeats, "img_count": 0})
            d["img_count"] += 1
        per_step = self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        buckets = {str(i): {"resolution": list(b), "count": n}
                   for i, (b, n) in enumerate(self.batches.bucket_counts.items())}
        epoch = (step * self.cfg.gradient_accumulation_steps) // max(1, self.batches.batches_per_epoch)
        meta = lora_metadata(self.cfg, self.family, modules, steps_done=step,
                             num_train_images=sum(it.repeats for it in items), tag_frequency=self.tag_freq,
                             dataset_dirs=dirs, bucket_info={"buckets": buckets, "images_per_step": per_step},
                             batches_per_epoch=self.batches.batches_per_epoch, epoch=epoch)
        meta["modelspec.prediction_type"] = modelspec_prediction_type(self.prediction_type) or self.prediction_type
        if self.prediction_type == "v_prediction":
            meta["ss_v_parameterization"] = "True"
        return meta

    def save_lora(self, modules, step: int, final: bool) -> Path:
        name = self.cfg.resolved_output_name()
        path = self.run_dir / (f"{name}.safetensors" if final else f"{name}-step{step:06d}.safetensors")
        write_lora(modules, path, self._metadata(modules, step), self.cfg.save_precision)
        self.last_good = path
        return path

    def lora_at(self, step: int, modules) -> Path:
        """The LoRA file of ``step``: the one saved at this step, else a new one (``modules()`` gives the weights)."""
        path = self.run_dir / f"{self.cfg.resolved_output_name()}-step{step:06d}.safetensors"
        return path if self.last_good == path else self.save_lora(modules(), step, final=False)

    def save_state(self, step: int, adapter: dict, torch_state: dict, losses: list[float], lrs: list[float],
                   validation: list | None = None) -> Path:
        info = {"step": step, "losses": losses, "lrs": lrs, "validation": validation or [],
                "config": {k: getattr(self.cfg, k) for k in RESUME_MUST_MATCH}}
        return save_state(self.run_dir / "state", step, adapter, torch_state, info)

    def sample(self, pipe, step: int) -> Path:
        """One grid: a row per seed, a column per prompt, rendered with the LoRA as trained so far."""
        cfg = self.cfg
        rows = []
        with torch.no_grad():
            for seed in cfg.sample_seeds:
                row = []
                for prompt in cfg.sample_prompts:
                    gen = torch.Generator().manual_seed(seed)
                    row.append(pipe(prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                                    generator=gen, height=cfg.resolution, width=cfg.resolution).images[0])
                rows.append(row)
        grid = labelled_grid(rows, cfg.sample_prompts, [f"seed {s}" for s in cfg.sample_seeds],
                             scale=2 if cfg.resolution < 256 else 1)
        path = self.run_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)

        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        self.samples.append(path)
        return path

    def finish(self, losses: list[float], lrs: list[float]) -> None:
        write_losses(self.run_dir, losses, lrs)
