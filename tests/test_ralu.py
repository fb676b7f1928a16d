"""RALU (sra2.sample.ralu, arXiv 2507.08422): the noise-timestep matching keeps x_t on its path, the
sampler without its tricks is the plain Euler sampler, every token gets the sin-cos embedding of
where it sits, and the edge mask picks the edged tokens."""

import math

import numpy as np
import pytest
import torch

from sra2.config.params import Ralu
from sra2.model.sit import build, patchify
from sra2.sample import ralu
from sra2.sample.samplers import guided_velocity, ode_euler

from conftest import randomize

C = 0.2  # large enough that a wrong noise shows: the children's correlation would be 0.2


def moments(x: torch.Tensor, mean: torch.Tensor, std: float) -> tuple[float, float, float]:
    """Over samples (dim 0) of standardised (x - mean) / std: the largest |z| of a coordinate's
    sample mean, the pooled variance, and the pooled correlation of the children of one 2x2
    group (the 6 pairs of each group)."""
    z = (x - mean) / std
    n = z.shape[0]
    worst_mean = (z.mean(0) * math.sqrt(n)).abs().max().item()
    variance = z.square().mean().item()
    groups = z.unfold(2, 2, 2).unfold(3, 2, 2).reshape(*z.shape[:2], z.shape[2] // 2,
                                                       z.shape[3] // 2, 4)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    correlation = torch.stack([groups[..., i] * groups[..., j] for i, j in pairs]).mean().item()
    return worst_mean, variance, correlation


@pytest.mark.parametrize("end", [0.3, 0.45, 0.7])
def test_noise_timestep_matching_keeps_the_marginal_of_x_t(end):
    """Gaussian toy data smooth at the scale of a half-size pixel (x1 = Up(u)), whose x_t is
    known in closed form: the half-size x_e = e u + (1 - e) eps, and the full-size tokens already
    up x_e = e x1 + (1 - e) eps. After the transition every token in play, copied or kept, must be
    N(s' x1, (1 - s')^2 I) with independent children."""
    n, channels, size, patch = 6000, 2, 8, 2
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, channels, size // 2, size // 2, generator=g, dtype=torch.float64)
    x1 = ralu.nearest(u)
    half = end * u + (1 - end) * torch.randn(n, channels, size // 2, size // 2, generator=g,
                                             dtype=torch.float64)
    full = end * x1 + (1 - end) * torch.randn(n, channels, size, size, generator=g,
                                              dtype=torch.float64)
    up = torch.tensor([[True, False], [False, False]]).expand(n, 2, 2)  # 1 of 4 tokens up
    new_up = torch.tensor([[True, True], [False, False]]).expand(n, 2, 2)  # 1 more goes up
    m = ralu.matching(end, C)
    assert m.a * end == pytest.approx(m.restart) and m.b == pytest.approx(1 - m.restart)
    half2, full2 = ralu.upsample(half, full, up, new_up, m, C, g, patch)

    # n samples: a coordinate's mean has standard error 1/sqrt(n) (in z units), the pooled
    # variance sqrt(2 / count), the pooled correlation 1 / sqrt(count); 5 standard errors
    for region, x, mean in (
            ("copied", full2[..., :4, 4:], x1[..., :4, 4:]),  # the token that went up now
            ("kept at full size", full2[..., :4, :4], x1[..., :4, :4]),
            ("kept at half size", half2[..., 2:, :], u[..., 2:, :])):
        worst, variance, correlation = moments(x, m.restart * mean, 1 - m.restart)
        count = x[0].numel() * n
        assert worst < 5.5, (region, worst)
        assert abs(variance - 1) < 5 * math.sqrt(2 / count), (region, variance)
        assert abs(correlation) < 5 / math.sqrt(count / 4), (region, correlation)


def test_copied_children_without_correlated_noise_would_fail_the_marginal_check():
    """The check above can fail: i.i.d. noise on copied children (instead of N(0, I - cS))
    leaves them correlated by c."""
    n, end = 6000, 0.3
    g = torch.Generator().manual_seed(1)
    half = (1 - end) * torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    m = ralu.matching(end, C)
    copied = m.a * ralu.nearest(half) + m.b * torch.randn(n, 2, 8, 8, generator=g,
                                                          dtype=torch.float64)
    _, _, correlation = moments(copied, torch.zeros(()), 1 - m.restart)
    assert correlation == pytest.approx(C, abs=5 / math.sqrt(copied[0].numel() * n / 4))


def test_matching_is_the_published_restart_time():
    # the RALU paper: FLUX-5x (c = 0.0177) restarts stage 2 near 0.054 and stage 3 near 0.098
    assert ralu.matching(0.3, 0.0177).restart == pytest.approx(0.054, abs=5e-4)
    assert ralu.matching(0.45, 0.0177).restart == pytest.approx(0.098, abs=5e-4)


def test_stage_times_follow_the_shifted_grid():
    times = ralu.stage_times(0.1, 0.6, 5, 3.0)
    assert times[0] == 0.1 and times[-1] == 0.6 and np.all(np.diff(times) > 0)
    sigma = 1 - np.array(times)
    g = sigma / (3.0 - 2.0 * sigma)  # uniform in g(sigma) = sigma / (h - (h - 1) sigma)
    np.testing.assert_allclose(np.diff(g), (g[-1] - g[0]) / 5, rtol=1e-12)
    np.testing.assert_allclose(ralu.stage_times(0.0, 0.5, 5, 1.0), np.linspace(0, 0.5, 6),
                               atol=1e-15)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(build("SiT-Micro/2", input_size=8, num_classes=3, learn_sigma=False)
                     ).double().eval()


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_all_tokens_and_no_stage_1_is_the_plain_euler_sampler(model, scale):
    """Stage 1 skipped and top_k 1: no half-size token and no matching, so stages 2 and 3 are 5 +
    5 Euler steps of the full latent on t = 0, 0.1, ..., 1, as ode_euler's 10 (with guidance on 3
    channels, one mask for both halves). float64: only the step sizes' last bits differ."""
    y = torch.tensor([0, 1, 2])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = Ralu(steps=[0, 5, 5], ends=[0.3, 0.5], top_k=1.0)
    got = ralu.sample(guided_velocity(model, y, scale, 3, tokens=True), x, torch.Generator(), cfg,
                      model.patch_size, model.hidden_size)
    want = ode_euler(guided_velocity(model, y, scale, 3), x, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_token_path_is_the_forward_pass(model):
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([0.2, 0.7], dtype=torch.float64), torch.tensor([0, 2])
    patches = patchify(x, 2).unflatten(-1, (4, 4))
    got = model.tokens(patches, t, y, model.pos_embed.expand(2, -1, -1))
    torch.testing.assert_close(got, patchify(model(x, t, y), 2).unflatten(-1, (4, 4)),
                               rtol=0, atol=1e-12)


def sincos_by_hand(dim: int, row: float, col: float) -> np.ndarray:
    quarter = dim // 4
    omega = [10000 ** (-k / quarter) for k in range(quarter)]
    return np.array([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                    + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])


def test_each_token_gets_the_sincos_embedding_of_where_it_sits(model):
    """Stage 2 of an 8x8 token grid (a 4x4 half grid) with two half-size tokens up: the network
    sees, for a half-size token (i, j), the formula at the centre of its block (2i + 0.5,
    2j + 0.5) (or (i, j) with positions: half), for a full-size token its raster position, which
    is the trained table."""
    dim, patch = 32, 2
    full = ralu.positions(dim, 8, "full")
    torch.testing.assert_close(ralu.positions(dim, 4, "full"),
                               build("SiT-Micro/2", input_size=8).pos_embed[0], rtol=0, atol=0)
    up = torch.zeros(1, 4, 4, dtype=torch.bool)
    up[0, 1, 2] = up[0, 3, 0] = True
    for kind, where in (("centres", lambda i: 2 * i + 0.5), ("half", lambda i: i)):
        seen = {}

        def velocity(patches, t, pos):
            seen["pos"] = pos
            return torch.zeros_like(patches)

        half, x = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)
        ralu.velocities(velocity, half, x, up, 0.5, ralu.positions(dim, 4, kind)[None],
                        full[None], patch)
        pos = seen["pos"][0].double().numpy()
        halves = [(i, j) for i in range(4) for j in range(4) if not up[0, i, j]]
        fulls = [(2 * i + a, 2 * j + b) for i in range(4) for a in range(2) for j in range(4)
                 for b in range(2) if up[0, i, j]]
        fulls.sort()  # raster order of the full grid
        assert len(pos) == len(halves) + len(fulls) == 14 + 8
        for k, (i, j) in enumerate(halves):
            np.testing.assert_allclose(pos[k], sincos_by_hand(dim, where(i), where(j)), atol=1e-6)
        for k, (i, j) in enumerate(fulls, start=len(halves)):
            np.testing.assert_allclose(pos[k], sincos_by_hand(dim, i, j), atol=1e-6)


def test_the_edge_mask_takes_the_tokens_with_most_edges():
    """A 2x2 token grid on 32x32 images: a square in one quadrant has edges there only."""
    images = np.full((2, 32, 32, 3), 90, dtype=np.uint8)
    images[0, 4:12, 20:28] = 250  # top right
    images[1, 18:30, 2:14] = 250  # bottom left
    images[1, 2:6, 2:6] = 200  # a smaller square, top left: fewer edge pixels
    up = ralu.edge_tokens(images, 2, 0.25)
    assert up[0].tolist() == [[False, True], [False, False]]
    assert up[1].tolist() == [[False, False], [True, False]]
    assert ralu.edge_tokens(images, 2, 0.5)[1].tolist() == [[True, False], [True, False]]
    # no edges at all: the first tokens in raster order, the same number
    assert ralu.edge_tokens(np.zeros((1, 32, 32, 3), np.uint8), 2, 0.5)[0].tolist() == [
        [True, True], [False, False]]


def test_ralu_samples_through_the_sample_stage(tmp_path, tiny):
    """The tiny preset switches to RALU with one parameter (at 64 px: a 4x4 token grid); its images
    differ from the default sampler's and, as every sampler's, do not depend on the batch size."""
    from sra2.data.store import ShardedStore
    from sra2.sample.generate import generate

    from conftest import with_overrides

    cfg = with_overrides(tiny, data={"image_size": 64}, sample={"num_samples": 4})
    net = randomize(build(cfg.model.name, input_size=8, num_classes=cfg.model.num_classes,
                          learn_sigma=False), std=0.05)
    torch.save({"name": cfg.model.name, "ema": net.state_dict()}, tmp_path / "ema.pt")
    images = {}
    for name, sample in (("sde", {"steps": 8}),
                         ("ralu", {"sampler": "ralu", "ralu": {"steps": [3, 2, 3]}}),
                         ("ralu by 2", {"sampler": "ralu", "ralu": {"steps": [3, 2, 3]},
                                        "batch_size": 2})):
        store = generate(with_overrides(cfg, sample=sample), tmp_path / "ema.pt",
                         tmp_path / name.replace(" ", "-"))
        images[name] = ShardedStore(store).array("images")[:]
    assert images["ralu"].shape == (4, 64, 64, 3)
    assert not np.array_equal(images["ralu"], images["sde"])
    # the same images up to float rounding: the VAE's convolutions may pick other kernels for
    # another batch size (seen on an AVX-512 CPU), moving a decoded value by ~1e-6, which flips
    # the rounding to uint8 of a value next to a .5 boundary (1 grey level, a handful of pixels);
    # a token chosen differently by the edge count would change whole patches
    diff = np.abs(images["ralu"].astype(int) - images["ralu by 2"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).sum())
