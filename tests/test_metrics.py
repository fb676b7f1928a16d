import numpy as np
import pytest
import torch

from sra2.metrics import (ArrayImages, fid_and_is, inception_features, load_reference, statistics,
                          write_random_inception)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "w.pth", seed=1)


@pytest.fixture(scope="module")
def images():
    """Crops of a real photograph, split in two, and uniform noise."""
    from skimage import data

    photo = data.astronaut()
    rng = np.random.default_rng(0)
    crops = np.stack([photo[y:y + 64, x:x + 64] for y, x in rng.integers(0, 448, (20, 2))])
    return crops[:10], crops[10:], rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(inception, images):
    return [inception_features(ArrayImages(x), inception, 10, CPU) for x in images]


def test_random_inception_weights_are_seeded(tmp_path, inception):
    again = torch.load(write_random_inception(tmp_path / "again.pth", seed=1))
    first = torch.load(inception)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_fid_separates_distributions(features):
    a, b, noise = features
    identical, similar = fid_and_is(a, statistics(a)), fid_and_is(a, statistics(b))
    apart = fid_and_is(noise, statistics(b))
    assert all(np.isfinite(v) for r in (identical, similar, apart) for v in r.values())
    assert abs(identical["fid"]) < 1e-2 < similar["fid"] < apart["fid"]
    assert similar["inception_score"] >= 1.0 - 1e-9  # IS is at least 1 (exp of a KL divergence)


def test_matches_torch_fidelity_and_adm_reference_files(tmp_path, inception, images, features):
    import torch_fidelity

    a, b, _ = images
    ours = fid_and_is(features[0], statistics(features[1]))
    theirs = torch_fidelity.calculate_metrics(
        input1=ArrayImages(a), input2=ArrayImages(b), fid=True, isc=True, cache=False, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception),
        batch_size=10, verbose=False, save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    stats = statistics(features[1])
    np.savez(tmp_path / "ref.npz", mu=stats["mu"].astype(np.float32), sigma=stats["sigma"])
    via_file = fid_and_is(features[0], load_reference(tmp_path / "ref.npz"))
    assert via_file["fid"] == pytest.approx(ours["fid"], rel=1e-4)
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        load_reference(tmp_path / "missing.npz")
