import math

import numpy as np
import pytest
import torch
from PIL import Image

from sra2.data.store import ShardedStore
from sra2.evaluate.metrics import (
    AGREEMENT,
    ArrayImages,
    CroppedFiles,
    adm_trace_sqrt,
    frechet,
    frechet_distance,
    inception_features,
    inception_network,
    inception_score,
    load_reference,
    manifold_radii,
    precision_recall,
    statistics,
    write_random_inception,
)
from sra2.evaluate.protocol import not_comparable
from sra2.evaluate.scores import evaluate

from conftest import with_overrides

CPU = torch.device("cpu")
EPS = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """The weights evaluate() writes for evaluate.inception=random, evaluate.inception_seed=1."""
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


def null_space_noise(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """How far two correct square-root methods may disagree on 2 tr sqrt(sigma1 sigma2) when the
    covariances are singular (fewer images than dimensions): forming the product and decomposing it
    leaves each of the d zero eigenvalues at up to d * eps * |sigma1| |sigma2| (a sum of d products
    rounded), and each contributes its square root to the trace, twice in the distance."""
    d = len(sigma1)
    return 2 * d * math.sqrt(d * EPS * np.linalg.norm(sigma1, 2) * np.linalg.norm(sigma2, 2))


# --- the formulas against hand computations ----------------------------------------------------

def test_random_inception_weights_are_seeded(tmp_path, inception):
    again = torch.load(write_random_inception(tmp_path / "again.pth", seed=1))
    first = torch.load(inception)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_frechet_distance_of_known_gaussians():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations 2 and 3
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]),
                            np.array([3.0]), np.array([[9.0]])) \
        == pytest.approx(4 + 1, abs=64 * EPS * 13)
    # 2-D, covariances that do not commute: for a 2x2 product M with positive eigenvalues,
    # tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); here tr M = 1*2 + 4*2 and det M = 4 * 3
    sigma1, sigma2 = np.diag([1.0, 4.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    hand = 5 + 5 + 4 - 2 * math.sqrt(10 + 2 * math.sqrt(12))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(hand, abs=64 * EPS * 14)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=64 * EPS * 10)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(mu1, sigma1, np.zeros(3), np.eye(3))


def test_frechet_distance_matches_the_symmetric_eigenvalue_form():
    """tr sqrt(S1 S2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2): an independent route that
    catches a broken scipy sqrtm (some SciPy/OpenBLAS builds return a wrong one)."""
    rng = np.random.default_rng(0)
    d = 64
    a, b = rng.normal(size=(4 * d, d)), rng.normal(size=(4 * d, d)) * np.linspace(0.5, 2, d)
    mu1, sigma1 = statistics(a)
    mu2, sigma2 = statistics(b + 0.3)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    # both routes are backward stable: errors of about cond * d * eps relative to the traces
    cond = np.linalg.cond(sigma1 @ sigma2)
    assert cond < 1e3
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        expected, abs=cond * d * EPS * (np.trace(sigma1) + np.trace(sigma2)))


def test_fid_two_ways_agree_on_adm_shaped_statistics():
    """2048 dimensions, eigenvalues over 8 decades as Inception's pool features have, two
    covariances in unrelated bases: the two eigenvalue routes and ADM's sqrtm agree."""
    rng = np.random.default_rng(0)
    d, spectrum = 2048, np.logspace(1, -7, 2048)
    q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma1, sigma2 = (q1 * spectrum) @ q1.T, (q2 * spectrum[::-1]) @ q2.T
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    found = frechet(mu1, sigma1, mu2, sigma2)
    assert found.agree and found.warning is None and found.reported == found.value
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) \
        - 2 * adm_trace_sqrt(sigma1, sigma2)
    # each route rounds d eigenvalues of a product of norm 10 x 10 (null_space_noise with the
    # spectral norms known by construction, not computed)
    assert found.value == pytest.approx(adm, abs=2 * d * math.sqrt(d * EPS * 10 * 10))
    assert abs(found.value - found.check) <= AGREEMENT * found.value


