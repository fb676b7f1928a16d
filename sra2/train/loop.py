"""Training: SiT (or MMDiT) + the methods switched on (:mod:`sra2.methods.registry`) on cached
latents, with EMA, checkpoints and resume.

Every random draw of step s (batch order, the caption of each image where there are captions, VAE
posterior noise, interpolation noise, times, label or caption dropout, the methods' own draws such
as SRA's teacher time) comes from generators seeded by (seed, s) for the whole global batch, so a
run resumed from a checkpoint, or run on another number of GPUs, takes the steps an unbroken run
would take. Each process splits its part of the batch into
micro-batches of ``train.batch_per_gpu`` whose gradients add up to the step's; per-step work stays
on the device (one host sync per log row; one per step under ``train.nonfinite: skip``).

Faults cost at most the time since the last save. SIGTERM or SIGINT (or the launching process gone,
:mod:`sra2.runtime.worker`) ends the step in progress, saves it and raises
:class:`sra2.runtime.stopping.Stopped`; all ranks stop at the same step
(:class:`sra2.runtime.stopping.Consensus`). A checkpoint also holds the metrics of the steps since
the last row, so a run resumed from any step writes the bytes of an unbroken one. Checkpoints
(:mod:`sra2.train.checkpoints`) are also written every ``train.ckpt_minutes``
(:class:`sra2.runtime.stopping.SaveClock`), the ``train.keep_checkpoints`` newest are kept, and a
non-finite loss, gradient or weight stops the run before it is saved.

Nothing saved at a step depends on ``train.steps`` (the last row of a run off the
``train.log_every`` cadence is written after its checkpoint, which keeps the sums since the row
before), so runs of any length, in any order, share one run folder: a run of N steps resumes from
the newest checkpoint at or below N, or exports the one at N, and ends with the bytes of an
unbroken run of N steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

from sra2.config.params import Config, result_settings
from sra2.data import latent_copy, space
from sra2.data.latents import StepBatches, open_batches, read_rate, stream
from sra2.data.store import ShardedStore, pointed_store
from sra2.evaluate.plots import write_fid_plot, write_loss_plot
from sra2.methods import objective, registry
from sra2.methods.objective import Objective, build_heads
from sra2.model.flops import PEAK_TFLOPS
from sra2.model.networks import build, family
from sra2.model.sit import SiT, read_checkpoint
from sra2.runtime import atomic, dist
from sra2.runtime.stopping import Consensus, SaveClock, StopSignals, stopped
from sra2.runtime.worker import Progress
from sra2.sample.samplers import derived_seed
from sra2.train import cost, fid_curve
from sra2.train.checkpoints import Checkpoints, MetricsLog, TimeLog, ema_export


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient: the run stops before it is saved."""


# --- the run's identity

def signature(cfg: Config, data_signature: dict) -> dict:
    """What a run's numbers depend on (not its length, logging, speed knobs or process count):
    its checkpoint folder."""
    # a method enters only when on (but SRA 2, in every run's), so runs without it keep their
    # folders
    methods = {m.name: m.settings(cfg) for m in registry.METHODS if m.always_signed or m.on(cfg)}
    return {"model": result_settings(cfg.model), "train": result_settings(cfg.train),
            "latents": data_signature, **methods}


# --- randomness of a step

class Draws(NamedTuple):
    """Every random tensor of one step, this rank's rows."""

    eps: torch.Tensor  # the VAE posterior's noise: x1 = mean + std * eps
    x0: torch.Tensor  # the interpolation's noise
    t: torch.Tensor  # the times
    drop: torch.Tensor  # True where the label is dropped (the null class)
    methods: dict[str, torch.Tensor]  # the methods' own draws, as <method>/<name>


