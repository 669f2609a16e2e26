"""The tiny training settings the end-to-end training tests share: 64 px buckets, rank 2, fp32 files."""

from __future__ import annotations

from pathlib import Path

from lora_studio.train.config import TrainConfig

TINY = dict(run_name="run", resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_step=8, rank=2,
            alpha=2.0, steps=3, batch_size=2, learning_rate=1e-2, save_precision="fp32")


def tiny_config(data: str | Path, out: str | Path, **settings) -> TrainConfig:
    """A ``TrainConfig`` for the demo dataset in ``data`` writing under ``out``; ``settings`` override ``TINY``."""
    return TrainConfig(data_dir=str(data), output_dir=str(out), **{**TINY, **settings})
