"""The feature PCA picture (sra2.evaluate.feature_pca): PCA colours and the held-out R^2 on
synthetic features whose answer is known, then the command on a tiny store and tiny SiT
checkpoints."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import export_random_sit

from sra2.evaluate import feature_pca as fp

from conftest import encoded_tiny

EPS = torch.finfo(torch.float64).eps


def anisotropic_tokens(images=8, length=256, d=16, seed=0):
    """Tokens (images, length, d) whose first three principal directions are well apart (standard
    deviations 5, 4, 3, then 1 and below), so PCA picks them out without ambiguity."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([5.0, 4.0, 3.0] + [1.0 - 0.05 * i for i in range(d - 3)],
                          dtype=torch.float64)
    return torch.randn(images, length, d, generator=g, dtype=torch.float64) * scales


def test_an_exact_linear_map_gives_r2_one_and_the_same_colours_up_to_sign():
    x = anisotropic_tokens()
    images, length, d = x.shape
    width = 48
    g = torch.Generator().manual_seed(1)
    # orthonormal rows times a scale, plus an offset: PCA sees the same geometry, so the scores
    # are the VAE's up to each component's sign (and the scale, which the percentiles remove)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    y = 3.0 * x @ q[:d] + torch.randn(width, generator=g, dtype=torch.float64)
    # R^2 ignores what every image has at a position (a position embedding)
    positions = torch.randn(length, width, generator=g, dtype=torch.float64)
    r2 = fp.alignment_r2(x, y + positions, seed=0)
    # 1 - R^2 is the squared relative residual. Least squares in float64 on a consistent system
    # leaves a relative residual below n * (d + 1) * cond * eps (a loose backward-error bound on
    # the n fitted rows), so 1 - R^2 stays under its square; a wrong fit is off by far more
    fit = x[: images // 2].reshape(-1, d)
    design = torch.cat([fit - fit.mean(dim=0), torch.ones(len(fit), 1, dtype=torch.float64)], dim=1)
    bound = (len(fit) * (d + 1) * torch.linalg.cond(design).item() * EPS) ** 2
    assert 0.0 <= 1.0 - r2 < bound
    vae_rgb, hidden_rgb = fp.pca_rgb(x), fp.pca_rgb(y)
    assert vae_rgb.shape == hidden_rgb.shape == (8, 256, 3)
    # a component's sign flip maps its colour v to 1 - v exactly (the percentiles swap); values
    # in [0, 1] computed from scores equal to ~cond * eps agree to far better than 1e-9
    for k in range(3):
        same = np.abs(hidden_rgb[..., k] - vae_rgb[..., k]).max()
        flipped = np.abs(hidden_rgb[..., k] - (1.0 - vae_rgb[..., k])).max()
        assert min(same, flipped) < 1e-9, (k, same, flipped)
        assert vae_rgb[..., k].std() > 0.1  # the channel shows something


def test_unrelated_features_give_r2_near_zero_on_held_out_images():
    # 8 images of 256 tokens: 4 fitted, 4 held out, each half centred per position, so
    # n = 256 x 3 = 768 independent rows a half; d = 16 inputs (+ intercept), D = 32 outputs.
    # For y independent of x the held-out R^2 of an OLS fit is about -(d + 1) / n = -0.022
    # (the fitted map only adds prediction error), with a standard deviation of about
    # 2 sqrt((d + 1) / n^2) / sqrt(D) = 0.0019 (the cross term of y and the prediction,
    # averaged over D outputs; 0.0023 measured over 20 seeds). The bounds are over 10 of those away.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 256, 16, generator=g, dtype=torch.float64)
    y = torch.randn(8, 256, 32, generator=g, dtype=torch.float64)
    r2 = fp.alignment_r2(x, y, seed=0)
    assert -0.05 < r2 < 0.02


def test_r2_needs_ten_fitted_rows_per_coefficient():
    assert fp.alignment_r2(torch.randn(3, 256, 16), torch.randn(3, 256, 8), seed=0) is None
    # 2 fitting images of 169 tokens, centred: 169 independent rows for 17 coefficients, then 170
    assert fp.fit_counts(torch.randn(4, 169, 16)) == (169, 17)
    assert fp.alignment_r2(torch.randn(4, 169, 16), torch.randn(4, 169, 8), seed=0) is None
    assert fp.alignment_r2(torch.randn(4, 170, 16), torch.randn(4, 170, 8), seed=0) is not None


def test_component_signs_and_colours_are_reproducible():
    x = anisotropic_tokens(images=2, length=64).reshape(-1, 16)
    scores = fp.principal_scores(x)
    # the largest-magnitude loading is positive whatever sign the SVD returns: flipping the
    # tokens' sign flips the scores' sign, and the colours do not change with the input's sign
    np.testing.assert_allclose(fp.principal_scores(-x), -scores, atol=1e-9)
    assert np.array_equal(fp.scores_to_rgb(scores), fp.scores_to_rgb(fp.principal_scores(x)))
    rgb = fp.scores_to_rgb(scores)
    assert rgb.min() == 0.0 and rgb.max() == 1.0  # percentiles clip the tails


def test_blocks_and_checkpoints_are_checked_before_loading(tmp_path):
    assert fp.resolve_blocks(fp.parse_blocks("auto"), 12, "m") == (2, 4, 8, 12)
    assert fp.resolve_blocks(fp.parse_blocks("auto"), 3, "m") == (2, 3)
    assert fp.resolve_blocks(fp.parse_blocks("1,last,3"), 3, "m") == (1, 3)
    with pytest.raises(ValueError, match=r"\[9\] above the depth of m \(4 blocks\)"):
        fp.resolve_blocks(fp.parse_blocks("2,9"), 4, "m")
    with pytest.raises(ValueError, match="'x'"):
        fp.parse_blocks("2,x")
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        fp.parse_checkpoints(f"a={tmp_path / 'nope.pt'}")


@pytest.fixture(scope="module")
def tiny_objects(tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    cfg, latents = encoded_tiny(root)
    ema = [export_random_sit(root / f"ema{i}.pt", cfg, seed=i) for i in (0, 1)]
    return cfg, latents, ema


def panel_at(png: np.ndarray, top: int, left: int, row: int, column: int, panel: int) -> np.ndarray:
    y, x = top + row * (panel + fp.PAD), left + column * (panel + fp.PAD)
    return png[y:y + panel, x:x + panel]


def test_the_command_draws_every_panel_and_writes_the_numbers(tiny_objects, tmp_path):
    cfg, latents, (a, b) = tiny_objects
    images, out = 12, tmp_path / "pca" / "features.png"
    result = fp.feature_pca(cfg, f"vanilla={a},sra2={b}", latents, out, images=images, t=0.5,
                            seed=3, log=lambda _: None)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == result and len(set(saved["rows"])) == images
    assert [c["label"] for c in saved["checkpoints"]] == ["vanilla", "sra2"]
    # SiT-Micro has 3 blocks: auto is block 2 and the last. 12 images of 2 x 2 tokens: 6 fit,
    # centred per position: 4 x 5 = 20 independent rows for 17 coefficients, too few for an R^2
    for c in saved["checkpoints"]:
        assert [blk["block"] for blk in c["blocks"]] == [2, 3]
        assert all(blk["r2"] is None and (blk["r2_rows"], blk["r2_coefficients"]) == (20, 17)
                   for blk in c["blocks"])

    png = np.asarray(Image.open(out).convert("RGB"))
    panel, columns, groups = 96, 2 + 2, 2  # 32 px images zoomed x3; image, VAE, 2 blocks
    top = fp.LINE * (3 + 4)  # title: settings, colours, the random VAE's warning; headers
    width = fp.LEFT + groups * (columns * panel + (columns - 1) * fp.PAD) + (groups - 1) * fp.GAP
    assert png.shape == (top + images * panel + (images - 1) * fp.PAD, width, 3)
    lefts = [fp.LEFT + g * (columns * panel + (columns - 1) * fp.PAD + fp.GAP)
             for g in range(groups)]
    cells = {(r, g, c): panel_at(png, top, lefts[g], r, c, panel)
             for r in range(images) for g in range(groups) for c in range(columns)}
    # each group shows the same images and VAE tokens; everything else differs
    for r in range(images):
        for c in (0, 1):
            assert np.array_equal(cells[r, 0, c], cells[r, 1, c])
    distinct = [cells[key] for key in cells if key[1] == 0 or key[2] >= 2]
    flat = {cell.tobytes() for cell in distinct}
    assert len(flat) == len(distinct)
