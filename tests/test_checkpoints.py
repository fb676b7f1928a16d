"""Checkpoints that fall back: a newest checkpoint that cannot be resumed from is quarantined with a
warning naming it and the run resumes from the newest good one (ending with the bytes of an
unbroken run); ``latest`` never points at a missing file; a file that would run code is refused,
named, never skipped. Fake states test the choice; one tiny run tests the bytes."""

import re
from pathlib import Path

import pytest
import torch

from sra2.model.sit import CheckpointError
from sra2.train.checkpoints import Checkpoints
from sra2.train.loop import train

from conftest import encoded_tiny, with_overrides


class Payload:
    """An object a weights-only unpickler refuses: unpickling it could run code."""


def fake(step: int, value: float | None = None) -> dict:
    w = torch.full((2,), float(step) if value is None else value)
    return {"step": step, "model": {"w": w}, "ema": {"w": w.clone(), "n": torch.tensor(step)},
            "opt": {}, "heads": {}}


@pytest.fixture
def ckpts(tmp_path) -> Checkpoints:
    """Step files 1, 2, 3 (``latest`` names 3) of a run that keeps 3."""
    c = Checkpoints(tmp_path, {"run": 1}, keep=3)
    for step in (1, 2, 3):
        c.save(fake(step))
    return c


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def pointer(c: Checkpoints) -> str:
    return (c.folder / "latest").read_text()


def test_an_intact_latest_is_read_without_a_word(ckpts, capsys):
    assert ckpts.load()["step"] == 3
    assert capsys.readouterr().err == "" and not (ckpts.folder / ".quarantine").exists()


@pytest.mark.parametrize("damage, reason", [
    (truncate, "cannot be read (PytorchStreamReader failed reading zip archive"),
    (lambda p: torch.save({"model": {}}, p),
     "not a training checkpoint (no step, ema, opt, heads)"),
    (lambda p: torch.save(fake(3, float("nan")), p), "non-finite values in model.w"),
])
def test_a_damaged_newest_is_quarantined_and_the_one_before_resumed(ckpts, capsys, damage, reason):
    damage(ckpts.path(3))
    state = ckpts.load()
    assert state["step"] == 2 and torch.equal(state["ema"]["w"], fake(2)["ema"]["w"])
    err = capsys.readouterr().err
    assert f"cannot resume from {ckpts.path(3)}: {reason}" in err and "resuming from" in err
    assert ckpts.steps() == [1, 2] and pointer(ckpts) == "step-0000002.pt\n"
    assert [p.name for p in (ckpts.folder / ".quarantine").iterdir()] == ["step-0000003.pt.1"]
    # a second damaged step 3 joins the first; retention ignores the quarantine
    ckpts.save(fake(3))
    truncate(ckpts.path(3))
    assert ckpts.load()["step"] == 2
    assert sorted(p.name for p in (ckpts.folder / ".quarantine").iterdir()) == [
        "step-0000003.pt.1", "step-0000003.pt.2"]
    for step in (3, 4, 5):
        ckpts.save(fake(step))
    assert ckpts.steps() == [3, 4, 5] and (ckpts.folder / ".quarantine").is_dir()


def test_latest_naming_a_missing_file_resumes_from_the_newest_present(ckpts, capsys):
    ckpts.path(3).unlink()
    assert ckpts.load()["step"] == 2
    assert f"names {ckpts.path(3)}, which is missing" in capsys.readouterr().err
    assert pointer(ckpts) == "step-0000002.pt\n"


@pytest.mark.parametrize("garbage", [None, b"\xff\xfe not a name", b"../elsewhere.pt\n"])
def test_a_missing_or_garbage_latest_resumes_from_the_newest_step_file(ckpts, capsys, garbage):
    (ckpts.folder / "latest").unlink()
    if garbage is not None:
        (ckpts.folder / "latest").write_bytes(garbage)
    assert ckpts.load()["step"] == 3
    assert "names no step file" in capsys.readouterr().err
    assert pointer(ckpts) == "step-0000003.pt\n"


def test_with_no_good_checkpoint_left_training_starts_at_step_0(ckpts, capsys):
    for step in (1, 2, 3):
        truncate(ckpts.path(step))
    assert ckpts.load() is None
    assert "training starts at step 0" in capsys.readouterr().err
    assert ckpts.steps() == [] and not (ckpts.folder / "latest").exists()
    assert len(list((ckpts.folder / ".quarantine").iterdir())) == 3
    assert ckpts.load() is None and capsys.readouterr().err == ""  # nothing left to say


