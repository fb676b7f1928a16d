"""Training: SiT + the SRA 2 alignment loss on cached latents, with EMA, checkpoints and resume.

Every random draw of step s (batch order, VAE posterior noise, interpolation noise, times, label
dropout) comes from generators seeded by (seed, s) for the whole global batch, so a run resumed
from a checkpoint, or run on another number of GPUs, takes the steps an unbroken run would take.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sra2 import atomic, dist
from sra2.align import projector_for
from sra2.config import Config
from sra2.encode import rejects
from sra2.models import SiT, build
from sra2.plots import write_loss_plot
from sra2.store import ShardedStore, digest
from sra2.transport import training_loss

Progress = Callable[[int, int, dict], None]
LOG_COLUMNS = ["step", "loss", "loss_velocity", "loss_align", "grad_norm"]


class LatentData:
    """The encoded dataset in memory: posterior mean, std and labels of the accepted images."""

    def __init__(self, path: str | Path):
        store = ShardedStore(path)
        if not store.complete:
            raise RuntimeError(f"latent store {path} is incomplete ({len(store.done_shards())} of "
                               f"{store.num_shards} shards): run the encode stage to the end first")
        rejected = {r["index"] for r in rejects(store)}
        keep = np.array([i for i in range(store.num_items) if i not in rejected]) if rejected else slice(None)

        def load(name: str) -> torch.Tensor:  # one copy in memory at a time: ImageNet is ~42 GB
            return torch.from_numpy(store.array(name)[:][keep].astype(np.float32, copy=False))

        self.mean, self.std = load("mean"), load("std")
        self.labels = torch.from_numpy(store.array("labels")[:][keep])
        self.signature = store.attrs["signature"]

    def __len__(self) -> int:
        return len(self.labels)


def batch_indices(step: int, batch: int, n: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Indices of this rank's slice of global batch ``step``: epoch e visits a permutation drawn
    from (seed, e), so the order depends on the step only, not on restarts or world size."""
    per_rank = batch // world
    positions = np.arange(step * batch + rank * per_rank, step * batch + (rank + 1) * per_rank)
    epochs = positions // n
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(seed, int(e), n)[positions[sel] % n]
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class Objective(nn.Module):
    """SiT and its projector as one module, so that DDP sees every trained parameter."""

    def __init__(self, model: SiT, projector: nn.Module | None, cfg: Config):
        super().__init__()
        self.model, self.projector, self.align = model, projector, cfg.align

    def forward(self, x1, y, t, x0, align_target):
        losses = training_loss(self.model, self.projector, self.align, x1, y, t, x0, align_target)
        return losses.total, losses.velocity, losses.align


