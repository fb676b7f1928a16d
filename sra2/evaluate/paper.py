"""The paper's published numbers, in one place: SRA 2 (arXiv 2601.17830, CVPR 2026), its Table 1
(the ablations), Table 3 (the methods compared) and the final FIDs.

Every FID here is FID-50K on ImageNet 256x256 against ADM's reference batch, with the SDE
Euler-Maruyama sampler (250 steps) and no classifier-free guidance, but the text-to-image table's
(MS-COCO, its own protocol: ``TABLES["t2i"].protocol``).

``TABLES`` holds the paper's tables that ``python -m flows.tables --table N`` queues and prints.
``TABLE1`` is the paper's ablation table: SiT-B/2 at 400K steps (global batch 256), each row the
SRA 2 recipe of ``sra2/config/presets/sit-b2.yaml`` (alignment after block 2, t in [0, 1],
smooth-L1, lambda 1, 5-layer projector) with the one change the row names, written as params.yaml
keys (``section.key``). ``python -m flows.tables`` queues the rows as DVC experiments and prints
them beside these numbers.

The t-range row: the paper's "t in [0, 0.5]" is read in this project's time (SiT's: t = 0 is
noise, t = 1 is data, sra2.config.params.Align), i.e. alignment on the noisier half only. The paper
does not say which end its t starts from; in REPA's reversed time the same row would be
``align.t_min: 0.5, align.t_max: 1.0``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sra2.methods import registry
from sra2.methods.method import Row


@dataclass(frozen=True)
class Table:
    number: str
    title: str  # the model and length its published numbers are at
    rows: tuple[Row, ...]
    # how its numbers are measured, and the numbers beside FID each row shows (metrics.json keys)
    protocol: str = "FID-50K, SDE 250 steps, no CFG"
    scores: tuple[str, ...] = ("inception_score",)

    @property
    def prefix(self) -> str:
        """Its experiments are named <prefix>-<row>."""
        return f"table{self.number}" if self.number.isdigit() else self.number


TABLE1_MODEL = "SiT-B/2"
TABLE1_STEPS = 400_000
TABLE1 = (
    Row("vanilla", "vanilla SiT-B/2 (no alignment)", {"align.enabled": False}, 33.02),
    Row("layer2", "SRA 2, block 2 (the recipe)", {"align.layer": 2}, 28.89),
    Row("layer6", "block 6", {"align.layer": 6}, 32.44),
    Row("layer8", "block 8", {"align.layer": 8}, 36.20),
    Row("t0-0.5", "t in [0, 0.5] only", {"align.t_min": 0.0, "align.t_max": 0.5}, 30.04),
    Row("cosine", "cosine loss", {"align.loss": "cosine"}, 29.30),
    Row("l1", "L1 loss", {"align.loss": "l1"}, 29.50),
    Row("l2", "L2 loss", {"align.loss": "l2"}, 29.40),
    Row("lambda0.1", "lambda 0.1", {"align.weight": 0.1}, 30.10),
    Row("mlp2", "2-layer projector (1M)", {"align.depth": 2}, 31.32),
)

# Table 3, the methods compared at one training length: SiT-B/2 at 400K steps, each method's own
# loss on the same latents, sampler and evaluator; the vanilla row, then the rows each registered
# method adds (sra2.methods, with the published numbers at that setting where there are any).
# Every row reads one store, encoded with the images REPA and REG need: the same latents for all.
SAME_STORE = {"encode.pixels": True}
TABLE3 = tuple(replace(row, changes={**SAME_STORE, **row.changes}) for row in (
    Row("vanilla", "vanilla SiT", {"align.enabled": False}, 33.02),
    *(row for m in registry.METHODS for row in m.rows.get("3", ()))))

# The paper's generalisation: MMDiT on MS-COCO (sra2/config/presets/mmdit-coco.yaml), vanilla and
# with SRA 2, FID and PickScore as the paper reports them
T2I_MODEL = "MMDiT-D24/2"
TABLE_T2I = (
    Row("vanilla", "vanilla MMDiT", {"align.enabled": False}, 5.08, {"pickscore": 20.54}),
    Row("sra2", "MMDiT + SRA 2", {"align.enabled": True}, 4.67, {"pickscore": 20.92}),
)

TABLES = {
    "1": Table("1", f"Table 1 of SRA 2 (ablations): {TABLE1_MODEL} at "
                    f"{TABLE1_STEPS // 1000}K steps", TABLE1),
    "3": Table("3", f"Table 3 of SRA 2 (methods and their cost): {TABLE1_MODEL} at "
                    f"{TABLE1_STEPS // 1000}K steps", TABLE3),
    "t2i": Table("t2i", f"SRA 2's text-to-image run: {T2I_MODEL} on MS-COCO 2014", TABLE_T2I,
                 "FID against the val images, REPA's protocol (40,192 samples, Euler ODE 50 "
                 "steps, CFG 1.5)", ("pickscore", "clip_score")),
}

# The headline results: (model, training steps) -> FID-50K without and with SRA 2
MAIN = {
    ("SiT-B/2", 400_000): {"vanilla": 33.0, "sra2": 28.9},
    ("SiT-L/2", 400_000): {"vanilla": 18.8, "sra2": 14.3},
    ("SiT-XL/2", 1_000_000): {"sra2": 8.2},
    ("SiT-XL/2", 4_000_000): {"sra2": 6.6},
    ("SiT-XL/2", 7_000_000): {"vanilla": 8.3},
}

# SiT-XL/2 + SRA 2 with classifier-free guidance (REPA's interval guidance): FID and IS
WITH_CFG = {"200 epochs": {"fid": 1.98, "inception_score": 284.5},
            "800 epochs": {"fid": 1.52, "inception_score": 316.2}}


def row(name: str, table: str = "1") -> Row:
    rows = TABLES[table].rows
    for r in rows:
        if r.name == name:
            return r
    raise KeyError(f"no Table {table} row {name!r}; rows are {[r.name for r in rows]}")
