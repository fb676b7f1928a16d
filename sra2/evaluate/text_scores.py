"""How well text-to-image samples show their captions: CLIP score and PickScore.

Both embed the image and its caption with a CLIP model and take the cosine of the two unit
vectors. CLIP score (torchmetrics' convention, CLIP ViT-L/14): max(100 cos, 0). PickScore
(``yuvalkirstain/PickScore_v1``, a CLIP-H tuned on human preferences, read through
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s processor): the model's own logit scale (exp) x cos.
A run's number is the mean over its samples. Models load by hub id or local folder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sra2.config.params import Config
from sra2.model.text import pretrained


@torch.no_grad()
def cosines(images: np.ndarray, captions: Sequence[str], model: tuple[str, str],
            processor: tuple[str, str], batch_size: int,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, float]:
    """The cosine of each uint8 NHWC image with its caption, and the model's exp(logit scale);
    ``model`` and ``processor``: (params key, hub id or folder)."""
    from transformers import CLIPModel, CLIPProcessor

    processor = pretrained(CLIPProcessor, *processor)
    model = pretrained(CLIPModel, *model).to(device).eval()
    found = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        inputs = processor(text=list(captions[part]), images=list(np.array(images[part])),
                           padding=True, truncation=True, max_length=77,
                           return_tensors="pt").to(device)
        out = model(**inputs)  # the projected embeddings of both towers
        found.append(torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds,
                                                           dim=-1).cpu())
    return torch.cat(found).double().numpy(), float(model.logit_scale.exp())


def caption_scores(cfg: Config, images: np.ndarray, captions: Sequence[str],
                   device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Per sample: ``clip_score`` and ``pickscore``."""
    ec = cfg.evaluate
    clip, _ = cosines(images, captions, ("evaluate.clip", ec.clip), ("evaluate.clip", ec.clip),
                      ec.batch_size, device)
    pick, scale = cosines(images, captions, ("evaluate.pickscore", ec.pickscore),
                          ("evaluate.pickscore_processor", ec.pickscore_processor),
                          ec.batch_size, device)
    return {"clip_score": np.maximum(100 * clip, 0), "pickscore": scale * pick}
