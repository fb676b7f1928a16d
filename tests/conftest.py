from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flows.harness.prefect_defaults  # noqa: F401  (the test server's too)
from sra2.config.params import Config, resolve
from sra2.methods.method import Method


@pytest.fixture(scope="session", autouse=True)
def latent_copies(tmp_path_factory) -> Path:
    """Node-local latent copies of the whole session (and of the processes it starts) in a
    temporary folder, not in the machine's /tmp."""
    root = tmp_path_factory.mktemp("latent-copies")
    os.environ["SRA2_COPY_DIR"] = str(root)
    return root


@pytest.fixture
def tiny() -> Config:
    return resolve({"preset": "tiny"})


def with_overrides(cfg: Config, **sections) -> Config:
    """``cfg`` with some keys of some sections replaced, validated again."""
    data = cfg.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return Config.model_validate(data)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero makes a fresh SiT output exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def jpeg_bytes(rgb: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def photo() -> np.ndarray:
    """A real photograph shipped with scikit-image (512x512 RGB)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """End a process this test started, by its own handle, if it still runs: ``sig``, then
    SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, payload in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
    return root


def encoded_tiny(root: Path, **sections) -> tuple[Config, Path]:
    """The tiny preset's demo JPEGs drawn under ``root`` and encoded; returns the config (with
    ``sections`` overridden, data.root pointing at the images) and the latent store."""
    from sra2.data.demo import write_demo_dataset
    from sra2.data.encode import encode_dataset

    cfg = resolve({"preset": "tiny"})
    d = cfg.data.demo
    write_demo_dataset(root / "images", d.classes, d.per_class, d.min_side, d.max_side, d.seed)
    cfg = with_overrides(cfg, data={"root": str(root / "images")}, **sections)
    encode_dataset(cfg, root / "latents")
    return cfg, root / "latents"


@pytest.fixture
def one_thread(monkeypatch):
    """The same intra-op thread count in every process: results are then bitwise comparable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


class Probe(Method):
    """A method known to the tests alone, always on: a Linear(D, 1) head on block 1's tokens, one
    uniform draw per sample (``u``) handed to its loss, weight ``weight``; a subclass writes
    ``losses``."""

    weight = 1.0

    def on(self, cfg):
        return True

    def settings(self, cfg):
        return {}

    def terms(self, cfg, epoch=0):
        return {self.name: self.weight}

    def blocks(self, cfg):
        return {"probe.block": 1}

    def head(self, model, cfg):
        return torch.nn.Linear(model.hidden_size, 1)

    def draws(self, cfg, g, n, shape, device):
        return {"u": torch.rand(n, generator=g, device=device)}

    def inputs(self, cfg, aid, batch, common, drawn):
        return {"u": drawn["u"]}
