import numpy as np
import torch

from sra2.metrics import ArrayImages, fid_and_is, write_random_inception


def test_random_inception_is_seeded_and_fid_separates_distributions(tmp_path, photo):
    a = write_random_inception(tmp_path / "a.pth", seed=1)
    b = write_random_inception(tmp_path / "b.pth", seed=1)
    sa, sb = torch.load(a), torch.load(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rng = np.random.default_rng(0)
    crops = np.stack([photo[y:y + 64, x:x + 64] for y, x in rng.integers(0, 448, (20, 2))])
    noise = rng.integers(0, 256, crops.shape, dtype=np.uint8)
    score = lambda x, y: fid_and_is(ArrayImages(x), ArrayImages(y), a, 10, torch.device("cpu"))  # noqa: E731
    identical, similar, apart = score(crops[:10], crops[:10]), score(crops[:10], crops[10:]), score(noise[:10], crops[10:])
    assert all(np.isfinite(v) for r in (identical, similar, apart) for v in r.values())
    assert abs(identical["fid"]) < 1e-2 < similar["fid"] < apart["fid"]
    assert similar["inception_score"] >= 1.0 - 1e-9  # IS is at least 1 (exp of a KL divergence)
