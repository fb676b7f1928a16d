"""bench/decode.py's smoke run, and encode.workers: auto (sra2.data.encode.decode_workers)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sra2.config.params import ConfigError, resolve
from sra2.data import encode
from sra2.data.encode import MAX_WORKERS, decode_workers

REPO = Path(__file__).resolve().parents[1]


def test_the_decode_benchmark_smoke_run_prints_its_rates():
    run = subprocess.run([sys.executable, "bench/decode.py", "--smoke"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # each row ends: all, / (a), <512, large (images/s), max, mean, same px (differences to (a))
    rows = {line.split(")")[0][1:]: line.split()[-7:] for line in run.stdout.splitlines()
            if re.match(r"\((a|b|c|c')\) ", line)}
    assert set(rows) == {"a", "b", "c", "c'"}, run.stdout
    assert all(float(row[0]) > 0 for row in rows.values())
    assert rows["a"][1] == "1.00"
    assert rows["b"][4:] == ["0", "0.000", "100.00%"], "torchvision's decode changed a crop"
    assert re.search(r"^one H100 at 40% MFU, TF32 .*\(the presets\): \d+ images/s", run.stdout,
                     re.M), run.stdout


@pytest.mark.parametrize("cores, processes, workers", [
    (16, 8, 1),  # 2 cores a rank: one decodes, one runs the rank
    (64, 8, 7),
    (2, 1, 1),
    (1, 1, 1),  # no core to spare: still one worker, decoding beside the VAE
    (12, 8, 1),
    (96, 8, 11),
    (256, 8, MAX_WORKERS),
    (4, 1, 3),
])
def test_auto_workers_share_the_cores_among_the_ranks(cores, processes, workers):
    assert decode_workers("auto", cores, processes) == workers


def test_auto_workers_read_the_affinity_and_the_launcher(monkeypatch):
    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda pid: set(range(24)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_workers("auto") == 5
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert decode_workers("auto") == min(MAX_WORKERS, 23)


def test_a_number_of_workers_is_kept():
    assert decode_workers(0, 64, 8) == 0 and decode_workers(24, 2, 1) == 24


def test_paper_presets_derive_their_workers():
    assert all(resolve({"preset": p}).encode.workers == "auto"
               for p in ("sit-b2", "sit-l2", "sit-xl2"))
    assert resolve({"preset": "demo", "encode": {"workers": "auto"}}).encode.workers == "auto"


@pytest.mark.parametrize("value", [-1, "many", "Auto", 2.5, True, None, [4]])
def test_bad_workers_are_named(value):
    with pytest.raises(ConfigError) as error:
        resolve({"preset": "demo", "encode": {"workers": value}})
    assert str(error.value).endswith(
        f"\n  encode.workers: must be a number of processes >= 0 or 'auto' (got {value!r})")
