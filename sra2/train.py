"""Training: SiT + the SRA 2 alignment loss on cached latents, with EMA, checkpoints and resume.

Every random draw of step s (batch order, VAE posterior noise, interpolation noise, times, label
dropout) comes from generators seeded by (seed, s) for the whole global batch, so a run resumed
from a checkpoint, or run on another number of GPUs, takes the steps an unbroken run would take.
Each process splits its part of the batch into micro-batches of ``train.batch_per_gpu`` whose
gradients add up to the step's; per-step work stays on the device (one host sync per log row).
"""

from __future__ import annotations

import copy
import csv
import io
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sra2 import atomic, dist
from sra2.align import projector_for
from sra2.config import Config
from sra2.latents import StepBatches, step_loader
from sra2.models import SiT, build
from sra2.plots import write_loss_plot
from sra2.store import digest
from sra2.transport import training_loss

Progress = Callable[[int, int, dict], None]
LOG_COLUMNS = ["step", "loss", "loss_velocity", "loss_align", "grad_norm"]


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient: the run stops before it is saved."""


class Objective(nn.Module):
    """SiT and its projector as one module, so that DDP sees every trained parameter."""

    def __init__(self, model: SiT, projector: nn.Module | None, cfg: Config):
        super().__init__()
        self.model, self.projector, self.align = model, projector, cfg.align

    def forward(self, x1, y, t, x0, align_target):
        losses = training_loss(self.model, self.projector, self.align, x1, y, t, x0, align_target)
        return torch.stack([losses.total, losses.velocity, losses.align])


def signature(cfg: Config, data_signature: dict) -> dict:
    """What a run's numbers depend on (not its length, logging, speed knobs or process count):
    its checkpoint folder."""
    fixed = cfg.train.model_dump(exclude={"steps", "ckpt_every", "log_every", "device", "workers",
                                          "compile", "batch_per_gpu"})
    return {"model": cfg.model.model_dump(), "align": cfg.align.model_dump(), "train": fixed,
            "latents": data_signature}


class Checkpoints:
    """``<folder>/<run>/step-NNNNNNN.pt`` and a ``latest`` pointer, each written atomically.

    ``run`` is a hash of the signature: other settings start a new run beside the old one
    instead of resuming it or overwriting it, and going back to old settings resumes the old run.
    """

    def __init__(self, folder: str | Path, signature: dict):
        self.folder = Path(folder) / digest(signature)
        self.signature = signature

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        return self.folder / pointer.read_text().strip() if pointer.exists() else None

    def save(self, state: dict) -> Path:
        if not (self.folder / "signature.json").exists():
            atomic.write_json(self.folder / "signature.json", self.signature)
        path = self.folder / f"step-{state['step']:07d}.pt"
        atomic.save_torch(state, path)
        atomic.write_text(self.folder / "latest", path.name + "\n")
        return path

    def load(self) -> dict | None:
        path = self.latest()
        return None if path is None else torch.load(path, map_location="cpu", weights_only=True)


class MetricsLog:
    """Per-step rows in a CSV (what ``dvc plots show`` draws), rewritten atomically; on resume,
    rows after the checkpoint's step are dropped so the file matches an unbroken run."""

    def __init__(self, path: str | Path, resume_step: int):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists() and resume_step > 0:
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic.write_text(self.path, buf.getvalue())


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def draws(cfg: Config, step: int, shape: tuple, rank: int, world: int, device: torch.device):
    """Every random tensor of one step, drawn on the device for the whole global batch from a
    generator seeded by (seed, step), then sliced to this rank: the run does not depend on the
    number of processes."""
    g = torch.Generator(device).manual_seed(step_seed(cfg.train.seed, step))
    n = cfg.train.global_batch
    eps = torch.randn((n, *shape), generator=g, device=device)
    x0 = torch.randn((n, *shape), generator=g, device=device)
    t = torch.rand(n, generator=g, device=device)
    drop = torch.rand(n, generator=g, device=device) < cfg.model.class_dropout
    part = slice(rank * n // world, (rank + 1) * n // world)
    return eps[part], x0[part], t[part], drop[part]


@dataclass
class Trainer:
    """Everything a run is made of; built once, then stepped."""

    cfg: Config
    model: SiT
    ema: SiT
    projector: nn.Module | None
    runner: nn.Module  # the objective, wrapped in DDP and torch.compile as configured
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    micro: int  # micro-batches per step on this process
    device: torch.device

    def state(self, step: int) -> dict:
        return {"step": step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "projector": self.projector.state_dict() if self.projector is not None else None}

    def load(self, state: dict) -> None:
        for name in ("model", "ema", "opt", "projector"):
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])


