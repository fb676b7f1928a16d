"""Convergence across runs: the speed-up read off FID curves, training's time log, the picture.
The command on real queued experiments: tests/test_pipeline.py (test_queued_experiments_...)."""

import time

import numpy as np
import pytest
from PIL import Image

from sra2.evaluate import convergence
from sra2.evaluate.convergence import ConvergenceError, Curve, make_curve, speedup
from sra2.evaluate.plots import PALETTE
from sra2.train.checkpoints import TimeLog

HEADER = "step,fid,sfid,inception_score\n"


def fid_csv(points: dict[int, float]) -> str:
    return HEADER + "".join(f"{s},{f},1.0,1.0\n" for s, f in points.items())


def curve(label: str, points: dict[int, float], **times) -> Curve:
    return make_curve(label, fid_csv(points), f"{label}.csv", **times)


VANILLA = curve("vanilla", {100: 80.0, 200: 50.0, 300: 40.0, 400: 33.0})


def test_the_speed_up_is_the_ratio_of_the_steps_that_reach_the_baselines_final_fid():
    # vanilla's final FID is 33.0, first reached at its last evaluation, step 400. sra2 is at 35.0
    # at step 200 and 30.0 at step 300: 33.0 lies 2/5 of the way, step 200 + 0.4 * 100 = 240.
    # 400 / 240 = 1.667
    sra2 = curve("sra2", {100: 60.0, 200: 35.0, 300: 30.0, 400: 28.9})
    up = speedup(VANILLA, sra2)
    assert (up.target, up.baseline_step, up.method_step) == (33.0, 400.0, 240.0)
    assert up.ratio == pytest.approx(400 / 240) and not up.lower_bound
    assert up.text() == ("sra2 reaches vanilla's final FID 33.00 at step 240; vanilla at step "
                         "400: 1.7x faster")
    # a baseline that dips below its final FID before rising to it got there first on the way
    # down: final 35.0, 50.0 at step 100 and 30.0 at step 200 -> 100 + 15/20 * 100 = 175;
    # sra2 reaches 35.0 at step 200 exactly: 175 / 200 = 0.875, i.e. 200 / 175 = 1.14x slower
    wobbly = curve("wobbly", {100: 50.0, 200: 30.0, 300: 40.0, 400: 35.0})
    up = speedup(wobbly, sra2)
    assert (up.baseline_step, up.method_step, up.ratio) == (175.0, 200.0, 0.875)
    assert up.text().endswith("; wobbly at step 175: 1.1x slower")


def test_the_speed_up_has_a_range_from_the_noise_of_the_baselines_final_fid():
    # vanilla's final 33.0 with a bootstrap sd of 0.5: the target moves by 1.96 x 0.5 = 0.98.
    # sra2 (35 at 200, 30 at 300) reaches 32.02 at 200 + 2.98/5 x 100 = 259.6 and 33.98 at
    # 200 + 1.02/5 x 100 = 220.4, vanilla's step staying 400: 1.54x to 1.81x
    text = "step,fid,sfid,inception_score,fid_sd\n" + "".join(
        f"{s},{f},1.0,1.0,{sd}\n" for s, f, sd in [(100, 80.0, 2.0), (200, 50.0, 1.0),
                                                  (300, 40.0, 0.7), (400, 33.0, 0.5)])
    noisy = make_curve("vanilla", text, "vanilla.csv")
    assert noisy.fid_sd == [2.0, 1.0, 0.7, 0.5]
    up = speedup(noisy, curve("sra2", {100: 60.0, 200: 35.0, 300: 30.0, 400: 28.9}))
    assert up.interval == pytest.approx((400 / 259.6, 400 / 220.4), rel=1e-4)  # z = 1.95996
    assert "(1.5x to 1.8x with the target moved by 1.96 sd of vanilla's final FID" in up.text()
    # without a deviation in every row (evaluate.bootstrap 0, or older rows): no range
    assert speedup(VANILLA, curve("sra2", {300: 30.0})).interval is None


def test_a_run_that_does_not_get_there_is_not_reached_never_extrapolated():
    # 60 -> 40 over 100 steps would pass 33 at step 235 if the line went on: it is not drawn on
    slow = curve("slow", {100: 60.0, 200: 40.0})
    up = speedup(VANILLA, slow)
    assert up.method_step is None and up.ratio is None
    assert up.text() == ("slow does not reach vanilla's final FID 33.00: not reached (best 40.00 "
                         "at step 200, evaluated up to step 200)")


def test_a_run_there_at_its_first_evaluation_gives_a_lower_bound():
    # at 20.0 by step 100, its first evaluation: 400 / 100 = 4, or more
    fast = curve("fast", {100: 20.0, 200: 15.0})
    up = speedup(VANILLA, fast)
    assert (up.method_step, up.ratio, up.lower_bound) == (100.0, 4.0, True)
    assert up.text().endswith("by step 100 (its first evaluation); vanilla at step 400: at least "
                              "4.0x faster")


