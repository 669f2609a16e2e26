"""Shared fixtures: the shipped tiny demo model, the demo style dataset, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

# On a busy 2-core machine, OpenMP threads that spin while waiting slow every torch process down badly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.getloadavg()[0] > (os.cpu_count() or 1):  # other work is running: one thread each is faster overall
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
REAL_LORAS = REPO.parent / "shared" / "real-loras"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~20 s on 2 CPU cores")
    config.addinivalue_line("markers", "browser: drives a real headless Chromium")
    # diffusers' (K-)DPM2 and Euler schedulers call numpy functions on torch tensors, and numpy 2 warns about
    # that on every call: 32,000 lines of third-party noise per run that hid the warnings worth reading.
    for message in ("__array_wrap__ must accept context", "__array__ implementation doesn't accept a copy"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from lora_studio.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture()
def demo_pipe(demo_model_dir):
    """A fresh demo pipeline per test (loading takes well under a second), so tests may change its weights."""
    from lora_studio.demo import load_demo_pipeline

    return load_demo_pipeline()


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from lora_studio.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo-data"))


@pytest.fixture(scope="session")
def real_loras() -> Path:
    """Real LoRA files made outside this project (../shared/real-loras, present in CI and every session).
    A clone without that folder skips these interop tests and says so; under CI (CI=true) they must run."""
    folder = Path(os.environ.get("LORA_STUDIO_REAL_LORAS", REAL_LORAS))
    if not folder.is_dir():
        message = f"real LoRA fixtures not found at {folder}; set LORA_STUDIO_REAL_LORAS to run the interop tests"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI has ../shared beside the clone: it must run them)")
        pytest.skip(message)
    return folder


@pytest.fixture()
def lora_reads(monkeypatch) -> dict[str, int]:
    """Counts every LoRA file read: calls of the reader and of the safetensors loader under it (``["n"]``)."""
    import lora_studio.fileio.tensors as fileio
    import lora_studio.lora.formats as formats
    import lora_studio.mix.mixer as mix

    calls = {"n": 0}
    real_read, real_load = formats.read_lora, fileio.load_file

    def counting_read(*a, **k):
        calls["n"] += 1
        return real_read(*a, **k)

    def counting_load(*a, **k):
        calls["n"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(formats, "read_lora", counting_read)
    monkeypatch.setattr(mix, "read_lora", counting_read)
    monkeypatch.setattr(fileio, "load_file", counting_load)
    return calls
