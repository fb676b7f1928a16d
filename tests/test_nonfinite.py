"""A step that is not finite: stop (the default) or skip it, the skips counted, logged and kept
through a resume. The NaN comes from a method registered by this test alone, whose loss is NaN at
the steps whose own draws say so: the loop runs unchanged."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sra2.methods import registry
from sra2.train.loop import NonFiniteError, draws, train

from conftest import Probe, encoded_tiny, with_overrides

STEPS = 8


class NaNAt(Probe):
    """Its head's output times NaN where one of its draws is among ``marks`` (else times 0): a NaN
    in the loss and in every gradient of the step, the weights untouched otherwise."""

    name, title = "nanprobe", "NaN probe"

    def __init__(self, marks: list[float]):
        self.marks = torch.tensor(marks)

    def losses(self, cfg, aid, head, step, inputs):
        scale = torch.where(torch.isin(inputs["u"], self.marks).any(), torch.nan, 0.0)
        return [head(step.patches(1)).mean() * scale]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return encoded_tiny(tmp_path_factory.mktemp("nonfinite"))[1]


def probe_at(cfg, steps: list[int]) -> NaNAt:
    """A probe whose loss is NaN at exactly ``steps`` (0-based): marked by the first of the
    probe's draws at each (the tiny preset's latents are 4 x 4 x 4)."""
    with registry.added(NaNAt([])):
        first = [draws(cfg, s, (4, 4, 4), 0, 1, torch.device("cpu")).methods["nanprobe/u"]
                 for s in range(STEPS)]
    marks = [float(first[s][0]) for s in steps]
    assert not any(torch.isin(first[s], torch.tensor(marks)).any() for s in range(STEPS)
                   if s not in steps)
    return NaNAt(marks)


def run(cfg, latents, out, probe):
    with registry.added(probe):
        return train(cfg, latents, out)


def assert_finite_rows(out: Path) -> None:
    """metrics.csv holds a finite row every log_every (2) steps: a bad step is left out."""
    metrics = (out / "metrics.csv").read_text().splitlines()
    values = [float(v) for row in metrics[1:] for v in row.split(",")]
    assert np.isfinite(values).all() and len(metrics) == 1 + STEPS // 2


def assert_same_bytes(a: Path, b: Path) -> None:
    """Two runs' metrics.csv, nonfinite.csv and EMA weights are the same."""
    for name in ("metrics.csv", "nonfinite.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    x, y = (torch.load(d / "ema.pt", weights_only=True)["ema"] for d in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_nan_stops_the_run_before_saving_it_by_default(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": STEPS, "ckpt_every": 2, "log_every": 2})
    probe = probe_at(cfg, [2])  # step 3 (1-based): checked at the row of step 4, not saved
    with pytest.raises(NonFiniteError, match="training step 3 is not finite"):
        run(cfg, latents, tmp_path, probe)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*/step-*.pt"))
    assert saved == ["step-0000002.pt"]


def test_skip_goes_on_counts_logs_and_resumes_to_the_same_bytes(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": STEPS, "ckpt_every": 4, "log_every": 2,
                                      "nonfinite": "skip"})
    probe = probe_at(cfg, [STEPS - 3])  # step 6 (1-based): after the checkpoint at step 4
    summary = run(cfg, latents, tmp_path / "straight", probe)
    assert summary["skipped_steps"] == 1 and np.isfinite(summary["loss"])
    logged = (tmp_path / "straight" / "nonfinite.csv").read_text().splitlines()
    assert logged[0].startswith("step,loss,loss_velocity,loss_align,loss_nanprobe,")
    assert len(logged) == 2 and logged[1].startswith(f"{STEPS - 2},") and "nan" in logged[1]
    assert_finite_rows(tmp_path / "straight")
    run(with_overrides(cfg, train={"steps": 4}), latents, tmp_path / "resumed", probe)
    run(cfg, latents, tmp_path / "resumed", probe)
    assert_same_bytes(tmp_path / "straight", tmp_path / "resumed")


def test_skip_stops_past_nonfinite_max_in_the_window(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": STEPS, "ckpt_every": 4, "log_every": 2,
                                      "nonfinite": "skip", "nonfinite_max": 1,
                                      "nonfinite_window": STEPS})
    probe = probe_at(cfg, [1, 5])
    with pytest.raises(NonFiniteError, match="training step 6 is not finite.*2 in the last 8 "
                                             "steps.*too many, stopped"):
        run(cfg, latents, tmp_path, probe)
    # the checkpoint before it stays, with the first skip counted for a resume
    kept = torch.load(next(Path(tmp_path, "checkpoints").glob("*/step-0000004.pt")),
                      weights_only=False)
    assert kept["nonfinite_steps"] == [2]


def test_rewind_goes_back_to_the_checkpoint_takes_other_draws_and_a_resume_replays_it(tmp_path,
                                                                                      tiny,
                                                                                      latents):
    """NaN at step 6: back to step 4's checkpoint, steps 5 and 6 drawn again (finite now); the
    row of step 6 in nonfinite.csv, metrics.csv finite; a run of 6 steps (which meets the NaN,
    rewinds and saves) then resumed to 8 writes the bytes of the unbroken run."""
    cfg = with_overrides(tiny, train={"steps": STEPS, "ckpt_every": 4, "log_every": 2,
                                      "nonfinite": "rewind"})
    probe = probe_at(cfg, [5])
    summary = run(cfg, latents, tmp_path / "straight", probe)
    assert np.isfinite(summary["loss"]) and summary["rewound_steps"] == 1
    logged = (tmp_path / "straight" / "nonfinite.csv").read_text().splitlines()
    assert len(logged) == 2 and logged[1].startswith("6,") and "nan" in logged[1]
    assert_finite_rows(tmp_path / "straight")
    final = torch.load(next((tmp_path / "straight" / "checkpoints").glob("*/step-0000008.pt")),
                       weights_only=False)
    assert final["attempts"] == {4: 1, 5: 1}  # steps 5 and 6 (0-based 4, 5) taken again
    run(with_overrides(cfg, train={"steps": 6}), latents, tmp_path / "resumed", probe)
    run(cfg, latents, tmp_path / "resumed", probe)
    assert_same_bytes(tmp_path / "straight", tmp_path / "resumed")
    # and differs from the run that skipped the step instead
    skipped = run(with_overrides(cfg, train={"nonfinite": "skip"}), latents, tmp_path / "skip",
                  probe)
    assert skipped["loss"] != summary["loss"]


def test_rewind_before_the_first_checkpoint_stops_naming_why(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": STEPS, "ckpt_every": 4, "log_every": 2,
                                      "nonfinite": "rewind"})
    with pytest.raises(NonFiniteError, match="no checkpoint to go back to"):
        run(cfg, latents, tmp_path, probe_at(cfg, [1]))
