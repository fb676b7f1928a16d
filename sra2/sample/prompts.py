"""The captions a text-to-image run samples for, and their contexts.

Sample i of every set draws for val image i mod (val images) one of its captions, uniformly from
(seed, i) (REPA samples one random caption of each val image, in order; U-ViT 30K of them): with
sample.num_samples at most the val split's size, every image of a set is of another val image.
The captions are stored beside the samples; the contexts come from the text encoder of the
training data.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sra2.config.params import Config
from sra2.data.captions import listing
from sra2.data.store import digest
from sra2.model import text as text_lib


def picks(seed: int, total: int, images: int, per_image: int) -> np.ndarray:
    """Caption index (image x per_image + caption) of samples 0..total-1: draw i depends on
    (seed, i) alone (a longer run draws the same first ones)."""
    caption = np.random.default_rng([seed, 0x707274]).integers(0, per_image, total)
    return np.arange(total) % images * per_image + caption


class Prompts:
    """The val split's captions and the text encoder that turns them into contexts."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        self.cfg, self.device, split = cfg, device, listing(cfg, "val")
        self.captions = [c for image in split.captions for c in image]
        self.images = len(split.captions)

    @functools.cached_property
    def encoder(self) -> text_lib.TextEncoder:
        """Loaded when first needed: a stage whose samples are kept needs their signature only."""
        return text_lib.load_text_encoder(self.cfg.text.source, self.cfg.text.max_length,
                                          self.device)

    def signature(self) -> dict:
        """What the samples' conditions depend on: the encoder and the val captions."""
        tc = self.cfg.text
        weights = text_lib.weights_digest(tc.source)
        return {"text": tc.model_dump(exclude={"dtype"}), "captions": digest({"c": self.captions}),
                **({"text_weights": weights} if weights else {})}

    def fixed(self, seed: int, total: int) -> dict[str, np.ndarray]:
        """The stored conditions of ``total`` samples: each one's caption index and caption."""
        found = picks(seed, total, self.images, self.cfg.text.captions_per_image)
        return {"labels": found.astype(np.int64),
                "captions": np.asarray([self.captions[i] for i in found],
                                       dtype=np.dtypes.StringDType())}

    def contexts(self, captions) -> torch.Tensor:
        """The contexts of ``captions``, rounded to the stored dtype as training saw them."""
        dtype = getattr(torch, self.cfg.text.dtype)
        return self.encoder(list(captions)).to(dtype).float()

    @functools.cached_property
    def empty(self) -> torch.Tensor:
        return self.contexts([""])

    def null(self, n: int) -> torch.Tensor:
        """The empty caption's context, ``n`` times: the unconditional half of guidance."""
        return self.empty.expand(n, -1, -1)