def draws(cfg: Config, step: int, shape: tuple, rank: int, world: int,
          device: torch.device, attempt: int = 0) -> Draws:
    """Every random tensor of one step, drawn on the device for the whole global batch from a
    generator seeded by (seed, step), then sliced to this rank: the run does not depend on the
    number of processes. ``attempt`` > 0: the step taken again after a rewind, other draws."""
    seed = derived_seed(cfg.train.seed, step)
    g = torch.Generator(device).manual_seed(derived_seed(seed, attempt) if attempt else seed)
    n = cfg.train.global_batch
    eps = torch.randn((n, *shape), generator=g, device=device)
    x0 = torch.randn((n, *shape), generator=g, device=device)
    t = torch.rand(n, generator=g, device=device)
    drop = torch.rand(n, generator=g, device=device) < cfg.model.class_dropout
    # drawn last, method by method: the draws above stay those of runs without them
    methods = {f"{m.name}/{k}": v for m in registry.active(cfg)
               for k, v in m.draws(cfg, g, n, shape, device).items()}
    part = slice(rank * n // world, (rank + 1) * n // world)
    return Draws(eps[part], x0[part], t[part], drop[part],
                 {k: v[part] for k, v in methods.items()})


# --- the model and one step

@dataclass
class Trainer:
    """Everything a run is made of; built once, then stepped."""

    cfg: Config
    model: SiT
    ema: SiT
    heads: nn.ModuleDict  # the trained head of each method on (sra2.methods.objective)
    aids: dict[str, Any]  # what each method on loaded once (an EMA teacher, an encoder)
    names: list[str]  # of the step's losses: loss, loss_velocity, loss_<term>...
    loss_fn: nn.Module  # the objective, wrapped in DDP and torch.compile as configured
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    micro: int  # micro-batches per step on this process
    device: torch.device
    null: torch.Tensor | None  # the empty caption's context (1, tokens, width); None: labels
    weights: tuple | None = None  # the scheduled terms' weights now: (floats, on the device)

    def state(self, step: int, meter: dict, bad: NonFiniteSteps) -> dict:
        return {"step": step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "meter": meter, "heads": self.heads.state_dict(),
                **({"nonfinite_steps": bad.steps} if bad.steps else {}),
                **({"attempts": bad.attempts} if bad.attempts else {})}

    def load(self, state: dict) -> None:
        for name in ("model", "ema", "opt", "heads"):
            getattr(self, name).load_state_dict(state[name])


def build_model(cfg: Config, latent_side: int, context_dim: int | None = None) -> torch.nn.Module:
    """The network of model.name; an MMDiT reads contexts of ``context_dim`` (None: REPA's 768)."""
    return build(cfg.model.name, input_size=latent_side, num_classes=cfg.model.num_classes,
                 learn_sigma=cfg.model.learn_sigma, context_dim=context_dim,
                 **objective.model_options(cfg))


def micro_batches(cfg: Config, world: int) -> int:
    per_rank = cfg.train.global_batch // world
    size = cfg.train.batch_per_gpu or per_rank
    if cfg.train.global_batch % world or per_rank % size:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) must split into "
                         f"{world} process(es) x micro-batches of train.batch_per_gpu ({size})")
    return per_rank // size


def build_trainer(cfg: Config, latent_shape: tuple, device: torch.device, world: int,
                  null: np.ndarray | None = None) -> Trainer:
    """``null``: the empty caption's context, for captioned data."""
    tc = cfg.train
    torch.manual_seed(tc.seed)  # weight init only; every later draw uses its own generator
    context_dim = None if null is None else null.shape[-1]
    model = build_model(cfg, latent_shape[-1], context_dim).to(device)
    heads = build_heads(model, cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    aids = {m.name: m.prepare(cfg, model, ema, device) for m in registry.active(cfg)}
    whole = Objective(model, heads, cfg, aids)
    loss_fn: nn.Module = whole
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            fused=cuda or None, foreach=None if cuda else True)
    if world > 1:
        loss_fn = nn.parallel.DistributedDataParallel(loss_fn,
                                                      device_ids=[device.index] if cuda else None)
    if tc.compile:
        loss_fn = torch.compile(loss_fn)
    return Trainer(cfg, model, ema, heads, aids, whole.names, loss_fn, opt, params,
                   micro_batches(cfg, world), device,
                   None if null is None else torch.from_numpy(null).to(device))


