"""Caption features: a CLIP text encoder's last hidden state, one vector per token of the caption
padded to ``max_length`` tokens (U-ViT's FrozenCLIPEmbedder, which REPA's text-to-image run reads:
CLIP ViT-L/14's text tower, 77 tokens x 768), the empty caption's being the unconditional context.

The encoder is loaded like the VAE, by hub id (``openai/clip-vit-large-patch14``) or local folder
(a CLIP tokenizer and a ``CLIPTextModel``). Offline demos write a small one
(:func:`write_demo_encoder`): a tokenizer whose vocabulary holds the demo's words whole, and a
CLIP text tower of ``data.demo.text``'s shape with seeded random weights, never trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sra2.runtime import atomic

DEMO_INFO = "demo.json"  # beside a demo encoder's files: what it is


@dataclass
class TextEncoder:
    tokenizer: object
    model: torch.nn.Module
    max_length: int

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(len(captions), max_length, width) float32 features, on the encoder's device."""
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")["input_ids"]
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device)).last_hidden_state.float()


def pretrained(kind, key: str, source: str, **kwargs):
    """``kind.from_pretrained(source)`` (a transformers class), without its progress bar (one per
    load, in every stage's log); an OSError naming ``key`` and ``source`` where it cannot."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        return kind.from_pretrained(source, **kwargs)
    except OSError as e:
        why = str(e).splitlines()[0]
        raise OSError(f"{key} {source!r}: cannot load a {kind.__name__} ({why}); give a hub id "
                      "reachable from here or a local folder (save_pretrained's layout)") from None


def load_text_encoder(source: str, max_length: int,
                      device: torch.device | str = "cpu") -> TextEncoder:
    """The tokenizer and text tower at ``source`` (hub id or folder), in eval mode, fp32."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = pretrained(CLIPTokenizer, "text.source", source)
    model = pretrained(CLIPTextModel, "text.source", source, torch_dtype=torch.float32)
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"text.max_length ({max_length}) exceeds what {source} encodes "
                         f"({model.config.max_position_embeddings} tokens)")
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), max_length)


def describe(source: str) -> str:
    """What the model at ``source`` is, for captions of outputs: a demo's says so."""
    info = Path(source) / DEMO_INFO
    if info.is_file():
        return json.loads(info.read_text())["description"]
    return source


def weights_digest(source: str) -> str | None:
    """The digest of a local encoder's files (a folder rewritten under the same name is another
    encoder); None for a hub id."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# --- the demo's encoder -------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols: the lowest-ranked adjacent pair merged first."""
    while len(word) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    return word


def demo_vocabulary_files(words: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP tokenizer's vocab and merges that spell every printable ASCII word letter by letter
    and hold each of ``words`` as one token: each word's missing merges are appended in turn, and
    a merge ranked after all others never changes a word that the earlier ones join already."""
    letters = [chr(c) for c in range(33, 127)]
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while len(parts := _bpe([*w[:-1], w[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
    tokens = [*letters, *(c + "</w>" for c in letters), *(a + b for a, b in ranks), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def _demo_tokenizer(folder: Path, words: Sequence[str], max_length: int):
    """A CLIP tokenizer holding ``words`` whole, its files written in ``folder``; with the ids of
    its vocabulary's size and its start, end and padding tokens (CLIP pads with the end token)."""
    from transformers import CLIPTokenizer

    vocab, merges = demo_vocabulary_files(words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=max_length)
    ids = {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
           "pad_token_id": vocab[EOS]}
    return tokenizer, ids


def _text_config(ids: dict, hidden_size: int, layers: int, heads: int, max_length: int) -> dict:
    return {**ids, "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "max_position_embeddings": max_length}


def _describe(tmp: Path, what: str, seed: int, words: Sequence[str]) -> None:
    description = f"{what}, RANDOM weights (seed {seed}), over the demo's {len(words)} words"
    (tmp / DEMO_INFO).write_text(json.dumps({"description": description}))


def write_demo_encoder(folder: str | Path, words: Sequence[str], hidden_size: int, layers: int,
                       heads: int, max_length: int, seed: int) -> None:
    """A CLIP tokenizer holding ``words`` whole and a seeded random CLIP text tower, saved at
    ``folder`` in save_pretrained's layout (what :func:`load_text_encoder` reads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with atomic.temporary_folder(folder) as tmp:
        tokenizer, ids = _demo_tokenizer(tmp, words, max_length)
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**_text_config(ids, hidden_size, layers, heads,
                                                            max_length))).eval()
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        _describe(tmp, f"demo text encoder: a CLIP text tower of width {hidden_size}, {layers} "
                       "layers", seed, words)


def write_demo_clip(folder: str | Path, words: Sequence[str], hidden_size: int, layers: int,
                    heads: int, image_size: int, seed: int) -> None:
    """A whole CLIP (text and image towers, width ``hidden_size``, images of ``image_size`` px in
    patches of 8) with seeded random weights and its processor, at ``folder``: what the CLIP score
    and PickScore load offline (their numbers then mean nothing)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    with atomic.temporary_folder(folder) as tmp:
        tokenizer, ids = _demo_tokenizer(tmp, words, 77)
        vision = {"hidden_size": hidden_size, "intermediate_size": 4 * hidden_size,
                  "num_hidden_layers": layers, "num_attention_heads": heads,
                  "image_size": image_size, "patch_size": 8}
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=_text_config(ids, hidden_size, layers, heads, 77),
                                     vision_config=vision, projection_dim=hidden_size)).eval()
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp)
        model.save_pretrained(tmp)
        _describe(tmp, f"demo CLIP of width {hidden_size}, {layers} layers", seed, words)