def test_fid_is_exact_where_adms_sqrtm_is_not():
    """Covariances spanning 16 decades, one of rank 4 (fewer images than dimensions), in unrelated
    bases: the product sqrtm roots has eigenvalues far below its rounding, which leaves complex
    roots (ADM refuses an imaginary diagonal above 1e-3). The eigenvalue routes take the root of a
    symmetric matrix instead; against 60-digit arithmetic on the same numbers they are off by
    less than the rounding of the eigenvalues' sum (d x sqrt(d eps |sigma1| |sigma2|))."""
    import mpmath

    rng = np.random.default_rng(1)
    d = 8
    q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = np.logspace(6, -10, d), np.logspace(-10, 6, d)
    a[d // 2:] = 0
    sigma1, sigma2 = (q1 * a) @ q1.T, (q2 * b) @ q2.T
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    with mpmath.workdps(60):
        product = mpmath.matrix(sigma1.tolist()) * mpmath.matrix(sigma2.tolist())
        roots = [mpmath.sqrt(max(mpmath.re(e), 0)) for e in mpmath.eig(product, left=False,
                                                                         right=False)]
        exact = float(np.trace(sigma1) + np.trace(sigma2) - 2 * sum(roots))
    found = frechet(np.zeros(d), sigma1, np.zeros(d), sigma2)
    assert found.agree
    bound = d * math.sqrt(d * EPS * np.linalg.norm(sigma1, 2) * np.linalg.norm(sigma2, 2))
    assert abs(found.value - exact) <= bound and abs(found.check - exact) <= bound


def test_routes_that_disagree_are_reported_with_adms():
    """A damaged reference covariance (a negative eigenvalue): the routes disagree, ADM's sqrtm has
    no real root; the value is reported with a warning naming both."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    w, u = np.linalg.eigh(b @ b.T)
    w[0] = -0.05 * w[-1]
    found = frechet(np.zeros(3), a @ a.T, np.zeros(3), (u * w) @ u.T)
    assert not found.agree and found.adm is None and found.reported == found.value
    assert f"{found.value!r} rooting sigma1, {found.check!r} rooting sigma2" in found.warning
    with pytest.raises(ValueError, match="imaginary part"):
        adm_trace_sqrt(a @ a.T, (u * w) @ u.T)


SYMMETRIC = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
SKEWED = np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.2, 0.4, 0.4]])
# p(y) of SYMMETRIC is uniform: KL of every row = 0.5 ln(1.5) + 0.5 ln(0.75), IS = sqrt(1.5 * 0.75)
IS_SYMMETRIC = math.sqrt(9 / 8)
# p(y) of SKEWED = (0.6, 0.2, 0.2)
IS_SKEWED = math.exp((2 * (0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.1 / 0.2))
                      + 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.4 / 0.2)) / 3)
# both tables as one split: p(y) = (7/15, 4/15, 4/15)
IS_BOTH = math.exp((
    0.5 * math.log(0.5 * 15 / 7) + 0.5 * math.log(0.25 * 15 / 4)  # row (.5, .25, .25)
    + 2 * (0.25 * math.log(0.25 * 15 / 7) + 0.5 * math.log(0.5 * 15 / 4)
           + 0.25 * math.log(0.25 * 15 / 4))  # rows (.25, .5, .25) and (.25, .25, .5)
    + 2 * (0.8 * math.log(0.8 * 15 / 7) + 0.2 * math.log(0.1 * 15 / 4))  # rows (.8, .1, .1)
    + 0.2 * math.log(0.2 * 15 / 7) + 0.8 * math.log(0.4 * 15 / 4)) / 6)  # row (.2, .4, .4)


def test_inception_score_by_hand():
    shift = np.array([[3.0], [-1.0], [7.0]])  # softmax ignores a constant added to a row
    logits = np.log(SYMMETRIC) + shift
    tol = 256 * EPS  # a few dozen roundings of numbers of order one
    assert inception_score(logits) == pytest.approx(IS_SYMMETRIC, rel=tol)
    assert inception_score(np.log(SKEWED)) == pytest.approx(IS_SKEWED, rel=tol)
    both = np.concatenate([logits, np.log(SKEWED)])
    # contiguous splits, no shuffle: rows 0-2 and rows 3-5
    assert (inception_score(both, split_size=3)
            == pytest.approx((IS_SYMMETRIC + IS_SKEWED) / 2, rel=tol))
    # fewer rows than ADM's 5000: one split
    assert inception_score(both) == pytest.approx(IS_BOTH, rel=tol)
    # the last split keeps what is left (ADM's range(0, n, split_size)): one row scores exp(0)
    assert inception_score(both[:4], split_size=3) == pytest.approx((IS_SYMMETRIC + 1) / 2, rel=tol)
    # certain predictions of three classes: IS = 3; probabilities that underflow to 0
    # count 0 log 0 = 0
    assert inception_score(1000 * np.eye(3)) == pytest.approx(3, rel=tol)


# unit square of reference points: the 3rd nearest neighbour of a corner is the opposite corner
SQUARE = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
# samples on a square of side 2 above it: their squared radius is 8 (the opposite corner)
ABOVE = np.array([[0, 2], [2, 2], [0, 4], [2, 4]], dtype=np.float32)


def test_precision_and_recall_of_points_by_hand():
    # precision: (0,2) is 1 from (0,1); (2,2) is exactly sqrt(2) from (1,1), on the ball's
    # boundary, which counts (ADM compares with <=); (0,4) and (2,4) are 3 or more from all.
    # recall: every corner of the unit square is within squared distance 8 of (0,2)
    assert precision_recall(SQUARE, ABOVE) == (0.5, 1.0)
    assert precision_recall(ABOVE, SQUARE) == (1.0, 0.5)  # the two sets swap roles
    assert manifold_radii(torch.as_tensor(SQUARE, dtype=torch.float64)).tolist() == [2, 2, 2, 2]
    assert manifold_radii(torch.as_tensor(ABOVE, dtype=torch.float64)).tolist() == [8, 8, 8, 8]


def test_radii_count_a_duplicate_as_a_neighbour_and_only_the_point_itself_is_left_out():
    points = torch.tensor([[0, 0], [0, 0], [5, 0], [0, 5], [5, 5]], dtype=torch.float64)
    # (0,0): 0 (itself), 0 (its twin), 25, 25, 50 -> 3rd neighbour at 25; (5,5): 0, 25, 25, 50, 50
    assert manifold_radii(points, k=3).tolist() == [25, 25, 25, 25, 50]
    assert manifold_radii(points, k=1).tolist() == [0, 0, 25, 25, 25]


def test_precision_and_recall_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(0)
    reference, samples = rng.normal(size=(37, 6)), rng.normal(size=(53, 6)) + 0.7
    results = {block: precision_recall(reference, samples, block=block)
               for block in (1, 7, 100, 10 ** 6)}
    assert len(set(results.values())) == 1
    precision, recall = results[1]
    assert 0 < precision < 1 and 0 < recall < 1
    # blocks of other shapes may round the products differently: |a|^2 - 2 a.b + |b|^2 sums
    # d + 2 terms, each below (|a| + |b|)^2 <= 4 max |x|^2
    feats = torch.as_tensor(samples)
    tol = (samples.shape[1] + 2) * EPS * 4 * (samples ** 2).sum(1).max()
    np.testing.assert_allclose(manifold_radii(feats, block=5), manifold_radii(feats, block=10 ** 6),
                               rtol=0, atol=tol)


def test_precision_and_recall_need_more_points_than_neighbours():
    with pytest.raises(ValueError, match="k=3 need more than 3"):
        precision_recall(SQUARE[:3], ABOVE)


# --- Inception features ------------------------------------------------------------------------

def test_spatial_features_are_the_first_7_channels_of_mixed_6d_branch1x1_in_hwc_order(inception,
                                                                                      images):
    network = inception_network(str(inception), False)
    blocks = []
    hook = network.Mixed_6d.register_forward_hook(lambda m, i, out: blocks.append(out.clone()))
    try:
        feats = inception_features(ArrayImages(images[0][:3]), inception, 3, CPU)
    finally:
        hook.remove()
    # Mixed_6d concatenates [branch1x1 (192 channels), ...]: its first 7 channels are branch1x1's
    block = blocks[0]
    assert block.shape == (3, 768, 17, 17)
    spatial = feats["spatial"]
    assert spatial.shape == (3, 17 * 17 * 7) and spatial.dtype == np.float32
    np.testing.assert_array_equal(spatial, block[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy())
    for h, w, c in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (16, 16, 6), (5, 11, 3)]:
        assert spatial[2, (h * 17 + w) * 7 + c] == block[2, c, h, w]  # index of NHWC flattening
    assert (spatial >= 0).all() and (spatial == 0).any()  # after the ReLU, as mixed_6/conv:0
    # logits without the bias: pool @ W^T, to float32 accuracy (2048 products summed)
    pool, weight = feats["pool"].astype(np.float64), network.fc.weight.double().numpy()
    unbiased = pool @ weight.T
    tol = 2048 * np.finfo(np.float32).eps * (np.abs(pool) @ np.abs(weight).T)
    assert feats["pool"].shape == (3, 2048) and feats["logits"].shape == (3, 1008)
    assert (np.abs(feats["logits"] - unbiased) <= tol).all()
    assert (np.abs(feats["logits"] - (unbiased + network.fc.bias.double().numpy())) > tol).any()


def test_fid_matches_torch_fidelity(inception, images, features):
    import torch_fidelity

    a, b, _ = images
    stats_a, stats_b = statistics(features[0]["pool"]), statistics(features[1]["pool"])
    ours = frechet_distance(*stats_a, *stats_b)
    theirs = torch_fidelity.calculate_metrics(
        input1=ArrayImages(a), input2=ArrayImages(b), fid=True, cache=False, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception),
        batch_size=10, verbose=False, save_cpu_ram=True)["frechet_inception_distance"]
    # scipy's sqrtm (ADM) and torch-fidelity's eigenvalues differ only in the null space noise
    noise = 2 * null_space_noise(stats_a[1], stats_b[1])
    assert noise < 1e-2 * theirs  # the bound is tight enough to tell a wrong formula
    assert ours == pytest.approx(theirs, abs=noise)


def test_fid_and_sfid_separate_distributions(features):
    a, b, noise = features
    for kind in ("pool", "spatial"):
        similar = frechet_distance(*statistics(a[kind]), *statistics(b[kind]))
        apart = frechet_distance(*statistics(noise[kind]), *statistics(b[kind]))
        assert 0 < similar < apart, kind


def test_reference_batches_must_hold_the_adm_keys(tmp_path):
    mu, sigma = np.zeros(3, np.float32), np.eye(3)
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "fid_only.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"fid_only\.npz.*lacks \['mu_s', 'sigma_s'\]"):
        load_reference(tmp_path / "fid_only.npz")
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(3))
    with pytest.raises(ValueError, match=r"labels\.npz.*neither"):
        load_reference(tmp_path / "labels.npz")
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    ref = load_reference(tmp_path / "stats.npz")
    assert ref["images"] is None and ref["stats"]["sfid"][1].shape == (2, 2)
    assert all(x.dtype == np.float64 for pair in ref["stats"].values() for x in pair)
    pictures = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "batch.npz", arr_0=pictures)  # a sample batch: ADM computes its statistics
    ref = load_reference(tmp_path / "batch.npz")
    assert ref["stats"] is None
    np.testing.assert_array_equal(ref["images"], pictures)


# --- evaluate() from files ------------------------------------------------------------------------

def test_evaluate_against_an_adm_reference_batch(tmp_path, tiny, images, features):
    (a, b, _), (fake, second, _) = images, features
    ref = {"pool": np.concatenate([fake["pool"], second["pool"]])}  # a and b, in batches of 10
    (mu, sigma), (mu_s, sigma_s) = statistics(fake["pool"]), statistics(fake["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([a, b]), mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)
    np.savez(tmp_path / "samples.npz", arr_0=a)
    cfg = with_overrides(tiny, evaluate={"reference": str(tmp_path / "ref.npz"), "batch_size": 10,
                                         "inception_seed": 1})
    result = evaluate(cfg, tmp_path / "samples.npz", tmp_path / "no-latents-needed")
    # the statistics are the samples' own: both distances vanish up to the null space noise
    assert abs(result["fid"]) <= null_space_noise(sigma, sigma)
    assert abs(result["sfid"]) <= null_space_noise(sigma_s, sigma_s)
    assert result["inception_score"] == inception_score(fake["logits"])
    # the samples are among the reference images: precision 1; recall from arr_0's 20 images
    assert (result["precision"], result["recall"]) == precision_recall(ref["pool"], fake["pool"])
    assert result["precision"] == 1.0 and result["recall"] < 1.0
    assert "20 images arr_0" in result["pr_reference"] and "ref.npz" in result["fid_reference"]
    assert result["num_samples"] == 10 and "RANDOM" in result["inception_weights"]
    # the tiny preset's numbers say why they cannot sit beside the paper's
    assert result["comparable"] is False and result["why"] == "; ".join(not_comparable(cfg))
    assert "evaluate.inception" in result["why"]
    assert "fid_noise" not in result and "sets" not in result  # one set, no bootstrap


def test_evaluate_scores_each_sample_set_and_the_noise_of_their_mean(tmp_path, tiny, images,
                                                                      features):
    """The 10 images as sample.seeds = 2 sets of 5, and 3 bootstrap resamples: each number is the
    mean of the sets', its noise the larger of the bootstrap's and the sets' spread over sqrt(2)."""
    (a, b, _), (fake, second, _) = images, features
    np.savez(tmp_path / "ref.npz", arr_0=b, mu=statistics(second["pool"])[0],
             sigma=statistics(second["pool"])[1], mu_s=statistics(second["spatial"])[0],
             sigma_s=statistics(second["spatial"])[1])
    np.savez(tmp_path / "samples.npz", arr_0=a)
    cfg = with_overrides(tiny, sample={"num_samples": 5, "seeds": 2},
                         evaluate={"reference": str(tmp_path / "ref.npz"), "batch_size": 10,
                                   "inception_seed": 1, "bootstrap": 3})
    result = evaluate(cfg, tmp_path / "samples.npz", tmp_path / "no-latents-needed")
    first, other = result["sets"]
    assert first["fid"] == frechet_distance(*statistics(fake["pool"][:5]),
                                            *statistics(second["pool"]))
    assert result["fid"] == pytest.approx((first["fid"] + other["fid"]) / 2, rel=1e-12)
    assert result["num_samples"] == 5
    for name in ("fid", "sfid", "inception_score"):
        found = result[f"{name}_noise"]
        seeds_sd = abs(first[name] - other[name]) / math.sqrt(2)  # the sd of two values
        assert found["seeds_sd"] == pytest.approx(seeds_sd, rel=1e-9)
        low, high = found["bootstrap_interval"]
        assert low <= high and found["bootstrap_sd"] >= 0
        assert found["sd"] == pytest.approx(max(found["bootstrap_sd"], seeds_sd) / math.sqrt(2))


def test_evaluate_against_the_real_images_of_the_encoded_dataset(tmp_path, tiny, images, features,
                                                                 inception):
    (a, b, noise), fake = images, features[0]
    root = tmp_path / "train"
    (root / "c0").mkdir(parents=True)
    files = [f"c0/{i:02d}.png" for i in range(len(b) + 1)]
    for name, pixels in zip(files, [noise[0], *b]):
        Image.fromarray(pixels).save(root / name)
    store = ShardedStore.open_or_create(tmp_path / "latents", len(files), len(files), 1, {},
                                        fixed={"files": np.asarray(files,
                                                                   dtype=np.dtypes.StringDType())})
    store.write_shard(0, {}, {"rejects": [{"index": 0, "file": files[0], "reason": "test"}]})
    np.savez(tmp_path / "samples.npz", arr_0=a)
    cfg = with_overrides(tiny, data={"root": str(root)},
                         evaluate={"batch_size": 10, "num_real": None, "inception_seed": 1})
    result = evaluate(cfg, tmp_path / "samples.npz", tmp_path / "latents")
    real = inception_features(CroppedFiles([root / f for f in files[1:]], cfg.data.image_size),
                              inception, 10, CPU)
    assert result["fid"] == frechet_distance(*statistics(fake["pool"]), *statistics(real["pool"]))
    assert result["sfid"] == frechet_distance(*statistics(fake["spatial"]),
                                              *statistics(real["spatial"]))
    assert (result["precision"], result["recall"]) == precision_recall(real["pool"], fake["pool"])
    assert result["fid_reference"] == result["pr_reference"] == f"10 real images of {root}"