def step_inputs(tr: Trainer, batch: dict, drawn: Draws) -> list[dict]:
    """The objective's inputs of each micro-batch
    (:meth:`sra2.methods.objective.Objective.forward`)."""
    cfg, micro = tr.cfg, tr.micro
    mean, std = batch["mean"], batch["std"]
    x1 = (mean + std * drawn.eps) * cfg.vae.scale
    common = {"x1": x1, "y": condition(tr, batch, drawn.drop), "t": drawn.t, "x0": drawn.x0}
    inputs = {**common, **objective.inputs(cfg, tr.aids, batch, common, drawn.methods)}
    parts = {k: v.chunk(micro) for k, v in inputs.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(micro)]


def condition(tr: Trainer, batch: dict, drop: torch.Tensor) -> torch.Tensor:
    """What the network is conditioned on: the labels, the null class where ``drop``; or the
    picked captions' contexts, the empty caption's where ``drop``."""
    if tr.null is None:
        labels = batch["labels"]
        return torch.where(drop, torch.full_like(labels, tr.cfg.model.num_classes), labels)
    return torch.where(drop[:, None, None], tr.null, batch["context"])


def term_weights(tr: Trainer, step: int, dataset: int) -> torch.Tensor | None:
    """The terms' weights at ``step`` where a method schedules them by whole epochs of the
    ``dataset`` (its size) seen, on the device (made again only when they change); else None."""
    epoch = step * tr.cfg.train.global_batch // dataset
    found = objective.weights(tr.cfg, epoch)
    if found is None:
        return None
    if tr.weights is None or tr.weights[0] != found:
        tr.weights = (found, torch.tensor(found, device=tr.device))
    return tr.weights[1]


def train_step(tr: Trainer, inputs,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """One optimizer step over the micro-batches (with the terms' ``weights`` where scheduled);
    returns the losses named ``tr.names`` and the grad norm, on the device, and whether the update
    was made: under ``train.nonfinite: skip`` a step whose values are not finite on any rank
    leaves the weights, the optimizer and the EMA as they were (a host sync per step). Gradients
    of all but the last micro-batch stay local (DDP no_sync)."""
    tr.opt.zero_grad(set_to_none=True)
    losses = torch.zeros(len(tr.names), device=tr.device)
    for i, args in enumerate(inputs):
        local = i < tr.micro - 1 and hasattr(tr.loss_fn, "no_sync")
        with tr.loss_fn.no_sync() if local else nullcontext():
            with dist.autocast(tr.device, tr.cfg.train.precision):
                parts = tr.loss_fn(args, weights)
            (parts[0] / tr.micro).backward()
        losses += parts.detach() / tr.micro
    grad_norm = nn.utils.clip_grad_norm_(tr.params, tr.cfg.train.grad_clip, foreach=True)
    values = torch.cat([losses, grad_norm.reshape(1).float()])
    if tr.cfg.train.nonfinite != "stop" and not finite_everywhere(values):
        tr.opt.zero_grad(set_to_none=True)
        return values, False
    tr.opt.step()
    with torch.no_grad():
        ema, live = list(tr.ema.parameters()), list(tr.model.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - tr.cfg.train.ema_decay)
    return values, True


def finite_everywhere(values: torch.Tensor) -> bool:
    """Whether ``values`` are finite on every rank (all ranks then skip or step together)."""
    flag = torch.isfinite(values).all().float().reshape(1)
    if tdist.is_initialized():
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())


class NonFiniteSteps:
    """The steps that were not finite under ``train.nonfinite: skip`` or ``rewind``, and the
    steps a rewind takes again (``attempts``: 0-based step -> times retaken): kept in every
    checkpoint (a resumed run counts its window, and draws, as an unbroken one does) and, on rank
    0, one row each in ``nonfinite.csv`` (the step's losses and grad norm) beside metrics.csv.
    More than ``train.nonfinite_max`` within the last ``train.nonfinite_window`` steps stops the
    run."""

    def __init__(self, cfg: Config, steps: list[int], attempts: dict[int, int],
                 log: MetricsLog | None):
        self.cfg, self.steps, self.attempts, self.log = cfg, list(steps), dict(attempts), log

    def retake(self, first: int, last: int) -> None:
        """Steps ``first``.. ``last`` - 1 (0-based) are taken again, with other draws."""
        for step in range(first, last):
            self.attempts[step] = self.attempts.get(step, 0) + 1

    def record(self, step: int, columns: list[str], values: torch.Tensor) -> str:
        """Count step ``step`` (1-based) as not finite; returns the line that says so."""
        tc = self.cfg.train
        self.steps.append(step)
        found = dict(zip(columns, [step, *values.tolist()]))
        if self.log is not None:
            self.log.append(found)
        recent = sum(s > step - tc.nonfinite_window for s in self.steps)
        what = ", ".join(f"{k}={v:.6g}" for k, v in found.items() if k != "step")
        action = "skipped" if tc.nonfinite == "skip" else "rewound"
        line = (f"training step {step} is not finite ({what}): {action}, {recent} in the last "
                f"{tc.nonfinite_window} steps (train.nonfinite_max {tc.nonfinite_max})")
        if recent > tc.nonfinite_max:
            raise NonFiniteError(f"{line}: too many, stopped; the last checkpoint is kept")
        return line