def build_model(cfg: Config, latent_side: int) -> SiT:
    return build(cfg.model.name, input_size=latent_side, num_classes=cfg.model.num_classes,
                 learn_sigma=cfg.model.learn_sigma)


def micro_batches(cfg: Config, world: int) -> int:
    per_rank = cfg.train.global_batch // world
    size = cfg.train.batch_per_gpu or per_rank
    if cfg.train.global_batch % world or per_rank % size:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) must split into "
                         f"{world} process(es) x micro-batches of train.batch_per_gpu ({size})")
    return per_rank // size


def build_trainer(cfg: Config, latent_shape: tuple, device: torch.device, world: int) -> Trainer:
    tc = cfg.train
    torch.manual_seed(tc.seed)  # weight init only; every later draw uses its own generator
    model = build_model(cfg, latent_shape[-1]).to(device)
    projector = projector_for(model, cfg.align).to(device) if cfg.align.enabled else None
    ema = copy.deepcopy(model).requires_grad_(False)
    runner: nn.Module = Objective(model, projector, cfg)
    params = [p for p in runner.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            fused=cuda or None, foreach=None if cuda else True)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if cuda else None)
    if tc.compile:
        runner = torch.compile(runner)
    return Trainer(cfg, model, ema, projector, runner, opt, params, micro_batches(cfg, world), device)


def step_inputs(cfg: Config, batch: dict, noise: tuple, micro: int):
    """The model inputs of each micro-batch: (x1, labels, t, x0, alignment target)."""
    eps, x0, t, drop = noise
    mean, std = batch["mean"], batch["std"]
    x1 = (mean + std * eps) * cfg.vae.scale
    target = x1 if cfg.align.target == "sample" else mean * cfg.vae.scale
    y = torch.where(drop, torch.full_like(batch["labels"], cfg.model.num_classes), batch["labels"])
    return zip(*(part.chunk(micro) for part in (x1, y, t, x0, target)))


