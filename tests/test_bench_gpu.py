"""bench/gpu.py, the one command for a lent GPU, runs end to end in its smoke version on the CPU,
so it has not rotted when a GPU is finally there."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"train", "sample", "encode", "inception", "read", "determinism"}
# the full run's paths a CPU can take: bf16 autocast, torch.compile, REPA's encoder and head
TRAIN_CASES = {"SiT-Demo/2 bf16", "SiT-Demo/2 bf16 compiled", "SiT-Demo/2 bf16, SRA 2 + REPA"}


def test_the_gpu_benchmark_smoke_run_writes_its_table(tmp_path):
    run = subprocess.run([sys.executable, "bench/gpu.py", str(tmp_path / "out"), "--smoke"],
                         cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    rows = table["rows"]
    assert table["smoke"] and {r["section"] for r in rows} == SECTIONS
    assert not [r for r in rows if r["case"] == "FAILED"]
    value = {(r["section"], r["case"], r["figure"]): r["value"] for r in rows}
    numbers = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert all(math.isfinite(v) for v in numbers)
    rates = {(c, f): v for (s, c, f), v in value.items() if s == "train" and "images/s" in f}
    assert {c for c, _ in rates} == TRAIN_CASES and len(rates) == 9
    assert all(v > 0 for v in rates.values())
    ratios = [v for (s, _, f), v in value.items() if f == "loop / bare step"]
    assert ratios and all(0 < r < 2 for r in ratios)
    # on the CPU, one thread per process: identical and resumed runs are the same bytes, with
    # train.deterministic too
    assert all(v is True for (s, _, f), v in value.items() if "byte-identical" in f)
    deterministic = "SiT-Demo/2, 4 steps, deterministic True"
    assert value["determinism", deterministic, "two runs byte-identical"]
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| train |" in markdown and "SMOKE" in markdown
