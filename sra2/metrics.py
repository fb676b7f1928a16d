"""FID and Inception Score with torch-fidelity (its TF-ported InceptionV3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sra2 import atomic
from sra2.data import load_cropped
from sra2.encode import rejects
from sra2.store import ShardedStore

EXTRACTOR = "inception-v3-compat"


class ArrayImages(Dataset):
    """uint8 NHWC images (an array or a zarr array) as the uint8 CHW tensors torch-fidelity reads."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i]).transpose(2, 0, 1).copy())


class CroppedFiles(Dataset):
    """Real images with the same ADM crop the encoder saw."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_cropped(self.paths[i], self.size).transpose(2, 0, 1).copy())


def write_random_inception(path: str | Path, seed: int) -> Path:
    """Save an InceptionV3 state_dict of torch-fidelity's architecture with seeded random weights
    (He-normal convolutions, so activations neither vanish nor explode through the depth)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the freshly initialised layers

    path = Path(path)
    blank = path.with_suffix(".blank")
    torch.save({}, blank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(blank))
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)
    blank.unlink()
    atomic.save_torch(net.state_dict(), path)
    return path


def inception_weights(choice: str, seed: int, scratch: Path) -> Path | None:
    """``random``: seeded weights written under ``scratch``; ``download``: None (torch-fidelity
    fetches the real ones); anything else: a local weights file, which must exist."""
    if choice == "random":
        return write_random_inception(scratch / "inception-random.pth", seed)
    if choice == "download":
        return None
    if not Path(choice).is_file():
        raise FileNotFoundError(f"evaluate.inception: no weights file at {choice!r}")
    return Path(choice)


def fid_and_is(fake: Dataset, real: Dataset, weights: str | Path | None, batch_size: int,
               device: torch.device) -> dict[str, float]:
    """FID(fake, real) and IS(fake); ``weights`` None lets torch-fidelity download the real ones."""
    import torch_fidelity

    result = torch_fidelity.calculate_metrics(
        input1=fake, input2=real, fid=True, isc=True, isc_splits=min(10, len(fake)),
        feature_extractor=EXTRACTOR, feature_extractor_weights_path=str(weights) if weights else None,
        batch_size=batch_size, cuda=device.type == "cuda", cache=False, verbose=False,
        save_cpu_ram=True)
    return {"fid": float(result["frechet_inception_distance"]),
            "inception_score": float(result["inception_score_mean"]),
            "inception_score_std": float(result["inception_score_std"])}


def real_files(latents: str | Path, root: str | Path, num: int | None, seed: int) -> list[Path]:
    """The encoded dataset's accepted files (rejects left out), a seeded subset of ``num``."""
    store = ShardedStore(latents)
    rejected = {r["index"] for r in rejects(store)}
    files = [f for i, f in enumerate(store.array("files")[:]) if i not in rejected]
    if num is not None and num < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), num, replace=False))
        files = [files[i] for i in pick]
    return [Path(root) / f for f in files]