# --- values of the steps, and saving only finite ones

class Meter:
    """Sums of step values on the device, and the first non-finite step, read once per row."""

    def __init__(self, device: torch.device, start: int, columns: list[str]):
        self.device, self.columns = device, columns  # step, the losses, grad_norm
        self.step = torch.full((1,), float(start), dtype=torch.float64, device=device)
        self.first_bad = torch.full((len(columns),), -1.0, dtype=torch.float64, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self.columns) - 1, dtype=torch.float64, device=self.device)
        self.count, self.timed, self.tick = 0, 0, time.perf_counter()

    def skip(self) -> None:
        """A step taken without an update (train.nonfinite: skip): counted, its values left out."""
        self.step += 1
        self.timed += 1

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        self.sums += values
        self.count += 1
        self.timed += 1
        self.step += 1  # counted on the device: no host-to-device copy per step
        new = ~torch.isfinite(values).all() & (self.first_bad[0] < 0)
        self.first_bad = torch.where(new, torch.cat([self.step, values]), self.first_bad)

    def check(self) -> None:
        """Raise if any step since the start was non-finite (a host sync)."""
        bad = self.first_bad.tolist()
        if bad[0] >= 0:
            names = ", ".join(f"{k}={v}" for k, v in zip(self.columns[1:], bad[1:]))
            raise NonFiniteError(f"training step {int(bad[0])} is not finite ({names}): stopped "
                                 "before saving it; lower train.lr or raise train.grad_clip")

    def row(self, done: int, global_batch: int) -> tuple[dict, float]:
        """The mean of the values since the last row over all processes, and images/s."""
        self.check()
        means = dist.mean_across_ranks(self.sums / self.count)
        rate = self.timed * global_batch / (time.perf_counter() - self.tick)
        self._reset()
        return dict(zip(self.columns, [done, *np.round(means, 6).tolist()])), rate

    def partial(self, world: int) -> dict:
        """The sums of every rank since the last row (a collective), for a checkpoint."""
        parts = [self.sums]
        if world > 1:
            parts = [torch.empty_like(self.sums) for _ in range(world)]
            tdist.all_gather(parts, self.sums)
        return {"sums": torch.stack(parts).cpu(), "count": self.count}

    def restore(self, partial: dict | None, rank: int, world: int) -> None:
        """Continue a row a checkpoint broke off: with the process count it was saved with, from
        this rank's own sums (the bytes of an unbroken run), else from their mean (its values)."""
        if partial is None or partial["count"] == 0:
            return
        sums = partial["sums"]
        own = sums[rank] if len(sums) == world else sums.mean(0)
        self.sums, self.count = own.to(self.device, torch.float64), partial["count"]


def rewind(tr: Trainer, ckpts: Checkpoints, step: int, columns: list[str], rank: int,
           world: int) -> Meter:
    """``tr`` as it was at its checkpoint of ``step``, and the meter of that moment."""
    if not step:
        raise NonFiniteError("train.nonfinite: rewind has no checkpoint to go back to before the "
                             "first one (train.ckpt_every): stopped")
    state = read_checkpoint(ckpts.path(step))
    tr.load(state)
    meter = Meter(tr.device, step, columns)
    meter.restore(state.get("meter"), rank, world)
    return meter


