"""Tests for the release-parity parts of fsa.generators.tailcalib: the drop-in class ``TailCalib``
(the authors' pip package ``tailcalib`` API) and the options ``ridge``, ``stats_before_tukey`` and
``renormalize`` of the library functions."""


import numpy as np
import pytest
import torch

import fsa.generators.tailcalib_dropin as tc
from fsa.generators.tailcalib_api import TailCalibGenerator, generate, tukey_transform
from fsa.generators.tailcalib_dropin import TailCalib
from utils.errors import UserError

COUNTS = (9, 5, 3, 2)  # labels 0..3, as the release expects


def _data(seed=0, d=5, counts=COUNTS):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.random((n, d)) + 0.3 * i for i, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


def _norm(Z):
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ drop-in API
@pytest.mark.parametrize("extra", [0, 3])
def test_dropin_shapes_balance_and_generated_dict(extra):
    X, y = _data()
    feat, lab, gen = TailCalib("numpy").generate(X=X, y=y, extra_points=extra, seed=0)
    T = max(COUNTS) + extra
    assert isinstance(feat, np.ndarray) and isinstance(lab, np.ndarray) and lab.dtype == np.int64
    assert feat.shape == (len(COUNTS) * T, X.shape[1]) and lab.shape == (len(COUNTS) * T,)
    vals, cnt = np.unique(lab, return_counts=True)
    assert vals.tolist() == [0, 1, 2, 3] and cnt.tolist() == [T] * 4  # every class reaches the target
    # generated: only classes that got points (the head class only with extra_points), sorted keys
    expect = {c: T - n for c, n in enumerate(COUNTS) if T - n > 0}
    assert list(gen) == sorted(expect)
    assert {c: v.shape for c, v in gen.items()} == {c: (n, X.shape[1]) for c, n in expect.items()}
    assert all(isinstance(v, np.ndarray) for v in gen.values())
    if extra == 0:
        assert 0 not in gen


def test_dropin_real_rows_first_and_generated_rows_match():
    X, y = _data()
    feat, lab, gen = TailCalib("numpy").generate(X, y, 0.9, 0.0, 2, 0, False, seed=1)
    n = len(y)
    np.testing.assert_allclose(feat[:n], X**0.9, rtol=0, atol=1e-12)  # Tukey only, no L2 (pip release)
    assert np.array_equal(lab[:n], y)
    assert np.array_equal(feat[n:], np.concatenate([gen[c] for c in sorted(gen)]))
    assert lab[n:].tolist() == sum(([c] * len(gen[c]) for c in sorted(gen)), [])


def test_dropin_shuffle_is_the_library_generate_with_release_settings():
    X, y = _data()
    a = TailCalib("numpy")
    f0, l0, g0 = a.generate(X=X, y=y, topk=2, seed=4, shuffle=False)
    f1, l1, g1 = a.generate(X=X, y=y, topk=2, seed=4)
    assert not np.array_equal(l0, l1)
    assert all(np.array_equal(g0[c], g1[c]) for c in g0)  # shuffling draws nothing before the points
    key = lambda F, L: np.lexsort(np.c_[F, L].T)  # noqa: E731
    assert np.array_equal(f0[key(f0, l0)], f1[key(f1, l1)]) and np.array_equal(l0[key(f0, l0)], l1[key(f1, l1)])
    ref = generate(X, y, tukey=0.9, alpha=0.0, k=2, seed=4, normalize=False, neighbours="all", ridge=1e-4,
                   stats_before_tukey=True)
    assert np.array_equal(ref[0], f1) and np.array_equal(ref[1], l1)


@pytest.mark.parametrize("torch_name", ["torch", "pytorch", "PyTorch"])
def test_dropin_numpy_and_torch_engines_identical(torch_name):
    X, y = _data()
    kw = dict(tukey_value=0.7, alpha=0.01, topk=2, extra_points=2, seed=7)
    fn, ln, gn = TailCalib("numpy").generate(X=X, y=y, **kw)
    ft, lt, gt = TailCalib(base_engine=torch_name).generate(X=torch.from_numpy(X), y=torch.from_numpy(y), **kw)
    assert isinstance(ft, torch.Tensor) and isinstance(lt, torch.Tensor) and lt.dtype == torch.int64
    assert all(isinstance(v, torch.Tensor) for v in gt.values())
    assert torch.equal(ft, torch.from_numpy(fn)) and torch.equal(lt, torch.from_numpy(ln))
    assert list(gn) == list(gt) and all(torch.equal(gt[c], torch.from_numpy(gn[c])) for c in gn)
    # the engine decides the output type, whatever the input: numpy in -> tensors out for torch
    fx, lx, gx = TailCalib(torch_name).generate(X=X, y=y, **kw)
    assert torch.equal(fx, ft) and torch.equal(lx, lt)
    fy, _, gy = TailCalib("numpy").generate(X=torch.from_numpy(X), y=torch.from_numpy(y), **kw)
    np.testing.assert_array_equal(fy, fn)


