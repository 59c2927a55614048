"""Tests for fsa.generators.tailcalib (TailCalib feature generation on plain arrays)."""

import warnings

import numpy as np
import pytest
import torch

import fsa.generators.tailcalib as tc
from fsa.generators.tailcalib_api import TailCalibGenerator, generate, tukey_transform
from utils.errors import UserError
from tests.helpers import quiet


def _data(seed=0, d=6, counts=((3, 40), (7, 15), (42, 4))):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.random((n, d)) + 0.5 * i for i, (_, n) in enumerate(counts)])
    y = np.concatenate([np.full(n, lab) for lab, n in counts])
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


def _transform(X, lam, normalize=True):
    Z = np.asarray(X, dtype=np.float64)
    if normalize:
        Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    return np.log(Z + 1e-6) if lam == 0 else Z**lam


# ------------------------------------------------------------------------------------------ balance
@pytest.mark.parametrize("extra", [0, 5])
def test_every_class_balanced_to_head_count(extra):
    X, y = _data()
    f, lab, per = quiet(generate, X, y, k=2, extra=extra, seed=0)
    T = 40 + extra
    assert f.shape == (3 * T, X.shape[1])
    vals, cnt = np.unique(lab, return_counts=True)
    assert vals.tolist() == [3, 7, 42] and cnt.tolist() == [T, T, T]
    assert per == {3: extra, 7: T - 15, 42: T - 4}


