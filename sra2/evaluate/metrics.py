"""FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them
(guided-diffusion ``evaluations/evaluator.py``), on torch-fidelity's port of the same InceptionV3.

Features of one image: the 2048 pool features (FID, precision and recall), the logits without
bias (Inception Score) and the spatial features of TF's ``mixed_6/conv`` (sFID). That TF layer is
the 1x1 branch of the third of the four 17x17 InceptionC blocks (TF mixed_4..mixed_7 are
Mixed_6b..Mixed_6e): torch-fidelity's weight conversion (utils/util_convert_inception_weights.py)
maps ``mixed_6/conv/conv2d_params`` and ``mixed_6/conv/batchnorm`` to ``Mixed_6d.branch1x1``. In
the TF graph a layer runs ``<name>/Conv2D``, ``<name>/batchnorm``, then the op named ``<name>``,
its ReLU, so ``mixed_6/conv:0`` is taken after the ReLU, as ``BasicConv2d`` returns it. ADM keeps
the first 7 channels of that NHWC tensor and flattens it in H, W, C order: 17 * 17 * 7 = 2023.
"""

from __future__ import annotations

import functools
import warnings
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy import linalg
from scipy.special import log_softmax
from torch.utils.data import Dataset

from sra2.config.params import Config
from sra2.data.captions import listing
from sra2.data.encode import rejects
from sra2.data.images import load_cropped
from sra2.data.store import ShardedStore
from sra2.runtime import atomic
from sra2.sample.outputs import DamagedFile, read_npz_images

EXTRACTOR = "inception-v3-compat"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv
IS_SPLIT_SIZE = 5000  # ADM: contiguous chunks of 5000 samples, no shuffle
NEAREST_K = 3  # ADM: the manifold of a set is the union of balls to each point's 3rd neighbour
DISTANCE_BLOCK = 2 ** 25  # pairwise distances held at once (float64: 256 MiB)
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")  # FID and sFID statistics of an ADM reference batch
AGREEMENT = 1e-4  # relative: the two routes of a Frechet distance

Statistics = tuple[np.ndarray, np.ndarray]  # mean and covariance


class ArrayImages(Dataset):
    """uint8 NHWC images (an array or a zarr array) as the uint8 CHW tensors torch-fidelity
    reads."""

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


# --- the formulas, on numpy arrays ------------------------------------------------------------

def statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance (N - 1 normalised, as np.cov) of [N, D] features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a singular product is handled below, as ADM does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def trace_sqrt(a: np.ndarray, b: np.ndarray) -> float:
    """tr (a b)^(1/2) of covariances a and b: the sum of the square roots of the eigenvalues of
    a^(1/2) b a^(1/2), which are those of a b, from two symmetric eigendecompositions (no complex
    arithmetic; several times faster than sqrtm at 2048 dimensions: bench/noise.py). Eigenvalues
    below zero are rounding around a null space: taken as zero."""
    w, u = np.linalg.eigh(a)
    root = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ b @ root), 0, None)).sum())