def test_dropin_torch_keeps_dtype_and_device():
    X, y = _data()
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        Xt = torch.tensor(X, dtype=torch.float32, device=dev)
        f, lab, gen = TailCalib("torch").generate(X=Xt, y=torch.tensor(y, device=dev), seed=0)
        assert f.dtype == torch.float32 and f.device == Xt.device and lab.device == Xt.device
        assert all(v.dtype == torch.float32 and v.device == Xt.device for v in gen.values())


def test_dropin_seed_determinism_and_global_rng_when_none():
    X, y = _data()
    a = TailCalib("numpy")
    r1, r2, r3 = (a.generate(X=X, y=y, seed=s) for s in (5, 5, 6))
    assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])
    assert not np.array_equal(r1[0], r3[0])
    # seed=None: drawn from the engine's global RNG, so global seeding repeats a run (as with the release)
    np.random.seed(3)
    n1 = a.generate(X=X, y=y)
    np.random.seed(3)
    n2 = a.generate(X=X, y=y)
    n3 = a.generate(X=X, y=y)
    assert np.array_equal(n1[0], n2[0]) and not np.array_equal(n2[0], n3[0])
    t = TailCalib("torch")
    torch.manual_seed(3)
    t1 = t.generate(X=torch.from_numpy(X), y=torch.from_numpy(y))
    torch.manual_seed(3)
    t2 = t.generate(X=torch.from_numpy(X), y=torch.from_numpy(y))
    assert torch.equal(t1[0], t2[0])


def test_dropin_convert_others():
    X, y = _data()
    Xt = np.random.default_rng(1).random((4, X.shape[1]))
    a = TailCalib("numpy")
    np.testing.assert_allclose(a.convert_others(Xt), Xt)  # before generate: tukey 1.0 (release default)
    a.generate(X=X, y=y, tukey_value=0.5, seed=0)
    np.testing.assert_allclose(a.convert_others(Xt), Xt**0.5, atol=1e-12)  # last generate()'s value
    np.testing.assert_allclose(a.convert_others(Xt, tukey_value=2.0), Xt**2, atol=1e-12)
    Xc, yc = a.convert_others(X=Xt, y=[0, 1, 2, 3])  # the release README's call
    np.testing.assert_allclose(Xc, Xt**0.5, atol=1e-12)
    assert yc.tolist() == [0, 1, 2, 3]
    # the training pipeline's space: normalise -> Tukey -> normalise, for train and test rows alike
    a.generate(X=X, y=y, tukey_value=0.5, seed=0, normalize=True, renormalize=True)
    np.testing.assert_allclose(a.convert_others(Xt), _norm(_norm(Xt) ** 0.5), atol=1e-12)
    t = TailCalib("torch")
    assert isinstance(t.convert_others(Xt), torch.Tensor)


def test_all_exports_dropin():
    assert "TailCalib" in tc.__all__ and repr(TailCalib("pytorch")) == "TailCalib(base_engine='pytorch')"