def check_weights(tr: Trainer, step: int) -> None:
    """Raise unless every weight and optimizer moment is finite (a host sync, at saves only)."""
    moments = (t for s in tr.opt.state.values() for t in s.values() if torch.is_tensor(t))
    tensors = [*tr.params, *tr.ema.parameters(), *moments]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteError(f"the weights after training step {step} are not finite: stopped "
                             "before saving them; lower train.lr or raise train.grad_clip")


def save(tr: Trainer, ckpts: Checkpoints, meter: Meter, step: int, rank: int, world: int,
         bad: NonFiniteSteps) -> str:
    """Checkpoint ``step`` (every rank calls this at the same step, rank 0 writes): never a
    non-finite state, and no rank runs ahead of a checkpoint being written."""
    meter.check()
    check_weights(tr, step)
    partial = meter.partial(world)
    if rank == 0:
        ckpts.save(tr.state(step, partial, bad))
    dist.barrier()
    return str(ckpts.path(step))


# --- the run

def loss_title(cfg: Config) -> str:
    """The loss plot's title: the model and the methods it trains with."""
    return f"{cfg.model.name} + {registry.titles(cfg, 'no alignment')}: training loss"


def export(tr: Trainer, out: Path, steps: int, log: MetricsLog, run: Path, times: TimeLog) -> None:
    """``ema.pt`` (a plain SiT, no projector), this run's loss and FID curves and its times (up to
    ``steps``, whatever longer runs left in ``run``), the loss and FID plots."""
    cfg = tr.cfg
    atomic.save_torch(ema_export(cfg, tr.ema, steps), out / "ema.pt")
    log.write()
    fid_curve.mirror(run, out / "fid.csv", steps)
    times.mirror(out / "times.csv", steps)
    if rows := log.shown():
        write_loss_plot(rows, out / "loss.png", loss_title(cfg))
    write_fid_plot(fid_curve.read_rows(out / "fid.csv"), out / "fid.png",
                   f"{cfg.model.name}: FID during training ({cfg.train.eval_samples} samples)")


def checkpoint_bytes(cfg: Config) -> tuple[int, int]:
    """Bytes of (a step checkpoint, an EMA export: ema.pt or a snapshot): the tensors of the model
    and heads, built on the meta device (no memory, no time), and what torch.save adds to each."""
    with torch.device("meta"):
        model = build_model(cfg, space.latent_shape(cfg)[-1])
        heads = build_heads(model, cfg)

    def weight(tensors) -> tuple[int, int]:
        tensors = list(tensors)
        return sum(t.numel() * t.element_size() for t in tensors), len(tensors)

    sit, sit_n = weight(model.state_dict().values())
    head, head_n = weight(heads.state_dict().values())
    trained, trained_n = weight(p for p in [*model.parameters(), *heads.parameters()]
                                if p.requires_grad)
    ema = sit + sit_n * space.TENSOR_OVERHEAD + 2048  # and the export's few small entries
    # a step checkpoint: model, EMA, heads, and per trained tensor AdamW's moments and step count
    extra, extra_n = head + 2 * trained + 4 * trained_n, head_n + 3 * trained_n
    return 2 * ema + extra + extra_n * space.TENSOR_OVERHEAD, ema


def preflight(cfg: Config, latents: str | Path, out: Path) -> list[space.Need]:
    """What this run will write: the checkpoints it does not have yet, the EMA export (and DVC's
    copy of it, where DVC copies), and the node-local copy of the store unless one is ready."""
    tc, store = cfg.train, ShardedStore(pointed_store(latents))
    run = Checkpoints(out / "checkpoints", signature(cfg, store.attrs["signature"]))
    have = sum(run.path(step).stat().st_size for step in run.steps())
    step, ema = checkpoint_bytes(cfg)
    needs = space.train_needs(cfg, out, step, ema, have) + space.dvc_share({out: ema})
    if tc.read_from == "copy":
        root = latent_copy.copy_root(tc.copy_dir)
        with (contextlib.suppress(OSError),  # an unwritable folder: training reads the store
              latent_copy.LatentCopy(store, root, registry.needs_images(cfg)) as ready):
            if ready.check() is not None:
                needs.append(space.copy_need(latent_copy.nbytes(ready.arrays), root))
    return needs