def adm_trace_sqrt(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """tr (a b)^(1/2) as ADM's evaluator takes it: scipy's sqrtm of the product, ``eps`` on both
    diagonals if the root is not finite, the real part if its imaginary diagonal is negligible."""
    covmean = _sqrtm(a @ b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(a)) * eps
        covmean = _sqrtm((a + offset) @ (b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: the square root of sigma1 @ sigma2 has an "
                             f"imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


class Frechet(NamedTuple):
    """A Frechet distance computed two ways (:func:`trace_sqrt` rooting sigma1, then sigma2: two
    independent decompositions of the same eigenvalues); where they disagree, also ADM's."""

    value: float
    check: float
    agree: bool
    adm: float | None = None  # ADM's sqrtm route on a disagreement (None: it has no real root)

    @property
    def reported(self) -> float:
        """The checked value; on a disagreement ADM's, where it has one."""
        return self.value if self.agree or self.adm is None else self.adm

    @property
    def warning(self) -> str | None:
        if self.agree:
            return None
        adm = "has no real root" if self.adm is None else f"gives {self.adm!r}"
        return (f"the two eigenvalue routes disagree ({self.value!r} rooting sigma1, "
                f"{self.check!r} rooting sigma2); ADM's sqrtm {adm}; reported "
                f"{self.reported!r}")


def frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> Frechet:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), checked: the two routes of
    :class:`Frechet` must agree to ``AGREEMENT`` of the distance (and 1e-4 absolute: FIDs are
    printed to 2 decimals); otherwise ADM's sqrtm decides the value where it has one."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Frechet distance of statistics of different sizes: mean {mu1.shape} vs "
                         f"{mu2.shape}, covariance {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    base = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2))
    value, check = base - 2 * trace_sqrt(sigma1, sigma2), base - 2 * trace_sqrt(sigma2, sigma1)
    if abs(value - check) <= AGREEMENT * max(abs(value), 1.0):
        return Frechet(value, check, True)
    try:
        return Frechet(value, check, False, base - 2 * adm_trace_sqrt(sigma1, sigma2))
    except ValueError:  # a complex root: not a covariance product (a damaged file)
        return Frechet(value, check, False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """The Frechet distance (:func:`frechet`): ADM's number where the routes disagree."""
    return frechet(mu1, sigma1, mu2, sigma2).reported


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over contiguous chunks of ``split_size`` rows (the last one may be shorter) of
    exp(mean over the chunk's rows of KL(p(y|x) || p(y))), p(y|x) the softmax of the logits,
    p(y) its mean over the chunk."""
    return float(np.mean([np.exp(_mean_kl_to_marginal(logits[i:i + split_size]))
                          for i in range(0, len(logits), split_size)]))


def _mean_kl_to_marginal(logits: np.ndarray) -> float:
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(axis=0))
    kl = np.where(p > 0, p * (log_p - log_marginal), 0.0)  # 0 log 0 = 0
    return float(kl.sum(axis=1).mean())


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 for every pair of rows, expanded as |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def _rows_per_block(columns: int, block: int) -> int:
    return max(1, block // max(1, columns))


def manifold_radii(features: torch.Tensor, k: int = NEAREST_K,
                   block: int = DISTANCE_BLOCK) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour in the set: the (k+1)-th smallest
    entry of its distance row, whose smallest is the row itself (duplicates count as neighbours)."""
    rows = _rows_per_block(len(features), block)
    return torch.cat([squared_distances(features[i:i + rows], features)
                      .kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), rows)])


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEAREST_K,
                     block: int = DISTANCE_BLOCK, device: torch.device = torch.device("cpu")
                     ) -> tuple[float, float]:
    """Precision: the share of samples inside at least one reference ball; recall: the share of
    reference points inside at least one sample ball; a ball reaches its centre's k-th nearest
    neighbour in its own set, boundary included. Distances in float64, ``block`` at a time."""
    if min(len(reference), len(samples)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} images in each set; got "
                         f"{len(samples)} samples and {len(reference)} reference images")
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)
    ref_radii, fake_radii = manifold_radii(ref, k, block), manifold_radii(fake, k, block)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    rows = _rows_per_block(len(ref), block)
    for i in range(0, len(fake), rows):
        d = squared_distances(fake[i:i + rows], ref)
        fake_inside[i:i + rows] = (d <= ref_radii[None, :]).any(dim=1)
        ref_inside |= (d <= fake_radii[i:i + rows, None]).any(dim=0)
    return fake_inside.double().mean().item(), ref_inside.double().mean().item()


# --- Inception features -----------------------------------------------------------------------

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
def inception_network(weights: str | None, cuda: bool):
    """torch-fidelity's InceptionV3, built once per weights file (fakes and reals share it)."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(EXTRACTOR, ["2048", "logits_unbiased"], cuda=cuda,
                                    verbose=False, feature_extractor_weights_path=weights)


def spatial_layer(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is TF's ``mixed_6/conv:0`` (see the module docstring)."""
    return network.Mixed_6d.branch1x1