# ------------------------------------------------------------------------------------------ options: oracles
def test_release_calibration_oracle_stats_before_tukey_own_class_and_ridge():
    """Release: class statistics on the features *before* Tukey, the transformed sample, neighbours
    among all classes, calibrated covariance = mean of k covariances + alpha (every entry) + ridge I."""
    X, y = _data(d=3)
    lam, alpha, ridge, k = 0.5, 0.02, 0.3, 2
    gen = TailCalibGenerator(tukey=lam, alpha=alpha, k=k, normalize=False, neighbours="all", ridge=ridge,
                             stats_before_tukey=True, seed=0).fit(X, y)
    means = np.stack([X[y == c].mean(0) for c in range(4)])  # raw features
    covs = np.stack([np.cov(X[y == c], rowvar=False) for c in range(4)])
    for i in range(len(y)):
        x = X[i] ** lam
        near = np.sort(np.argsort(np.linalg.norm(means - x, axis=1))[:k])
        m, c, nbr = gen.calibrate([i])
        assert nbr[0].tolist() == near.tolist()
        np.testing.assert_allclose(m[0], (means[near].sum(0) + x) / (k + 1), atol=1e-12)
        np.testing.assert_allclose(c[0], covs[near].mean(0) + alpha + ridge * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(gen.class_means, means, atol=1e-12)
    # the default fits the statistics after the transform
    default = TailCalibGenerator(tukey=lam, k=k, normalize=False, neighbours="all").fit(X, y)
    np.testing.assert_allclose(default.class_means, np.stack([(X[y == c] ** lam).mean(0) for c in range(4)]),
                               atol=1e-12)


def test_stats_before_tukey_is_a_no_op_for_tukey_one():
    X, y = _data()
    a = generate(X, y, tukey=1.0, k=2, seed=2, stats_before_tukey=True)
    b = generate(X, y, tukey=1.0, k=2, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = generate(X, y, tukey=0.5, k=2, seed=2, stats_before_tukey=True)
    d = generate(X, y, tukey=0.5, k=2, seed=2)
    assert not np.allclose(c[0][len(y):], d[0][len(y):])


def test_ridge_is_the_only_spread_of_zero_covariance_classes():
    """Single-sample classes have zero covariance: without ridge every draw *is* the calibrated mean
    (hand-computed); with ridge r the draws are that mean + N(0, r I)."""
    X = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    y = np.array([0, 1, 2])
    g = 4000
    f0, l0, per = generate(X, y, k=1, extra=g, seed=0, normalize=False, shuffle=False)
    assert per == {0: g, 1: g, 2: g}
    # nearest other class mean (squared distances 0-1: 5, 0-2: 10, 1-2: 13), then (mean + x) / 2
    oracle = {0: (X[1] + X[0]) / 2, 1: (X[0] + X[1]) / 2, 2: (X[0] + X[2]) / 2}
    for c in range(3):
        np.testing.assert_array_equal(f0[3:][l0[3:] == c], np.tile(oracle[c], (g, 1)))
    r = 0.04
    f1, l1, _ = generate(X, y, k=1, extra=g, seed=0, normalize=False, shuffle=False, ridge=r)
    for c in range(3):
        dev = (f1[3:][l1[3:] == c] - oracle[c]) / np.sqrt(r)  # should be N(0, I)
        assert np.all(np.abs(dev.mean(0)) < 5 / np.sqrt(g))
        np.testing.assert_allclose(np.cov(dev, rowvar=False), np.eye(3), atol=0.15)


def test_ridge_adds_to_the_covariance_of_draws():
    rng = np.random.default_rng(0)
    d, g = 3, 20000
    A = rng.random((g + 1, d)) * np.array([1.0, 0.5, 0.2])
    X = np.concatenate([A, rng.random((1, d)) + 1.0])
    y = np.r_[np.zeros(g + 1, int), 1]
    r = 0.05
    f, lab, _ = generate(X, y, k=1, seed=1, normalize=False, shuffle=False, ridge=r)
    draws = f[len(y):]
    assert len(draws) == g and (lab[len(y):] == 1).all()
    exp = np.cov(A, rowvar=False) + r * np.eye(d)
    sd = np.sqrt(np.outer(np.diag(exp), np.diag(exp)) + exp**2) / np.sqrt(g)
    assert np.all(np.abs(np.cov(draws, rowvar=False) - exp) < 5 * sd)


def test_renormalize_oracle():
    X, y = _data()
    lam = 0.5
    f, lab, per = generate(X, y, tukey=lam, k=2, seed=0, shuffle=False, renormalize=True)
    n = len(y)
    np.testing.assert_allclose(f[:n], _norm(_norm(X) ** lam), atol=1e-12)  # normalise -> Tukey -> normalise
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-12)  # generated rows too
    plain, _, _ = generate(X, y, tukey=lam, k=2, seed=0, shuffle=False)
    np.testing.assert_allclose(f[n:], _norm(plain[n:]), atol=1e-12)  # same draws, then normalised
    np.testing.assert_allclose(tukey_transform(X, lam, normalize=True, renormalize=True), f[:n], atol=1e-12)
    gen = TailCalibGenerator(tukey=lam, k=2, seed=0, renormalize=True).fit(X, y)
    np.testing.assert_allclose(gen.transform(X), f[:n], atol=1e-12)
    s, _ = gen.sample({3: 4})
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-12)


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("engine", ["jax", "", None, 1])
def test_bad_engine(engine):
    with pytest.raises(UserError, match="base_engine must be 'numpy' or 'torch'"):
        TailCalib(base_engine=engine)


@pytest.mark.parametrize("kwargs, match", [
    ({"topk": 0}, "topk must be an integer >= 1"),
    ({"topk": 1.5}, "topk must be an integer"),
    ({"topk": 5}, r"topk=5 nearest class means requested but there are only 4 classes .*use topk <= 4"),
    ({"extra_points": -1}, "extra_points must be an integer >= 0"),
    ({"tukey_value": "0.9"}, "tukey_value must be a finite number"),
    ({"alpha": -0.5}, "alpha must be >= 0"),
    ({"shuffle": "yes"}, "shuffle must be True or False"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": 1.0}, "seed must be an integer >= 0"),
    ({"ridge": -1e-4}, "ridge must be >= 0"),
    ({"neighbours": "near"}, "neighbours must be"),
    ({"renormalize": "no"}, "renormalize must be True or False"),
])
def test_dropin_bad_arguments(kwargs, match):
    X, y = _data()
    with pytest.raises(UserError, match=match):
        TailCalib("numpy").generate(X=X, y=y, **kwargs)


def test_dropin_bad_data():
    X, y = _data()
    with pytest.raises(UserError, match="different lengths"):
        TailCalib("torch").generate(X=torch.from_numpy(X), y=torch.from_numpy(y[:-1]))
    with pytest.raises(UserError, match="non-negative"):  # default tukey_value 0.9 on signed features
        TailCalib("numpy").generate(X=X - 1.0, y=y)
    with pytest.raises(UserError, match="one label per row"):
        TailCalib("numpy").convert_others(X[:3], y=[0, 1])