def test_other_ranks_pick_the_same_file_and_leave_the_folder_alone(ckpts, capsys):
    truncate(ckpts.path(3))
    assert ckpts.load(repair=False)["step"] == 2
    assert capsys.readouterr().err == "" and ckpts.steps() == [1, 2, 3]
    assert pointer(ckpts) == "step-0000003.pt\n"


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(ckpts):
    torch.save({**fake(3), "extra": Payload()}, ckpts.path(3))
    with pytest.raises(CheckpointError, match="step-0000003.pt: refused to load: unsupported "
                                              "global .*Payload.*move it out of"):
        ckpts.load()
    assert ckpts.steps() == [1, 2, 3] and not (ckpts.folder / ".quarantine").exists()


def test_a_shorter_run_resumes_below_a_longer_one_and_deletes_only_its_own_files(tmp_path, capsys):
    """Retention of a shorter run (more saves than it keeps, as timed saves make) never reaches
    the longer run's files nor its ``latest``; a longer run again prunes as before."""
    c = Checkpoints(tmp_path, {"run": 1}, keep=2)
    for step in (10, 20, 30):
        c.save(fake(step))
    assert c.steps() == [20, 30] and c.load(5) is None and c.floor == 0
    assert c.load(30)["step"] == 30 and c.floor is None
    assert c.load(25)["step"] == 20 and c.floor == 20
    for step in (21, 22, 23, 24, 25):
        c.save(fake(step))
    assert c.steps() == [20, 24, 25, 30] and pointer(c) == "step-0000030.pt\n"
    truncate(c.path(25))  # damage below the length: quarantined, latest still the longer run's
    assert c.load(25)["step"] == 24 and pointer(c) == "step-0000030.pt\n"
    assert f"cannot resume from {c.path(25)}" in capsys.readouterr().err
    assert c.load(40)["step"] == 30 and c.floor is None
    c.save(fake(40))
    assert c.steps() == [30, 40] and pointer(c) == "step-0000040.pt\n"


def test_a_truncated_newest_checkpoint_costs_the_steps_since_the_one_before(tmp_path, capsys):
    cfg, latents = encoded_tiny(tmp_path / "tiny",
                                train={"steps": 6, "ckpt_every": 2, "log_every": 3})
    train(cfg, latents, tmp_path / "straight")
    train(with_overrides(cfg, train={"steps": 4}), latents, tmp_path / "broken")
    (run,) = (tmp_path / "broken" / "checkpoints").iterdir()
    truncate(run / "step-0000004.pt")
    capsys.readouterr()
    train(cfg, latents, tmp_path / "broken")
    err = capsys.readouterr().err
    assert f"cannot resume from {run / 'step-0000004.pt'}: cannot be read (" in err
    assert f"resuming from {run / 'step-0000002.pt'} (step 2)" in err
    assert (run / ".quarantine" / "step-0000004.pt.1").exists()
    for name in ("ema.pt", "metrics.csv"):
        straight, broken = (tmp_path / d / name for d in ("straight", "broken"))
        assert straight.read_bytes() == broken.read_bytes(), name
    a, b = (torch.load(next((tmp_path / d / "checkpoints").glob("*/step-0000006.pt")))
            for d in ("straight", "broken"))
    for part in ("model", "ema", "heads"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part

    # a file that would run code, named by latest, stops the run naming it
    torch.save({"step": 8, "extra": Payload()}, run / "step-0000008.pt")
    (run / "latest").write_text("step-0000008.pt\n")
    refused = re.escape(f"{run / 'step-0000008.pt'}: refused to load")
    with pytest.raises(CheckpointError, match=refused):
        train(with_overrides(cfg, train={"steps": 8}), latents, tmp_path / "broken")


def test_verify_scrubs_a_run_folder(ckpts, capsys):
    from sra2.tools import verify

    assert verify.main([str(ckpts.folder.parent)]) == 0
    assert f"{ckpts.folder}: 3 checkpoint(s): clean" in capsys.readouterr().out
    truncate(ckpts.path(2))
    assert verify.main([str(ckpts.folder)]) == 1
    assert f"DAMAGED {ckpts.path(2)}: cannot be read" in capsys.readouterr().out
    assert verify.main([str(ckpts.folder), "--repair"]) == 0
    assert ckpts.steps() == [1, 3] and (ckpts.folder / ".quarantine" / "step-0000002.pt.1").exists()
