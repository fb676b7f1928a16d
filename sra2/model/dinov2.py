"""REPA's target encoder: DINOv2 ViT-B/14 and the patch tokens it gives a training image.

The architecture is timm's port of DINOv2 (``vit_base_patch14_dinov2``: patch 14, width 768,
12 blocks of 12 heads with LayerScale, final LayerNorm, a class token), built for a grid of
``grid`` x ``grid`` patches, one per SiT token: 16 x 16 (224 px inputs) for SiT-*/2 at 256 px,
as REPA (which takes 224 * resolution // 256 px and a grid of 16 * resolution // 256). Weights
always come in the original checkpoint's format (the file ``torch.hub.load('facebookresearch/
dinov2', 'dinov2_vitb14')`` loads, position embedding for 518 px, a 37 x 37 grid) and go through
timm's conversion, which resamples the position embedding to the grid with
``resample_abs_pos_embed`` (bicubic, antialiased): what REPA does to the hub model after loading
it (REPA's code).

``repa.encoder`` names the weights: ``dinov2_vitb14`` (downloaded once into torch.hub's cache,
``$TORCH_HOME/hub/checkpoints``, the file the hub model loads), a local ``.pth`` (or
``.safetensors``) file of them (offline clusters), or ``random``: seeded weights of the same
format and architecture, for tests and offline demos only (their features mean nothing).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from sra2.config.params import Repa
from sra2.model import flops
from sra2.runtime import dist

# the files torch.hub's facebookresearch/dinov2 entry points load
HUB_WEIGHTS = {"dinov2_vitb14": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"}
ARCHITECTURE = "vit_base_patch14_dinov2"
ORIGINAL_SIZE = 518  # the checkpoints' position embedding: a 37 x 37 grid
PATCH, GRID, DIM = 14, 16, 768  # REPA at 256 px: 16 x 16 patches (224 px), one per SiT-*/2 token
RESOLUTION, TOKENS = PATCH * GRID, GRID * GRID
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as REPA normalises


def build(img_size: int = RESOLUTION) -> VisionTransformer:
    """The architecture with timm's initial weights (on the current default device)."""
    return timm.create_model(ARCHITECTURE, pretrained=False, img_size=img_size, num_classes=0)


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights in the original checkpoint's format (names, 518 px position embedding,
    ``mask_token``): for tests and offline demos only. Norm weights and LayerScale gammas are
    drawn around 1, everything else around 0, so that every block changes the tokens."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in build(ORIGINAL_SIZE).state_dict().items()}
    shapes["mask_token"] = torch.Size([1, DIM])
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        around_one = name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma"))
        out[name] = float(around_one) + 0.02 * torch.randn(shape, generator=g)
    return out


def original_weights(cfg: Repa) -> dict[str, torch.Tensor]:
    """The state dict ``cfg.encoder`` names, in the original DINOv2 format."""
    source = cfg.encoder
    if source == "random":
        return random_weights(cfg.encoder_seed)
    if source in HUB_WEIGHTS:
        try:
            return torch.hub.load_state_dict_from_url(HUB_WEIGHTS[source], map_location="cpu")
        except OSError as e:  # offline, and not in torch.hub's cache
            raise FileNotFoundError(
                f"repa.encoder: {source}: cannot download {HUB_WEIGHTS[source]} ({e}); put that "
                f"file in {torch.hub.get_dir()}/checkpoints or set repa.encoder to its path"
            ) from None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"repa.encoder: {source!r} is neither one of "
                                f"{sorted(HUB_WEIGHTS)}, 'random', nor a file of DINOv2 weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_encoder(cfg: Repa, device: torch.device | str = "cpu",
                 grid: int = GRID) -> VisionTransformer:
    """DINOv2 ViT-B/14 for ``grid`` x ``grid`` patches (14 * ``grid`` px inputs) with the weights
    ``cfg.encoder`` names, in eval mode, without gradients, on ``device``."""
    with torch.device("meta"):  # no time spent on initial weights that are replaced anyway
        model = build(PATCH * grid)
    # timm's conversion of the original names (drops mask_token) and the REPA resampling of the
    # position embedding to the model's grid; strict: a file of another model fails here
    model.load_state_dict(checkpoint_filter_fn(original_weights(cfg), model), strict=True,
                          assign=True)
    return model.eval().requires_grad_(False).to(device)


def describe(cfg: Repa) -> str:
    """What the encoder's weights are, in words for captions and logs."""
    if cfg.encoder == "random":
        return f"random-weight DINOv2 ViT-B/14 (seed {cfg.encoder_seed}; tests only)"
    return f"DINOv2 ViT-B/14 ({cfg.encoder})"


def preprocess(images: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, size, size) as REPA feeds DINOv2: / 255, ImageNet
    mean and std, then bicubic resize (normalise first, resize second), all in float32."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"DINOv2 takes uint8 (N, H, W, 3) images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).contiguous().float() / 255
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def features(encoder: VisionTransformer, images: torch.Tensor,
             with_cls: bool = False) -> torch.Tensor:
    """REPA's target: the final-LayerNorm patch tokens (DINOv2's ``x_norm_patchtokens``), float32
    (N, grid * grid, 768), of uint8 (N, H, W, 3) images of any size; with ``with_cls``, REG's:
    the class token (``x_norm_clstoken``) in front of them (N, 1 + grid * grid, 768). No
    gradients. The blocks run under bf16 autocast where :func:`sra2.runtime.dist.autocast` has it (a
    GPU), the input's normalisation outside it in float32 (fp16 normalisation gives NaNs: REPA issue
    46)."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        x = preprocess(images.to(device, non_blocking=True), encoder.patch_embed.img_size[0])
        with dist.autocast(device, "bf16"):
            tokens = encoder.forward_features(x)
    patches = tokens[:, encoder.num_prefix_tokens:]
    return (torch.cat([tokens[:, :1], patches], dim=1) if with_cls else patches).float()


def forward_flops(grid: int = GRID) -> int:
    """FLOPs of the encoder's forward for one image (counted on the meta device; ~46 G at 16 x 16
    patches)."""
    with torch.device("meta"):
        encoder, x = build(PATCH * grid), torch.zeros(1, 3, PATCH * grid, PATCH * grid)
    return flops.count_flops(encoder.forward_features, x)