def adm_spatial(output: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> ADM's spatial features: the first 7 channels, flattened in H, W, C order."""
    first = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return first.reshape(len(output), -1).float().cpu()


def inception_features(images: Dataset, weights: str | Path | None, batch_size: int,
                       device: torch.device, seen: Callable[[int], None] | None = None
                       ) -> dict[str, np.ndarray]:
    """float32 features of each image: ``pool`` [N, 2048], ``logits`` [N, 1008] (no bias) and
    ``spatial`` [N, 2023]; ``weights`` None lets torch-fidelity download the real ones.
    ``seen(n)`` is called as each batch of n images goes through the network."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = device.type == "cuda"
    network = inception_network(str(weights) if weights else None, cuda)
    spatial = []

    def keep_spatial(module, inputs, output) -> None:
        spatial.append(adm_spatial(output))
        if seen is not None:  # torch-fidelity's own loop has no callback: its batches pass here
            seen(len(output))

    hook = spatial_layer(network).register_forward_hook(keep_spatial)
    try:
        out = get_featuresdict_from_dataset(images, network, batch_size, cuda, save_cpu_ram=True,
                                            verbose=False)
    finally:
        hook.remove()
    return {"pool": out["2048"].numpy(), "logits": out["logits_unbiased"].numpy(),
            "spatial": torch.cat(spatial).numpy()}


# --- what the samples are compared with -------------------------------------------------------

def load_reference(path: str | Path, needed: tuple[str, ...] = STATISTICS) -> dict:
    """An ADM reference batch (VIRTUAL_imagenet256_labeled.npz): ``fid`` and ``sfid`` statistics
    from mu, sigma, mu_s, sigma_s, and ``images`` (arr_0, memory-mapped) when it holds them. A batch
    with none of the statistics but with arr_0 gets them from its images, as ADM does. ``needed``
    ("mu", "sigma"): FID's alone suffice (U-ViT's fid_stats_mscoco256_val.npz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.reference: no reference batch at {str(path)!r}")
    remedy = ("download it again, or set evaluate.reference to null to compare with the encoded "
              "dataset's images")
    try:
        npz = np.load(path)  # never allow_pickle: unpickling a downloaded file can run code
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array")
        with npz:
            keys = set(npz.files)
            found = {k: npz[k].astype(np.float64) for k in STATISTICS if k in keys}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        why = ("numpy could only try to unpickle it" if "pickle" in str(e) else
               f"{type(e).__name__}: {e}")
        raise DamagedFile(f"evaluate.reference {str(path)!r} is not an ADM reference batch .npz "
                          f"({why}; one holds plain arrays mu, sigma, mu_s, sigma_s and/or arr_0, "
                          f"as VIRTUAL_imagenet256_labeled.npz does): {remedy}") from e
    missing = [k for k in needed if k not in found]
    if len(missing) == len(needed) and "arr_0" not in keys:
        raise ValueError(f"evaluate.reference {str(path)!r} holds neither statistics "
                         f"{list(needed)} nor images arr_0 (it has {sorted(keys)})")
    if 0 < len(missing) < len(needed):
        raise ValueError(f"evaluate.reference {str(path)!r} lacks {missing}: an ADM reference "
                         f"batch holds mu, sigma (FID) and mu_s, sigma_s (sFID)")
    stats = None
    if not missing:
        stats = {"fid": (found["mu"], found["sigma"])}
        if "mu_s" in found and "sigma_s" in found:
            stats["sfid"] = (found["mu_s"], found["sigma_s"])
    return {"stats": stats, "images": read_npz_images(path, remedy) if "arr_0" in keys else None}


def real_files(cfg: Config, latents: str | Path) -> list[Path]:
    """The real images the samples are compared with, a seeded subset of ``evaluate.num_real``:
    the encoded dataset's accepted files (rejects left out), or for captioned data the val
    split's images."""
    num, seed = cfg.evaluate.num_real, cfg.evaluate.seed
    if cfg.data.kind == "coco":
        val = listing(cfg, "val").images
        files, root = val.files, val.root
    else:
        store = ShardedStore(latents)
        rejected = {r["index"] for r in rejects(store)}
        files = [f for i, f in enumerate(store.array("files")[:]) if i not in rejected]
        root = Path(cfg.data.root)
    if num is not None and num < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), num, replace=False))
        files = [files[i] for i in pick]
    return [Path(root) / f for f in files]