def signature(cfg: Config, data_signature: dict) -> dict:
    """What a run's numbers depend on (not its length or logging): its checkpoint folder."""
    fixed = cfg.train.model_dump(exclude={"steps", "ckpt_every", "log_every", "device"})
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
        return None if path is None else torch.load(path, map_location="cpu", weights_only=False)


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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def _draws(cfg: Config, step: int, shape, rank: int, world: int):
    """Every random tensor of one step, drawn for the whole global batch from a generator seeded
    by (seed, step), then sliced to this rank: the run does not depend on the number of GPUs."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.train.seed, step]).generate_state(1)[0]))
    n = cfg.train.global_batch
    draws = (torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g),
             torch.rand(n, generator=g), torch.rand(n, generator=g) < cfg.model.class_dropout)
    part = slice(rank * n // world, (rank + 1) * n // world)
    return tuple(d[part] for d in draws)


def _resume(ckpts: Checkpoints, steps: int, **parts) -> int:
    """Load the latest checkpoint of this run into ``parts``; returns its step (0 if none)."""
    state = ckpts.load()
    if state is None:
        return 0
    if state["step"] > steps:
        raise ValueError(f"train.steps is {steps} but {ckpts.latest()} is already at step "
                         f"{state['step']}: raise train.steps, or sample from that checkpoint")
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(state[name])
    return state["step"]


def build_model(cfg: Config, latent_side: int) -> SiT:
    return build(cfg.model.name, input_size=latent_side, num_classes=cfg.model.num_classes,
                 learn_sigma=cfg.model.learn_sigma)


def train(cfg: Config, latents: str | Path, out: str | Path, progress: Progress | None = None) -> dict:
    """Train to ``cfg.train.steps`` (resuming from ``out/checkpoints``); returns a summary."""
    rank, world = dist.init()
    tc = cfg.train
    if tc.global_batch % world:
        raise ValueError(f"train.global_batch ({tc.global_batch}) must divide by the {world} processes")
    device = dist.device(tc.device, rank)
    out = Path(out)
    data = LatentData(latents)
    if int(data.labels.max()) >= cfg.model.num_classes:
        raise ValueError(f"the dataset has {int(data.labels.max()) + 1} classes but "
                         f"model.num_classes is {cfg.model.num_classes}")
    shape = tuple(data.mean.shape[1:])
    torch.manual_seed(tc.seed)  # weight init only; every later draw uses its own generator
    model = build_model(cfg, shape[-1]).to(device)
    projector = projector_for(model, cfg.align).to(device) if cfg.align.enabled else None
    ema = copy.deepcopy(model).requires_grad_(False)
    objective = Objective(model, projector, cfg)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sig = signature(cfg, data.signature)
    ckpts = Checkpoints(out / "checkpoints", sig)
    start = _resume(ckpts, tc.steps, model=model, ema=ema, projector=projector, opt=opt)
    log = MetricsLog(out / "metrics.csv", start) if rank == 0 else None
    runner = objective
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    scale, null = cfg.vae.scale, cfg.model.num_classes
    n_params = sum(p.numel() for p in model.parameters())
    n_proj = sum(p.numel() for p in projector.parameters()) if projector is not None else 0
    if rank == 0:
        print(f"train: {cfg.model.name} {n_params / 1e6:.2f}M parameters, projector "
              f"{n_proj / 1e6:.2f}M, {len(data)} latents {shape}, steps {start} -> {tc.steps}")
    # loss sums stay on the device: no host sync per step, one per logged row
    sums, count, tick = torch.zeros(4, dtype=torch.float64, device=device), 0, time.perf_counter()
    bar = tqdm(total=tc.steps, initial=start, unit="step", desc="train", disable=rank != 0)
    for step in range(start, tc.steps):
        idx = torch.from_numpy(batch_indices(step, tc.global_batch, len(data), tc.seed, rank, world))
        eps, x0, t, drop = _draws(cfg, step, shape, rank, world)
        mean, std = data.mean[idx].to(device), data.std[idx].to(device)
        x1 = (mean + std * eps.to(device)) * scale
        target = x1 if cfg.align.target == "sample" else mean * scale
        y = torch.where(drop, torch.full_like(data.labels[idx], null), data.labels[idx]).to(device)
        with dist.autocast(device, tc.precision):
            total, velocity, aligned = runner(x1, y, t.to(device), x0.to(device), target)
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        ema_update(ema, model, tc.ema_decay)
        sums += torch.stack([total.detach(), velocity.detach(), aligned.detach(), grad_norm]).double()
        count += 1
        done = step + 1
        bar.update(1)
        if done % tc.log_every == 0 or done == tc.steps:
            means = dist.mean_across_ranks(sums / count)
            row = dict(zip(LOG_COLUMNS, [done, *np.round(means, 6).tolist()]))
            rate = count * tc.global_batch / (time.perf_counter() - tick)
            sums, count, tick = torch.zeros_like(sums), 0, time.perf_counter()
            if log is not None:
                log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
                if progress:
                    progress(done, tc.steps, {**row, "images_per_s": round(rate, 1)})
        if rank == 0 and (done % tc.ckpt_every == 0 or done == tc.steps):
            ckpts.save({"step": done, "model": model.state_dict(),
                        "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "projector": projector.state_dict() if projector is not None else None})
        if done % tc.ckpt_every == 0:
            dist.barrier()  # no rank runs ahead of a checkpoint being written
    bar.close()
    if rank == 0:
        export = {"name": cfg.model.name, "model_config": cfg.model.model_dump(),
                  "step": tc.steps, "ema": ema.state_dict()}
        atomic.save_torch(export, out / "ema.pt")
        if log.rows:
            kind = "SRA 2" if cfg.align.enabled else "no alignment"
            write_loss_plot(log.rows, out / "loss.png", f"{cfg.model.name} + {kind}: training loss")
    final = log.rows[-1] if log is not None and log.rows else {}
    return {"steps": tc.steps, "parameters": n_params, "projector_parameters": n_proj,
            **{k: float(v) for k, v in final.items() if k != "step"}}