def warn_reading_the_store(cfg: Config, data: StepBatches,
                           log: Callable[[str], None] = print) -> None:
    """Where the node-local copy could not be made: how many readers the store needs per GPU."""
    rate, need = read_rate(data), cost.gpu_need(cfg)
    log(f"WARNING: training reads the zarr store itself: {rate:.0f} latents/s per reader "
        f"here, and one {PEAK_TFLOPS['H100']:.0f}-TFLOP/s GPU at 50% MFU needs "
        f"{need:.0f}/s for {cfg.model.name}: set train.workers to at least "
        f"{math.ceil(need / rate)} per GPU, or train.copy_dir to a disk with room")


def train(cfg: Config, latents: str | Path, out: str | Path,
          progress: Progress | None = None) -> dict:
    """Train to ``cfg.train.steps`` (resuming from ``out/checkpoints``, or taking the checkpoint
    at that step); returns a summary.

    Raises :class:`Stopped` on SIGTERM or SIGINT once the step in progress is saved, and
    :class:`NonFiniteError` at a non-finite step, which is never saved."""
    rank, world = dist.init()
    is_rank0 = rank == 0  # writes the logs, prints, reports progress
    tc, out = cfg.train, Path(out)
    device = dist.device(tc.device, rank)
    dist.deterministic(tc.deterministic)

    if is_rank0:
        space.ensure("train", preflight(cfg, latents, out))

    # --- data: batches of the node-local copy of the store, read ahead by tc.workers processes
    data = open_batches(cfg, latents, rank, world, images_for=[
        f"{m.name}.enabled" for m in registry.active(cfg) if m.needs_images(cfg)])
    if tc.read_from == "copy" and data.copy is None and is_rank0:
        warn_reading_the_store(cfg, data)
    if family(cfg.model.name) == "sit" and int(data.labels.max()) >= cfg.model.num_classes:
        raise ValueError(f"the dataset has {int(data.labels.max()) + 1} classes but "
                         f"model.num_classes is {cfg.model.num_classes}")

    # --- model, optimizer and resume
    tr = build_trainer(cfg, data.shape, device, world, data.empty_context)
    ckpts = Checkpoints(out / "checkpoints", signature(cfg, data.signature), tc.keep_checkpoints)
    # rank 0 quarantines and repoints; all pick one file, at or below tc.steps
    state = ckpts.load(tc.steps, repair=is_rank0)
    start = state["step"] if state else 0
    if state:
        tr.load(state)
    resumed_meter = state.get("meter") if state else None
    bad_before = state.get("nonfinite_steps", []) if state else []
    attempts_before = state.get("attempts", {}) if state else {}
    del state
    columns = ["step", *tr.names, "grad_norm"]
    log = None
    saved = max([start, *ckpts.steps()])  # the line's rows reach its newest checkpoint
    skip_log = None
    if is_rank0:
        log = MetricsLog(ckpts.folder / "metrics.csv", out / "metrics.csv", columns, tc.steps,
                         saved)
        if tc.nonfinite != "stop" or (ckpts.folder / "nonfinite.csv").exists():
            skip_log = MetricsLog(ckpts.folder / "nonfinite.csv", out / "nonfinite.csv", columns,
                                  tc.steps, saved)
    bad = NonFiniteSteps(cfg, bad_before, attempts_before, skip_log)
    # not in the run folder: wall times differ between runs of the same bytes
    # (sra2.train.checkpoints)
    times = TimeLog(out / "timing" / f"{ckpts.folder.name}.csv", start, saved, tc.global_batch,
                    world, device.type, write=is_rank0)
    n_params = sum(p.numel() for p in tr.model.parameters())
    n_proj = sum(p.numel() for p in tr.heads.parameters())
    if is_rank0:
        print(f"train: {cfg.model.name} {n_params / 1e6:.2f}M parameters, heads "
              f"{n_proj / 1e6:.2f}M ({', '.join(tr.heads) or 'none'}), {len(data)} latents "
              f"{data.shape}, steps {start} -> {tc.steps}, {world} process(es) x {tr.micro} "
              f"micro-batch(es)")

    # --- the loop: a step; then, where due, a metrics row, a checkpoint, a stop
    meter, fid = Meter(device, start, columns), {}
    last_ckpt = str(ckpts.path(start)) if start else ""
    meter.restore(resumed_meter, rank, world)
    clock, consensus = SaveClock(tc.ckpt_minutes), Consensus(world)
    step, saved_step = start, start
    batches = iter(stream(data, start, tc.steps, tc.workers, device))
    bar = tqdm(total=tc.steps, initial=start, unit="step", desc="train", disable=not is_rank0)
    with StopSignals() as signals, bar:
        while step < tc.steps:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            drawn = draws(cfg, step, data.shape, rank, world, device,
                          bad.attempts.get(step, 0))
            weights = term_weights(tr, step, len(data))
            values, stepped = train_step(tr, step_inputs(tr, batch, drawn), weights)
            done = step + 1
            if stepped:
                meter.add(values)
            else:
                line = bad.record(done, columns, values)
                if is_rank0:
                    bar.write(f"WARNING: {line}")
                    if progress:
                        progress(done, tc.steps, {"nonfinite": line})
                if tc.nonfinite == "rewind":  # back to the last checkpoint, other draws since
                    bad.retake(saved_step, done)
                    meter = rewind(tr, ckpts, saved_step, columns, rank, world)
                    if is_rank0:
                        log.drop_after(saved_step)
                    del batches  # its readers end with it
                    batches = iter(stream(data, saved_step, tc.steps, tc.workers, device))
                    step = saved_step
                    bar.n = step
                    bar.refresh()
                    continue
                meter.skip()
            bar.update(1)
            stop, timed = consensus(signals.received > 0, is_rank0 and clock.due())
            row = None
            if done % tc.log_every == 0 and meter.count:  # a row of skipped steps only: none
                row, rate = meter.row(done, tc.global_batch)
                if is_rank0:  # before the checkpoint: rows after it are dropped on resume
                    log.append(row)
            evaluating = tc.eval_every and done % tc.eval_every == 0
            # under rewind an evaluation is a checkpoint too: a rewind never abandons one
            saving = (done % tc.ckpt_every == 0 or done == tc.steps or stop or timed
                      or (evaluating and tc.nonfinite == "rewind"))
            if saving:
                last_ckpt = save(tr, ckpts, meter, done, rank, world, bad)
                saved_step = done
                clock.reset()
            if saving or evaluating:
                times.record(done)
            if evaluating:  # after the save: a crash here costs nothing
                with times.paused():
                    scored = fid_curve.evaluate_step(cfg, tr.ema, done, ckpts.folder, latents,
                                                     out / "fid.csv")
                if scored:
                    fid = {"fid": scored["fid"], "fid_step": done, "preview": scored["grid"]}
            if row is not None and is_rank0:
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
                if progress:
                    progress(done, tc.steps, {**row, "images_per_s": round(rate, 1),
                                              "checkpoint": last_ckpt, **fid})
            if stop and done < tc.steps:
                consensus.close()
                raise stopped(signals, done, last_ckpt)
            step = done
    consensus.close()

    # --- the last row off the cadence, from the sums the final checkpoint keeps (a checkpoint
    # written before it kept them has none: its row is in the log), then the export
    meter.check()
    tail, rate = {}, 0.0
    if tc.steps % tc.log_every and meter.count:
        tail, rate = meter.row(tc.steps, tc.global_batch)
    if is_rank0:
        log.tail = tail or None
        export(tr, out, tc.steps, log, ckpts.folder, times)
        if progress and (tail or start == tc.steps):  # the last row, or nothing left to do
            speed = {"images_per_s": round(rate, 1)} if start < tc.steps else {}
            progress(tc.steps, tc.steps, {**tail, **speed, "checkpoint": last_ckpt, **fid})
    final = (log.shown() or [{}])[-1] if is_rank0 else {}
    action = "skipped" if tc.nonfinite == "skip" else "rewound"
    counted = {f"{action}_steps": len(bad.steps)} if tc.nonfinite != "stop" else {}
    return {"steps": tc.steps, "parameters": n_params, "projector_parameters": n_proj,
            "processes": world, "micro_batches": tr.micro, **counted,
            **{k: float(v) for k, v in final.items() if k != "step"}}