Features = Callable[[Dataset], dict[str, np.ndarray]]


def reference_side(cfg: Config, latents: str | Path, features: Features) -> dict:
    """FID and sFID statistics, pool features for precision/recall, and where each comes from:
    ``evaluate.reference``'s statistics and images arr_0 where it has them, else the real images of
    the encoded dataset at ``latents``."""
    ec = cfg.evaluate
    batch = (load_reference(ec.reference, reference_keys(cfg)) if ec.reference
             else {"stats": None, "images": None})
    if batch["images"] is not None:
        ref = features(ArrayImages(batch["images"]))
        source = f"{len(ref['pool'])} images arr_0 of {ec.reference}"
    else:
        files = real_files(cfg, latents)
        real = CroppedFiles(files, cfg.data.image_size)
        ref = features(real)
        root = cfg.data.val_root if cfg.data.kind == "coco" else cfg.data.root
        source = f"{len(real)} real images of {root}"
    stats = batch["stats"] or {}
    found = {"fid": stats.get("fid") or statistics(ref["pool"]),
             "sfid": stats.get("sfid") or statistics(ref["spatial"])}
    if not stats:
        return {**found, "pool": ref["pool"], "fid_reference": source, "pr_reference": source}
    named = (f"mu, sigma, mu_s, sigma_s of {ec.reference}" if "sfid" in stats
             else f"mu, sigma of {ec.reference}; sFID: {source}")
    return {**found, "pool": ref["pool"], "fid_reference": named, "pr_reference": source}


def reference_keys(cfg: Config) -> tuple[str, ...]:
    """What a reference file must hold: ADM's four statistics, or for captioned data FID's two
    (U-ViT's fid_stats_mscoco256_val.npz; sFID then comes from the val images)."""
    return ("mu", "sigma") if cfg.data.kind == "coco" else STATISTICS


def frechet_scores(fake: dict[str, np.ndarray],
                   reference: dict) -> tuple[dict[str, float], list[str]]:
    """FID and sFID of sample features against a reference side's statistics, and a warning for
    each whose two routes disagreed (:func:`frechet`)."""
    scores, warned = {}, []
    for name, features in (("fid", "pool"), ("sfid", "spatial")):
        found = frechet(*statistics(fake[features]), *reference[name])
        scores[name] = found.reported
        if found.warning:
            warned.append(f"{name}: {found.warning}")
    return scores, warned


def feature_function(cfg: Config, device: torch.device, scratch: Path, seen=None) -> Features:
    """Inception features with evaluate's weights (random ones written under ``scratch``)."""
    ec = cfg.evaluate
    weights = inception_weights(ec.inception, ec.inception_seed, scratch)
    return functools.partial(inception_features, weights=weights, batch_size=ec.batch_size,
                             device=device, seen=seen)


def adm_metrics(fake: dict[str, np.ndarray], reference: dict,
                device: torch.device) -> dict[str, float]:
    """The five numbers ADM's evaluator prints, for sample features against a reference side."""
    precision, recall = precision_recall(reference["pool"], fake["pool"], device=device)
    scores, warned = frechet_scores(fake, reference)
    return {**scores, "inception_score": inception_score(fake["logits"]),
            "precision": precision, "recall": recall, **({"warnings": warned} if warned else {})}