def train_step(tr: Trainer, inputs) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns [loss, velocity, align, grad norm]
    on the device. Gradients of all but the last micro-batch stay local (DDP no_sync)."""
    tr.opt.zero_grad(set_to_none=True)
    losses = torch.zeros(3, device=tr.device)
    for i, args in enumerate(inputs):
        local = i < tr.micro - 1 and hasattr(tr.runner, "no_sync")
        with tr.runner.no_sync() if local else nullcontext():
            with dist.autocast(tr.device, tr.cfg.train.precision):
                parts = tr.runner(*args)
            (parts[0] / tr.micro).backward()
        losses += parts.detach() / tr.micro
    grad_norm = nn.utils.clip_grad_norm_(tr.params, tr.cfg.train.grad_clip, foreach=True)
    tr.opt.step()
    with torch.no_grad():
        ema, live = list(tr.ema.parameters()), list(tr.model.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - tr.cfg.train.ema_decay)
    return torch.cat([losses, grad_norm.reshape(1).float()])


class Meter:
    """Sums of step values on the device, and the first non-finite step, read once per row."""

    def __init__(self, device: torch.device, start: int):
        self.device = device
        self.step = torch.full((1,), float(start), dtype=torch.float64, device=device)
        self.first_bad = torch.full((5,), -1.0, dtype=torch.float64, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.count, self.tick = 0, time.perf_counter()

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        self.sums += values
        self.count += 1
        self.step += 1  # counted on the device: no host-to-device copy per step
        new = ~torch.isfinite(values).all() & (self.first_bad[0] < 0)
        self.first_bad = torch.where(new, torch.cat([self.step, values]), self.first_bad)

    def check(self) -> None:
        """Raise if any step since the start was non-finite (a host sync)."""
        bad = self.first_bad.tolist()
        if bad[0] >= 0:
            names = ", ".join(f"{k}={v}" for k, v in zip(LOG_COLUMNS[1:], bad[1:]))
            raise NonFiniteError(f"training step {int(bad[0])} is not finite ({names}): stopped "
                                 "before saving it; lower train.lr or raise train.grad_clip")

    def row(self, done: int, global_batch: int) -> tuple[dict, float]:
        """The mean of the values since the last row over all processes, and images/s."""
        self.check()
        means = dist.mean_across_ranks(self.sums / self.count)
        rate = self.count * global_batch / (time.perf_counter() - self.tick)
        self._reset()
        return dict(zip(LOG_COLUMNS, [done, *np.round(means, 6).tolist()])), rate


def export(tr: Trainer, out: Path, steps: int, log: MetricsLog) -> None:
    """``ema.pt`` (a plain SiT, no projector) and the loss curve."""
    cfg = tr.cfg
    atomic.save_torch({"name": cfg.model.name, "model_config": cfg.model.model_dump(),
                       "step": steps, "ema": tr.ema.state_dict()}, out / "ema.pt")
    if log.rows:
        kind = "SRA 2" if cfg.align.enabled else "no alignment"
        write_loss_plot(log.rows, out / "loss.png", f"{cfg.model.name} + {kind}: training loss")


def train(cfg: Config, latents: str | Path, out: str | Path, progress: Progress | None = None) -> dict:
    """Train to ``cfg.train.steps`` (resuming from ``out/checkpoints``); returns a summary."""
    rank, world = dist.init()
    tc, out = cfg.train, Path(out)
    device = dist.device(tc.device, rank)

    # --- data: batches stream from the store, read ahead by tc.workers processes
    data = StepBatches(latents, tc.global_batch, tc.seed, rank, world)
    if int(data.labels.max()) >= cfg.model.num_classes:
        raise ValueError(f"the dataset has {int(data.labels.max()) + 1} classes but "
                         f"model.num_classes is {cfg.model.num_classes}")

    # --- model, optimizer and resume
    tr = build_trainer(cfg, data.shape, device, world)
    ckpts = Checkpoints(out / "checkpoints", signature(cfg, data.signature))
    state = ckpts.load()
    start = state["step"] if state else 0
    if start > tc.steps:
        raise ValueError(f"train.steps is {tc.steps} but {ckpts.latest()} is already at step "
                         f"{start}: raise train.steps, or sample from that checkpoint")
    if state:
        tr.load(state)
    del state
    log = MetricsLog(out / "metrics.csv", start) if rank == 0 else None
    n_params = sum(p.numel() for p in tr.model.parameters())
    n_proj = sum(p.numel() for p in tr.projector.parameters()) if tr.projector is not None else 0
    if rank == 0:
        print(f"train: {cfg.model.name} {n_params / 1e6:.2f}M parameters, projector "
              f"{n_proj / 1e6:.2f}M, {len(data)} latents {data.shape}, steps {start} -> {tc.steps}, "
              f"{world} process(es) x {tr.micro} micro-batch(es)")

    # --- the loop
    meter, last_ckpt = Meter(device, start), str(ckpts.latest() or "")
    loader = step_loader(data, start, tc.steps, tc.workers, device.type == "cuda") if start < tc.steps else []
    bar = tqdm(total=tc.steps, initial=start, unit="step", desc="train", disable=rank != 0)
    for step, batch in zip(range(start, tc.steps), loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        noise = draws(cfg, step, data.shape, rank, world, device)
        meter.add(train_step(tr, step_inputs(cfg, batch, noise, tr.micro)))
        done = step + 1
        bar.update(1)
        if done % tc.ckpt_every == 0 or done == tc.steps:
            meter.check()  # never save a non-finite state
            if rank == 0:
                last_ckpt = str(ckpts.save(tr.state(done)))
            dist.barrier()  # no rank runs ahead of a checkpoint being written
        if done % tc.log_every == 0 or done == tc.steps:
            row, rate = meter.row(done, tc.global_batch)
            if log is not None:
                log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
                if progress:
                    progress(done, tc.steps, {**row, "images_per_s": round(rate, 1),
                                              "checkpoint": last_ckpt})
    bar.close()

    # --- export
    meter.check()
    if rank == 0:
        export(tr, out, tc.steps, log)
        if progress and start == tc.steps:  # nothing left to do: say so
            progress(tc.steps, tc.steps, {"checkpoint": last_ckpt})
    final = log.rows[-1] if log is not None and log.rows else {}
    return {"steps": tc.steps, "parameters": n_params, "projector_parameters": n_proj,
            "processes": world, "micro_batches": tr.micro,
            **{k: float(v) for k, v in final.items() if k != "step"}}
