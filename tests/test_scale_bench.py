"""bench/scale.py: every stage measured under a real DVC pipeline, and the growth fitted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import scale  # noqa: E402


def test_the_smoke_run_measures_every_stage_and_folder_under_dvc(tmp_path):
    done = subprocess.run([sys.executable, "bench/scale.py", "--out", str(tmp_path), "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = json.loads((tmp_path / "scale.json").read_text())
    for stage in scale.STAGES:
        measured = row["stages"][stage]
        assert 0 < measured["outside"] <= measured["wall"] and measured["rss"] > 0
    assert row["disk"]["store"]["files"] > 0 and row["disk"]["copy"]["bytes"] > 0
    # DVC's cache holds the outputs' own files (hard links): its own bytes are its listings
    assert row["disk"]["dvc cache"]["bytes"] <= 4096 * row["disk"]["dvc cache"]["files"]
    assert row["dvc_status"] > 0 and row["dvc_noop_repro"] > 0
    assert "| store MB |" in done.stdout and "disk used / unavoidable" in done.stdout


def synthetic(n: int, grow) -> dict:
    """A measured row whose every figure is ``grow(x)`` of its scale (images or samples)."""
    samples = n // 2
    stage = {"wall": 2 * grow(n), "outside": grow(n),
             **{k: 1e6 * grow(n) for k in ("rss", "anon", "worker_uss", "worker_anon")}}
    return {"n": n, "samples": samples, "stages": {s: dict(stage) for s in scale.STAGES},
            "disk": {k: {"bytes": 1e6 * grow(n), "files": grow(n)} for k in
                     ("store", "checkpoints", "samples", "copy", "dvc cache")},
            "dvc_status": grow(n), "dvc_noop_repro": grow(n), "disk_ratio": 1.0}


@pytest.mark.parametrize("power", [0.0, 1.0, 1.5])
def test_growth_exponents_are_fitted_and_extrapolated_to_imagenet(power):
    rows = [synthetic(n, lambda x: 3.0 * x ** power) for n in (1000, 4000, 16000)]
    for name, (slope, imagenet) in scale.fit(rows).items():
        # the sample and evaluate stages, and the samples folder, grow with the samples
        target = scale.PAPER_SAMPLES if scale.scale_of(name) == "samples" else scale.IMAGENET
        x = 1000 // 2 if scale.scale_of(name) == "samples" else 1000
        value = scale.figures(rows[0])[name]
        assert slope == pytest.approx(power, abs=1e-9), name
        assert imagenet == pytest.approx(value * (target / x) ** power, rel=1e-9), name
