"""``python -m lora_studio demo``: build (if needed) the tiny demo model, write the demo dataset, render a sample grid."""

from __future__ import annotations

from pathlib import Path

from ..progress import text_progress
from .. import demo
from ..demo.render import sample_grid


def register(sub) -> None:
    p = sub.add_parser("demo", help="build the tiny demo model and dataset, render a sample grid into outputs/")
    p.add_argument("--out", default="outputs/demo", help="folder for the dataset and the sample grid")
    p.add_argument("--rebuild", action="store_true", help="retrain the demo model's weights from nothing (minutes)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for the sample grid")
    p.set_defaults(func=run)


def run(args) -> int:

    progress = text_progress()
    if args.rebuild:
        demo.build_demo_model(demo.DEMO_MODEL_DIR, progress=progress)
    model = demo.ensure_demo_model(progress)
    out = Path(args.out)
    data = demo.make_demo_dataset(out / "dataset")
    grid = sample_grid(demo.load_demo_pipeline(), out / "samples.png", steps=args.steps)
    print(f"demo model: {model}\ndemo dataset: {data}\nsample grid: {grid}")
    return 0