def test_noncontiguous_labels_preserved_and_int64():
    X, y = _data(counts=((-5, 10), (1000, 3), (17, 6)))
    f, lab, per = quiet(generate, X, y, k=1, seed=1)
    assert lab.dtype == np.int64
    assert set(np.unique(lab).tolist()) == {-5, 17, 1000}
    assert set(per) == {-5, 17, 1000}


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("chunk", [None, 256])
def test_generated_statistics_match_calibrated_parameters(chunk, monkeypatch):
    """Class A: many samples (n > D: Cholesky factor); class B: 2 real samples.

    With shuffle=False and an even split, the first 10k generated rows of B come from B's first
    real sample, the next 10k from the second one.  chunk=256 forces many small matmul chunks.
    """
    if chunk:
        monkeypatch.setattr(tc, "_CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(0)
    d, g = 4, 10000
    nA = 2 * g + 2  # B (2 real samples) needs exactly 2 * g generated ones
    A = rng.random((nA, d)) * np.array([1.0, 0.5, 2.0, 0.2]) + 0.1
    B = rng.random((2, d)) + 1.0
    X = np.concatenate([A, B])
    y = np.r_[np.zeros(nA, int), np.ones(2, int)]
    lam, alpha = 0.5, 0.003
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PD covariances: no jitter warning expected
        f, lab, per = generate(X, y, tukey=lam, alpha=alpha, k=1, seed=3, shuffle=False)
    assert per == {0: 0, 1: 2 * g}
    Z = _transform(X, lam)
    muA = Z[:nA].mean(0)
    covA = np.cov(Z[:nA], rowvar=False)
    exp_cov = covA + alpha  # alpha is added to every entry
    n_real = len(y)
    gen_B = f[n_real:][lab[n_real:] == 1]
    assert len(gen_B) == 2 * g
    for j in range(2):
        part = gen_B[j * g:(j + 1) * g]
        exp_mean = (muA + Z[nA + j]) / 2
        se = np.sqrt(np.diag(exp_cov) / g)
        assert np.all(np.abs(part.mean(0) - exp_mean) < 5 * se)
        emp = np.cov(part, rowvar=False)
        sd = np.sqrt(np.outer(np.diag(exp_cov), np.diag(exp_cov)) + exp_cov**2) / np.sqrt(g)
        assert np.all(np.abs(emp - exp_cov) < 5 * sd)
    # the real rows are the transformed inputs, untouched
    np.testing.assert_allclose(f[:n_real], Z, rtol=0, atol=1e-12)


def test_calibrate_matches_hand_computation_and_alpha_everywhere():
    X, y = _data(d=5)
    gen = TailCalibGenerator(tukey=0.7, alpha=0.05, k=2, seed=0).fit(X, y)
    Z = _transform(X, 0.7)
    labels = [3, 7, 42]
    means = np.stack([Z[y == c].mean(0) for c in labels])
    covs = np.stack([np.cov(Z[y == c], rowvar=False) for c in labels])
    i = int(np.flatnonzero(y == 42)[0])
    m, c, nbr = gen.calibrate([i])
    dist = np.linalg.norm(means - Z[i], axis=1)
    dist[labels.index(42)] = np.inf  # neighbours are the other classes
    near = np.sort(np.argsort(dist)[:2])
    assert sorted(nbr[0].tolist()) == [labels[j] for j in near]
    np.testing.assert_allclose(m[0], (means[near].sum(0) + Z[i]) / 3, atol=1e-12)
    np.testing.assert_allclose(c[0], covs[near].mean(0) + 0.05, atol=1e-12)


def test_neighbours_all_can_pick_own_class():
    X, y = _data(d=5)
    i = int(np.flatnonzero(y == 3)[0])
    _, _, own = TailCalibGenerator(k=1, neighbours="all").fit(X, y).calibrate([i])
    _, _, other = TailCalibGenerator(k=1).fit(X, y).calibrate([i])
    assert own[0, 0] == 3  # a sample is nearest to its own (well separated) class mean
    assert other[0, 0] != 3


def _check_draws(part, exp_mean, exp_cov, n_sd=5):
    g = len(part)
    se = np.sqrt(np.diag(exp_cov) / g)
    assert np.all(np.abs(part.mean(0) - exp_mean) < n_sd * se + 1e-12)
    emp = np.cov(part, rowvar=False)
    sd = np.sqrt(np.outer(np.diag(exp_cov), np.diag(exp_cov)) + exp_cov**2) / np.sqrt(g)
    assert np.all(np.abs(emp - exp_cov) < n_sd * sd + 1e-12)


def test_small_neighbour_classes_use_exact_low_rank_covariance():
    """B's neighbours C1 (3 samples) and C2 (4 samples) have n <= D: singular covariances, sampled
    exactly through their centred data (no jitter, no warning)."""
    rng = np.random.default_rng(1)
    d, g = 6, 20000
    A = rng.random((g + 1, d)) * 0.2 + np.array([3.0, 0, 0, 0, 0, 0])
    near = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    C1 = near + rng.random((3, d)) * 0.3
    C2 = near + rng.random((4, d)) * 0.3
    B = near[None] + 0.1
    X = np.concatenate([A, C1, C2, B])
    y = np.r_[np.zeros(g + 1, int), np.full(3, 1), np.full(4, 2), 3]
    alpha = 0.002
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen = TailCalibGenerator(k=2, alpha=alpha, seed=0).fit(X, y)
        f, lab, per = gen.generate(shuffle=False)
    _, _, nbr = gen.calibrate([len(y) - 1])
    assert sorted(nbr[0].tolist()) == [1, 2]
    Z = _transform(X, 1.0)
    z1, z2, zB = Z[g + 1:g + 4], Z[g + 4:g + 8], Z[-1]
    exp_mean = (z1.mean(0) + z2.mean(0) + zB) / 3
    exp_cov = (np.cov(z1, rowvar=False) + np.cov(z2, rowvar=False)) / 2 + alpha
    assert np.linalg.matrix_rank(exp_cov - alpha) == 5 < d  # genuinely singular before alpha
    genB = f[len(y):][lab[len(y):] == 3]
    assert len(genB) == g
    _check_draws(genB, exp_mean, exp_cov)


def test_single_sample_class_zero_covariance_fallback():
    """Tail classes B, C with one sample each, close together and far from A; k=1 makes each the
    other's neighbour, whose covariance is the documented zero fallback: the draws are exactly the
    calibrated mean, with no jitter and no warning."""
    rng = np.random.default_rng(0)
    A = rng.random((30, 4)) * 0.1 + np.array([1.0, 0, 0, 0])
    B = np.array([[0.0, 0.0, 1.0, 1.0]])
    C = np.array([[0.0, 0.0, 1.0, 1.1]])
    X = np.concatenate([A, B, C])
    y = np.r_[np.zeros(30, int), 1, 2]
    gen = TailCalibGenerator(k=1, seed=0).fit(X, y)
    _, covs, nbr = gen.calibrate([30, 31])
    assert nbr[:, 0].tolist() == [2, 1]
    assert np.all(covs == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f, lab, per = gen.generate(shuffle=False)
    Z = _transform(X, 1.0)
    genB = f[32:][lab[32:] == 1]
    assert len(genB) == 29
    np.testing.assert_allclose(genB, np.broadcast_to((Z[30] + Z[31]) / 2, genB.shape), atol=1e-12)


def test_non_pd_covariance_gets_jitter_and_a_single_warning():
    """Two head classes (n > D) with a dead (always zero) feature: singular covariances, Cholesky
    fails, jitter is added, and exactly one warning is emitted for the call."""
    rng = np.random.default_rng(0)
    d = 4
    A1 = rng.random((40, d)) + np.array([2.0, 0, 0, 0])
    A2 = rng.random((40, d)) + np.array([0, 2.0, 0, 0])
    A1[:, 3] = A2[:, 3] = 0.0
    B = rng.random((3, d))
    B[:, 3] = 0.0
    X = np.concatenate([A1, A2, B])
    y = np.r_[np.zeros(40, int), np.ones(40, int), np.full(3, 2)]
    gen = TailCalibGenerator(k=2, seed=0).fit(X, y)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        f, lab, per = gen.generate(shuffle=False)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "2 class(es)" in msgs[0] and "not positive definite" in msgs[0] and "jitter" in msgs[0]
    assert per == {0: 0, 1: 0, 2: 37}
    genB = f[len(y):]
    assert np.isfinite(genB).all()
    assert np.abs(genB[:, 3]).max() < 1e-3  # jitter is tiny: the dead feature stays ~0
    assert genB[:, :3].std(0).min() > 1e-2  # the live features do vary


# ------------------------------------------------------------------------------------------ frameworks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_identical_for_same_seed(dtype):
    X, y = _data()
    X = X.astype(dtype)
    fn, ln, pn = quiet(generate, X, y, tukey=0.5, k=2, seed=11)
    ft, lt, pt = quiet(generate, torch.from_numpy(X), torch.from_numpy(y), tukey=0.5, k=2, seed=11)
    assert isinstance(ft, torch.Tensor) and isinstance(fn, np.ndarray)
    assert fn.dtype == dtype and ft.dtype == torch.from_numpy(X).dtype
    assert np.array_equal(fn, ft.numpy()) and np.array_equal(ln, lt.numpy()) and pn == pt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_in_torch_out_same_dtype_device(dtype):
    X, y = _data()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        Xt = torch.tensor(X, dtype=dtype, device=dev)
        f, lab, _ = quiet(generate, Xt, torch.tensor(y, device=dev), k=2, seed=0)
        assert f.dtype == dtype and f.device == Xt.device
        assert lab.dtype == torch.int64 and lab.device == Xt.device


def test_integer_numpy_features_give_float64():
    X, y = _data()
    f, _, _ = quiet(generate, (X * 10).astype(np.int64), y, k=2, seed=0)
    assert f.dtype == np.float64


# ------------------------------------------------------------------------------------------ order / seeds
def test_deterministic_with_seed_and_different_with_another():
    X, y = _data()
    a = quiet(generate, X, y, k=2, seed=5)
    b = quiet(generate, X, y, k=2, seed=5)
    c = quiet(generate, X, y, k=2, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_shuffle_false_order_and_shuffle_is_a_permutation():
    X, y = _data()
    f, lab, per = quiet(generate, X, y, tukey=0.8, k=2, seed=2, shuffle=False)
    n = len(y)
    np.testing.assert_allclose(f[:n], tukey_transform(X, 0.8, normalize=True), atol=1e-12)
    assert np.array_equal(lab[:n], y)
    gl = lab[n:]
    assert gl.tolist() == sorted(gl.tolist())  # grouped by class, sorted label order
    assert gl.tolist() == [7] * per[7] + [42] * per[42]
    fs, ls, _ = quiet(generate, X, y, tukey=0.8, k=2, seed=2, shuffle=True)
    assert not np.array_equal(ls, lab)
    key = lambda F, L: np.lexsort(np.c_[F, L].T)  # noqa: E731
    assert np.array_equal(f[key(f, lab)], fs[key(fs, ls)])
    assert np.array_equal(lab[key(f, lab)], ls[key(fs, ls)])


def test_small_chunks_same_structure_and_deterministic(monkeypatch):
    X, y = _data(d=8, counts=((0, 60), (1, 2), (2, 3), (3, 1), (4, 7)))
    ref = quiet(generate, X, y, k=2, seed=4, alpha=0.01, shuffle=False)
    monkeypatch.setattr(tc, "_CHUNK_ELEMS", 64)  # 8 rows per matmul chunk
    a = quiet(generate, X, y, k=2, seed=4, alpha=0.01, shuffle=False)
    b = quiet(generate, X, y, k=2, seed=4, alpha=0.01, shuffle=False)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(ref[1], a[1]) and ref[2] == a[2]
    np.testing.assert_array_equal(ref[0][:len(y)], a[0][:len(y)])


# ------------------------------------------------------------------------------------------ class API
def test_generator_reuse_sample_and_transform():
    X, y = _data()
    gen = TailCalibGenerator(tukey=0.5, k=2, seed=0).fit(X, y)
    assert gen.class_counts == {3: 40, 7: 15, 42: 4}
    assert gen.targets() == {3: 0, 7: 25, 42: 36}
    a = quiet(gen.generate)
    b = quiet(gen.generate)
    assert not np.array_equal(a[0], b[0])  # the stream continues: fresh draws each epoch
    c = quiet(TailCalibGenerator(tukey=0.5, k=2, seed=0).fit(X, y).generate)
    assert np.array_equal(a[0], c[0])  # a fresh instance with the same seed replays
    f, lab = quiet(gen.sample, {42: 9, 7: 0})
    assert f.shape == (9, X.shape[1]) and lab.tolist() == [42] * 9
    np.testing.assert_allclose(gen.transform(X[:3]), _transform(X[:3], 0.5), atol=1e-12)
    with pytest.raises(UserError, match="not one of the fitted classes"):
        gen.sample({5: 1})
    with pytest.raises(UserError, match="fit"):
        TailCalibGenerator().sample({1: 1})


def test_tukey_transform():
    x = np.array([[0.0, 0.25, 4.0]])
    np.testing.assert_allclose(tukey_transform(x, 0.5), [[0.0, 0.5, 2.0]])
    np.testing.assert_allclose(tukey_transform(x, 0.0), np.log(x + 1e-6))
    t = tukey_transform(torch.tensor(x, dtype=torch.float32), 2.0)
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor([[0.0, 0.0625, 16.0]]))
    assert np.array_equal(tukey_transform(np.array([[-1e-9, 1.0]]), 0.5), [[0.0, 1.0]])
    np.testing.assert_array_equal(tukey_transform(np.array([[-2.0, 1.0]]), 1.0), [[-2.0, 1.0]])
    with pytest.raises(UserError, match="non-negative"):
        tukey_transform(np.array([[-0.5, 1.0]]), 0.5)


# ------------------------------------------------------------------------------------------ bad input
def _poke(X, value):
    X = X.copy()
    X[2, 1] = value
    return X


@pytest.mark.parametrize(
    "mutate, kwargs, match",
    [
        (lambda X, y: (_poke(X, np.nan), y), {}, "NaN or infinite"),
        (lambda X, y: (_poke(X, -np.inf), y), {}, "NaN or infinite"),
        (lambda X, y: (X, y[:-1]), {}, "different lengths"),
        (lambda X, y: (X[:, 0], y), {}, "2-D"),
        (lambda X, y: (X[:, :, None], y), {}, "2-D"),
        (lambda X, y: (X, y), {"k": 3}, "only 2 other classes"),
        (lambda X, y: (X, y), {"k": 4, "neighbours": "all"}, "only 3 classes"),
        (lambda X, y: (X, y), {"k": 0}, "k must be an integer >= 1"),
        (lambda X, y: (X, y), {"extra": -1}, "extra must be an integer >= 0"),
        (lambda X, y: (X, y), {"alpha": float("nan")}, "alpha must be a finite number"),
        (lambda X, y: (X, y), {"alpha": -0.1}, "alpha must be >= 0"),
        (lambda X, y: (X, y), {"neighbours": "head"}, "neighbours must be"),
        (lambda X, y: (X, y + 0.5), {}, "integer class labels"),
        (lambda X, y: (X, y[:, None]), {}, "1-D"),
        (lambda X, y: (X - 1.0, y), {"tukey": 0.5, "normalize": False}, "non-negative"),
        (lambda X, y: (X[:0], y[:0]), {}, "empty"),
    ],
)
def test_bad_input_raises_user_error(mutate, kwargs, match):
    X, y = _data()
    Xb, yb = mutate(X, y)
    with pytest.raises(UserError, match=match):
        generate(Xb, yb, seed=0, **kwargs)


def test_bad_torch_input_raises_too():
    X, y = _data()
    Xt = torch.tensor(X)
    Xt[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        generate(Xt, torch.tensor(y))


def test_user_error_is_not_silent_for_single_class():
    X = np.random.default_rng(0).random((5, 3))
    with pytest.raises(UserError, match="k=1 nearest class means requested but there are only 0"):
        generate(X, np.zeros(5, int), k=1)