def test_an_empty_curve_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(ConvergenceError, match="never: never.csv has no FID rows"):
        curve("never", {})
    with pytest.raises(ConvergenceError, match="empty: the baseline has no FID evaluations"):
        speedup(Curve("empty", [], []), VANILLA)
    with pytest.raises(ConvergenceError, match="not a fid.csv"):
        make_curve("x", "step,loss\n1,0.5\n", "x.csv")
    (tmp_path / "never").mkdir()
    (tmp_path / "never" / "fid.csv").write_text(HEADER)
    (tmp_path / "vanilla.csv").write_text(fid_csv({100: 80.0, 400: 33.0}))
    out = tmp_path / "c.png"
    runs = [str(tmp_path / "vanilla.csv"), str(tmp_path / "never")]
    assert convergence.main([*runs, "--out", str(out)]) == 2
    assert f"error: {runs[1]}: {runs[1]}/fid.csv has no FID rows" in capsys.readouterr().err
    assert convergence.main([runs[0], "--baseline", "other", "--out", str(out)]) == 2
    assert "error: --baseline other: not among the runs" in capsys.readouterr().err
    assert not out.exists()  # nothing drawn


def test_the_time_log_continues_a_resumed_run_and_leaves_out_evaluations(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    path = tmp_path / "timing" / "run.csv"
    log = TimeLog(path, start=0, saved=0, global_batch=8, processes=2, device="cpu", write=True)
    now[0] = 5.0
    log.record(10)  # 5 s on 2 processes: 10 process-seconds
    with log.paused():
        now[0] = 8.0  # an evaluation: 3 s not counted
    now[0] = 12.0
    log.record(20)  # 12 - 3 = 9 s, 18 process-seconds
    # resumed from step 10 on one process, 4 s to step 20 again: 5 + 4 s, 10 + 4 process-seconds
    now[0] = 100.0
    resumed = TimeLog(path, start=10, saved=20, global_batch=8, processes=1, device="cpu",
                      write=True)
    now[0] = 104.0
    resumed.record(20)
    resumed.mirror(tmp_path / "times.csv", 20)
    assert (tmp_path / "times.csv").read_text() == (
        "step,images,processes,device,seconds,process_seconds\n"
        "10,80,2,cpu,5.0,10.0\n20,160,1,cpu,9.0,14.0\n")
    # a run resumed from a step without a row (started before times were kept) records nothing
    TimeLog(path, start=15, saved=20, global_batch=8, processes=1, device="cpu",
            write=True).record(30)
    TimeLog(path, start=20, saved=20, global_batch=8, processes=1, device="cpu",
            write=False).record(30)  # not rank 0
    assert path.read_text().splitlines()[-1].startswith("20,160,1,")


def test_images_and_hours_come_from_the_time_log_and_a_run_folder_finds_it(tmp_path):
    times = ("step,images,processes,device,seconds,process_seconds\n"
             "100,800,2,cuda,1800.0,3600.0\n150,1200,2,cuda,2700.0,5400.0\n"
             "200,1600,2,cuda,3600.0,7200.0\n")
    run = tmp_path / "out" / "checkpoints" / "abc123"
    run.mkdir(parents=True)
    (run / "fid.csv").write_text(fid_csv({100: 60.0, 200: 30.0}))
    (tmp_path / "out" / "timing").mkdir()
    (tmp_path / "out" / "timing" / "abc123.csv").write_text(times)
    c = convergence.read_path(str(run))
    assert (c.images, c.hours, c.device) == ([800.0, 1600.0], [1.0, 2.0], "cuda")
    # 33 at step 100 + 27/30 * 100 = 190 -> 1.9 GPU-hours (interpolated) against vanilla's 4
    base = curve("vanilla", {100: 80.0, 400: 33.0}, times_text=times.replace(
        "200,1600,2,cuda,3600.0,7200.0", "400,3200,2,cuda,7200.0,14400.0"))
    assert speedup(base, c).text().endswith(
        "at step 190; vanilla at step 400: 2.1x faster (in GPU-hours: 1.9 against 4, 2.1x)")
    # without the time log, images from the global batch; hours unknown
    c = make_curve("b", fid_csv({100: 60.0}), "b.csv", global_batch=256)
    assert (c.images, c.hours) == ([25600.0], None)


def test_the_picture_has_three_panels_with_every_line(tmp_path):
    times = ("step,images,processes,device,seconds,process_seconds\n"
             "100,800,1,cpu,10.0,10.0\n200,1600,1,cpu,20.0,20.0\n")
    curves = [curve("vanilla", {100: 80.0, 200: 50.0}, times_text=times),
              curve("sra2", {100: 60.0, 200: 35.0}, times_text=times.replace("20.0", "22.0"))]
    img = convergence.draw(curves, ["a line", "another"], panel=(400, 300))
    assert img.size == (1200, 64 + 300 + 14 + 2 * 18)
    pixels = np.asarray(img)
    for i in range(3):  # each panel holds both lines' colours
        panel = pixels[64:364, i * 400:(i + 1) * 400].reshape(-1, 3)
        for colour in PALETTE[:2]:
            assert (panel == colour).all(axis=1).sum() > 50, (i, colour)
    img.save(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size == img.size
