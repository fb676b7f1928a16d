"""FID and Inception Score with torch-fidelity (its TF-ported InceptionV3)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sra2 import atomic, dist
from sra2.config import Config
from sra2.data import load_cropped
from sra2.encode import rejects
from sra2.generate import read_npz_images
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


@functools.lru_cache(maxsize=2)
def _extractor(weights: str | None, cuda: bool):
    """torch-fidelity's InceptionV3, built once per weights file (fakes and reals share it)."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(EXTRACTOR, ["2048", "logits_unbiased"], cuda=cuda,
                                    verbose=False, feature_extractor_weights_path=weights)


def inception_features(images: Dataset, weights: str | Path | None, batch_size: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Pool features ("2048") and logits ("logits_unbiased") of torch-fidelity's InceptionV3;
    ``weights`` None lets torch-fidelity download the real ones."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = device.type == "cuda"
    extractor = _extractor(str(weights) if weights else None, cuda)
    return get_featuresdict_from_dataset(images, extractor, batch_size, cuda, save_cpu_ram=True,
                                         verbose=False)


def statistics(features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """FID statistics (mean and covariance of the pool features), in float64 as ADM stores them."""
    pool = features["2048"].double().numpy()
    return {"mu": pool.mean(axis=0), "sigma": np.cov(pool, rowvar=False)}


def load_reference(path: str | Path) -> dict[str, np.ndarray]:
    """``mu`` and ``sigma`` of a reference batch in ADM's format (VIRTUAL_imagenet256_labeled.npz)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluate.reference: no reference statistics at {str(path)!r}")
    with np.load(path) as npz:
        missing = {"mu", "sigma"} - set(npz.files)
        if missing:
            raise ValueError(f"evaluate.reference {str(path)!r} lacks {sorted(missing)}")
        return {"mu": npz["mu"].astype(np.float64), "sigma": npz["sigma"].astype(np.float64)}


def fid_and_is(fake: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """FID of the fake features against reference statistics, and the fakes' Inception Score,
    with torch-fidelity's formulas (IS: 10 splits, its default shuffle and seed)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    fid = fid_statistics_to_metric(statistics(fake), reference, verbose=False)
    isc = isc_features_to_metric(fake["logits_unbiased"], splits=min(10, len(fake["logits_unbiased"])))
    return {"fid": float(fid["frechet_inception_distance"]),
            "inception_score": float(isc["inception_score_mean"]),
            "inception_score_std": float(isc["inception_score_std"])}


def real_files(latents: str | Path, root: str | Path, num: int | None, seed: int) -> list[Path]:
    """The encoded dataset's accepted files (rejects left out), a seeded subset of ``num``."""
    store = ShardedStore(latents)
    rejected = {r["index"] for r in rejects(store)}
    files = [f for i, f in enumerate(store.array("files")[:]) if i not in rejected]
    if num is not None and num < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), num, replace=False))
        files = [files[i] for i in pick]
    return [Path(root) / f for f in files]


def evaluate(cfg: Config, samples: str | Path, latents: str | Path) -> dict:
    """FID and IS of the ADM ``.npz`` at ``samples``, against ``evaluate.reference`` statistics
    or against the real images of the encoded dataset at ``latents``."""
    ec = cfg.evaluate
    device = dist.device(ec.device)
    with tempfile.TemporaryDirectory() as scratch:
        weights = inception_weights(ec.inception, ec.inception_seed, Path(scratch))
        fake = inception_features(ArrayImages(read_npz_images(samples)), weights, ec.batch_size, device)
        if ec.reference:
            reference, against = load_reference(ec.reference), ec.reference
        else:
            real = CroppedFiles(real_files(latents, cfg.data.root, ec.num_real, ec.seed),
                                cfg.data.image_size)
            reference = statistics(inception_features(real, weights, ec.batch_size, device))
            against = f"{len(real)} real images of {cfg.data.root}"
    note = (f"RANDOM Inception weights (seed {ec.inception_seed}): not comparable to any paper"
            if ec.inception == "random" else "torch-fidelity InceptionV3 (TF-ported) weights")
    return {**fid_and_is(fake, reference), "num_samples": len(fake["2048"]),
            "fid_reference": against, "inception_weights": note, "preset": cfg.preset}
