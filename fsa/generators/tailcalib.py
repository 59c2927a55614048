"""TailCalib / TailCalibX feature generation (Vigneswaran et al., ICVGIP 2021).

A library on plain arrays, independent of the CLI::

    from fsa.generators.tailcalib import generate, tukey_transform, TailCalibGenerator

    feats, labels, per_class = generate(X, y, tukey=1.0, alpha=0.0, k=3, seed=0)

What is computed (DESIGN.md section 3), with the choices this module makes where the paper is
silent:

1. Rows of ``X`` are L2-normalised (``normalize=True``), then Tukey's ladder transform is applied
   (:func:`tukey_transform`: ``z ** lam``, ``log`` for ``lam == 0``).  Pooled features of a ReLU
   backbone are ``>= 0``; for ``lam != 1`` round-off negatives (``>= -1e-6`` relative to the largest
   magnitude) are clamped to 0 and clearly negative inputs are a ``UserError`` (a fractional power
   or a log of a negative number is undefined).  ``lam <= 0`` adds ``eps`` (default ``1e-6``)
   before the power / log so that exact zeros stay finite.  Evaluation must apply the same
   transform to test features: use :meth:`TailCalibGenerator.transform` or
   :func:`tukey_transform`.
2. Per-class mean and (unbiased, ``n - 1``) covariance on the transformed features.  A class with a
   single sample has no defined covariance; it is taken as the **zero matrix** (its spread is
   unknown, so it contributes none when used as a neighbour).
3. Target count per class ``T = max_c n_c + extra``.  A class with ``n_c < T`` real samples gets
   ``T - n_c`` generated ones, spread as evenly as possible over its real samples: every sample
   gets ``(T - n_c) // n_c`` and ``(T - n_c) % n_c`` randomly chosen samples (seeded) get one more.
4. Calibration of real sample ``x_i`` of class ``c``: the ``k`` class means nearest to ``x_i``
   (Euclidean) **among the other classes** (``neighbours="others"``, the default: the paper
   transfers statistics from other, better-populated classes; a tail class's own estimate is the
   unreliable one).  ``neighbours="all"`` lets the own class compete too.
   calibrated mean = mean of the ``k`` neighbour means and ``x_i`` (``k + 1`` vectors);
   calibrated covariance = mean of the ``k`` neighbour covariances ``+ alpha``, where ``alpha`` is
   added to **every entry** as in the authors' release (``alpha * 1 1^T``; default 0).  Note that
   this term is positive semi-definite and does not regularise the diagonal.
5. Draws ``N(calibrated mean, calibrated cov)`` without materialising any calibrated covariance.
   The calibrated covariance of neighbour set ``S`` is ``(1/k) sum_{c in S} cov_c + alpha 1 1^T``,
   so with per-class square roots ``F_c F_c^T = cov_c`` a draw is
   ``mean + (1/sqrt(k)) sum_{c in S} F_c w_c + sqrt(alpha) u 1`` (independent standard normals):
   exactly the calibrated Gaussian.  ``F_c`` is the centred data ``(Z_c - mean_c)^T / sqrt(n_c-1)``
   when ``n_c <= D`` (exact even though such a covariance is singular) and the Cholesky factor of
   ``cov_c`` otherwise (batched ``torch.linalg.cholesky_ex`` over classes).  One factor per class
   replaces one Cholesky per distinct neighbour set (~6,300 sets at CIFAR-100-LT scale, k=3), and
   the noise is one batched matmul per neighbour class: no Python-level work per generated point.
   A class covariance with ``n_c > D`` that is not numerically positive definite (e.g. a dead ReLU
   unit gives a zero-variance dimension) gets ``eps * I`` added, ``eps`` growing 10x from
   ``1e-10 x`` its mean variance until Cholesky succeeds; one ``RuntimeWarning`` per call reports
   it.  ``alpha`` must be ``>= 0``.

Determinism and frameworks: all math runs on the CPU in float64 with a ``torch.Generator`` seeded
by ``seed``; inputs are converted there and the results converted back.  Therefore numpy and torch
inputs holding the same values give **bit-identical** outputs for the same seed, on any input
device.  Output follows the input: numpy in -> numpy out, torch in -> torch out on the same device;
features keep the input's floating dtype (float64 for integer input), labels are int64 and keep the
input's label values (they need not be ``0..C-1``).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from utils.errors import UserError

__all__ = ["generate", "tukey_transform", "TailCalibGenerator"]

# Work-space bound (number of float64 elements) for one chunk of stacked covariances / padded draws.
_CHUNK_ELEMS = 1 << 24
_NEG_TOL = 1e-6
_JITTER_START = 1e-10  # relative to the covariance scale
_JITTER_STEPS = 11  # up to 1.0 x scale


# --------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------
class _Spec:
    """Remembers the framework / device / dtype of the user's X so that outputs can match."""

    def __init__(self, X):
        self.is_torch = isinstance(X, torch.Tensor)
        if self.is_torch:
            self.device = X.device
            self.dtype = X.dtype if X.dtype.is_floating_point else torch.float64
        else:
            arr = np.asarray(X)
            self.device = None
            self.dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)

    def features(self, t: torch.Tensor):
        if self.is_torch:
            return t.to(device=self.device, dtype=self.dtype)
        return t.numpy().astype(self.dtype, copy=False)

    def labels(self, t: torch.Tensor):
        if self.is_torch:
            return t.to(device=self.device, dtype=torch.int64)
        return t.numpy().astype(np.int64, copy=False)


def _as_float64(X, name: str = "X") -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise UserError(f"{name} must hold real numbers, got a complex tensor.")
        return X.detach().to(device="cpu", dtype=torch.float64)
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists etc.
        raise UserError(f"{name} could not be read as a numeric array: {exc}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise UserError(f"{name} must be a real numeric array, got dtype {arr.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))


def _as_labels(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        t = y.detach().to("cpu")
    else:
        try:
            arr = np.asarray(y)
        except Exception as exc:
            raise UserError(f"y could not be read as an array of labels: {exc}") from None
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise UserError(f"y must hold integer class labels, got dtype {arr.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise UserError("y must hold integer class labels; found non-integer values.")
    elif t.dtype == torch.bool or t.is_complex():
        raise UserError(f"y must hold integer class labels, got dtype {t.dtype}.")
    return t.to(torch.int64)


def _check_params(tukey, alpha, k, extra, neighbours, eps):
    for name, v in (("tukey", tukey), ("alpha", alpha), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise UserError(f"{name} must be a finite number, got {v!r}.")
    if eps <= 0:
        raise UserError(f"eps must be > 0, got {eps!r}.")
    if alpha < 0:
        raise UserError(f"alpha must be >= 0 (it is added to every covariance entry), got {alpha!r}.")
    for name, v, lo in (("k", k, 1), ("extra", extra, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}.")
    if neighbours not in ("others", "all"):
        raise UserError(f"neighbours must be 'others' or 'all', got {neighbours!r}.")


# --------------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------------
def _tukey64(x: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    if lam == 1:
        return x
    scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
    if x.numel() and float(x.min()) < -_NEG_TOL * scale:
        raise UserError(
            f"Tukey's ladder transform with lambda={lam} needs non-negative features (e.g. pooled "
            f"features after a ReLU), but the minimum is {float(x.min()):.4g}. Use tukey=1.0 "
            "(no transform) for signed features."
        )
    x = x.clamp_min(0.0)
    if lam == 0:
        return torch.log(x + eps)
    if lam < 0:
        return (x + eps) ** lam
    return x**lam


def tukey_transform(x, lam: float = 1.0, *, eps: float = 1e-6, normalize: bool = False):
    """Tukey's ladder of powers: ``x ** lam`` (``log(x + eps)`` for ``lam == 0``).

    Accepts a numpy array or a torch tensor and returns the same kind (same device; floating dtype
    kept).  ``normalize=True`` first L2-normalises the rows of a 2-D input, exactly as
    :func:`generate` does, so ``tukey_transform(X_test, lam, normalize=True)`` maps test features
    into the space the generated features live in.  For ``lam != 1`` the input must be
    non-negative (tiny round-off negatives are clamped); ``lam < 0`` also adds ``eps``.
    """
    _check_params(lam, 0.0, 1, 0, "others", eps)
    spec = _Spec(x)
    t = _as_float64(x, "x")
    if normalize:
        if t.dim() != 2:
            raise UserError(f"normalize=True needs a 2-D array [N, D], got shape {tuple(t.shape)}.")
        t = _l2_normalize(t)
    return spec.features(_tukey64(t, float(lam), float(eps)))


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------
class TailCalibGenerator:
    """Class statistics + calibrated sampling, reusable across calls (TailCalibX re-fits every epoch).

    ``fit(X, y)`` transforms the features and stores per-class means (covariances are computed
    lazily, only for classes that serve as neighbours, and cached).  ``generate()`` balances every
    class to ``max count + extra``; ``sample({label: n})`` draws ``n`` calibrated features for the
    given classes.  The internal ``torch.Generator`` is seeded once in ``__init__`` and its stream
    continues across calls: successive calls give fresh draws, a new instance with the same seed
    replays them.  See the module docstring for all definitions.
    """

    def __init__(self, tukey: float = 1.0, alpha: float = 0.0, k: int = 3, *, extra: int = 0,
                 seed: Optional[int] = None, normalize: bool = True, neighbours: str = "others",
                 eps: float = 1e-6):
        _check_params(tukey, alpha, k, extra, neighbours, eps)
        self.tukey = float(tukey)
        self.alpha = float(alpha)
        self.k = int(k)
        self.extra = int(extra)
        self.normalize = bool(normalize)
        self.neighbours = neighbours
        self.eps = float(eps)
        self.seed = seed
        self._gen = torch.Generator(device="cpu")
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(int(seed))
        self._fitted = False

    # ---------------------------------------------------------------- fitting
    def fit(self, X, y) -> "TailCalibGenerator":
        is_tensor = isinstance(X, torch.Tensor)
        ndim = X.dim() if is_tensor else np.ndim(X)
        if ndim != 2:
            shape = tuple(X.shape) if is_tensor else np.shape(X)
            raise UserError(f"X must be a 2-D array of features [N, D], got shape {shape}.")
        Z = _as_float64(X)
        labels = _as_labels(y)
        if labels.dim() != 1:
            raise UserError(f"y must be a 1-D array of labels [N], got shape {tuple(labels.shape)}.")
        n, d = Z.shape
        if labels.shape[0] != n:
            raise UserError(f"X and y have different lengths: X has {n} rows, y has {labels.shape[0]}.")
        if n == 0 or d == 0:
            raise UserError(f"X is empty (shape {tuple(Z.shape)}); need at least one sample and one feature.")
        if not bool(torch.isfinite(Z).all()):
            bad = int((~torch.isfinite(Z)).any(dim=1).sum())
            raise UserError(f"X contains NaN or infinite values (in {bad} of {n} rows); "
                            "clean the features first.")

        if self.normalize:
            Z = _l2_normalize(Z)
        Z = _tukey64(Z, self.tukey, self.eps)
        if not bool(torch.isfinite(Z).all()):
            raise UserError(f"Tukey's transform with lambda={self.tukey} produced non-finite values; "
                            "use a larger eps or a lambda >= 0.")

        classes, yi = torch.unique(labels, sorted=True, return_inverse=True)
        C = classes.numel()
        available = C - 1 if self.neighbours == "others" else C
        if self.k > available:
            what = "other classes" if self.neighbours == "others" else "classes"
            raise UserError(f"k={self.k} nearest class means requested but there are only {available} "
                            f"{what} ({C} classes in y); use k <= {available}.")
        counts = torch.bincount(yi, minlength=C)
        means = torch.zeros(C, d, dtype=torch.float64).index_add_(0, yi, Z) / counts[:, None]

        order = torch.argsort(yi, stable=True)  # rows grouped by class, input order inside
        starts = torch.zeros(C + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(counts, 0)

        self._spec = _Spec(X)
        self._Z, self._yi, self._classes = Z, yi, classes
        self._counts, self._means = counts, means
        self._order, self._starts = order, starts
        self._cov_cache: Dict[int, torch.Tensor] = {}
        self._factor_cache: Dict[int, torch.Tensor] = {}
        var = Z.var(dim=0, unbiased=False).mean().item() if n > 1 else 0.0
        self._scale = var if var > 0 else 1.0  # fallback jitter scale for all-zero covariances
        self._fitted = True
        return self

    def _need_fit(self):
        if not self._fitted:
            raise UserError("TailCalibGenerator.fit(X, y) must be called before sampling.")

    # ---------------------------------------------------------------- inspection
    @property
    def classes(self):
        """The distinct label values, sorted (in the fitted framework)."""
        self._need_fit()
        return self._spec.labels(self._classes)

    @property
    def class_counts(self) -> Dict[int, int]:
        self._need_fit()
        return {int(c): int(n) for c, n in zip(self._classes.tolist(), self._counts.tolist())}

    @property
    def class_means(self):
        """[C, D] per-class means of the transformed features, rows in ``classes`` order."""
        self._need_fit()
        return self._spec.features(self._means)

    def transform(self, X):
        """Normalise (if configured) and Tukey-transform new features, e.g. test features."""
        return tukey_transform(X, self.tukey, eps=self.eps, normalize=self.normalize)

    def targets(self) -> Dict[int, int]:
        """Number of samples :meth:`generate` adds per class: ``max count + extra - n_c``."""
        self._need_fit()
        T = int(self._counts.max()) + self.extra
        return {int(c): T - int(n) for c, n in zip(self._classes.tolist(), self._counts.tolist())}

    def calibrate(self, indices):
        """Calibrated ``(means [m, D], covariances [m, D, D], neighbour labels [m, k])`` of real rows.

        ``indices`` index the rows of the fitted ``X``.  Returned in the fitted framework; meant for
        inspection and tests (sampling never materialises per-sample covariances).
        """
        self._need_fit()
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        nbr = self._nearest(idx)
        cal_mean = (self._means[nbr].sum(1) + self._Z[idx]) / (self.k + 1)
        cov = self._set_covs(nbr)
        return (self._spec.features(cal_mean), self._spec.features(cov),
                self._spec.labels(self._classes[nbr]))

    # ---------------------------------------------------------------- statistics
    def _class_cov(self, c: int, cache: bool = True) -> torch.Tensor:
        cov = self._cov_cache.get(c)
        if cov is None:
            rows = self._order[self._starts[c]:self._starts[c + 1]]
            n = rows.numel()
            if n < 2:  # undefined: documented zero-covariance fallback
                cov = torch.zeros(self._Z.shape[1], self._Z.shape[1], dtype=torch.float64)
            else:
                Xc = self._Z[rows] - self._means[c]
                cov = (Xc.T @ Xc) / (n - 1)
            if cache:
                self._cov_cache[c] = cov
        return cov

    def _set_covs(self, sets: torch.Tensor) -> torch.Tensor:
        """[S, k] class-index sets -> [S, D, D] calibrated covariances (mean of k + alpha everywhere)."""
        d = self._Z.shape[1]
        out = torch.zeros(sets.shape[0], d, d, dtype=torch.float64)
        for j in range(sets.shape[1]):
            for c in torch.unique(sets[:, j]).tolist():
                out[sets[:, j] == c] += self._class_cov(c)
        out /= sets.shape[1]
        if self.alpha != 0.0:
            out += self.alpha
        return out

    def _nearest(self, idx: torch.Tensor) -> torch.Tensor:
        """[m] row indices -> [m, k] class indices of the nearest class means, sorted ascending."""
        if idx.numel() == 0:
            return torch.zeros(0, self.k, dtype=torch.int64)
        dist = torch.cdist(self._Z[idx], self._means)
        if self.neighbours == "others":
            dist[torch.arange(idx.numel()), self._yi[idx]] = math.inf
        nbr = torch.topk(dist, self.k, dim=1, largest=False).indices
        return torch.sort(nbr, dim=1).values

    def _cholesky(self, covs: torch.Tensor, report: dict) -> torch.Tensor:
        """Batched Cholesky; matrices that fail get eps*I with eps growing 10x until they pass."""
        L, info = torch.linalg.cholesky_ex(covs)
        bad = torch.nonzero(info != 0).flatten()
        if bad.numel() == 0:
            return L
        d = covs.shape[-1]
        eye = torch.eye(d, dtype=covs.dtype)
        diag = torch.diagonal(covs[bad], dim1=-2, dim2=-1).mean(-1)
        scale = torch.where(diag > 0, diag, torch.full_like(diag, self._scale))
        report["matrices"] += bad.numel()
        pending = bad
        for step in range(_JITTER_STEPS):
            jit = scale * (_JITTER_START * 10.0**step)
            Lb, info_b = torch.linalg.cholesky_ex(covs[pending] + jit[:, None, None] * eye)
            ok = info_b == 0
            if bool(ok.any()):
                L[pending[ok]] = Lb[ok]
                report["max_jitter"] = max(report["max_jitter"], float(jit[ok].max()))
            pending, scale = pending[~ok], scale[~ok]
            if pending.numel() == 0:
                return L
        raise UserError(  # unreachable for real covariance matrices; kept as a guard
            f"{pending.numel()} class covariance matrices stay far from positive definite even after "
            f"adding {_JITTER_START * 10.0 ** (_JITTER_STEPS - 1):g} x their scale to the diagonal."
        )

    def _factors(self, classes, report: dict) -> Dict[int, torch.Tensor]:
        """Square-root factors ``F_c`` [D, r_c] with ``F_c F_c^T = cov_c`` (cached per fit).

        ``n_c <= D``: the centred data itself, ``(Z_c - mean_c)^T / sqrt(n_c - 1)`` (exact, also for
        the rank-deficient covariance of a small class, r_c = n_c); ``n_c > D``: the Cholesky factor
        of ``cov_c`` (r_c = D), batched over classes, with jitter if not positive definite.
        Single-sample classes have the zero covariance and no factor (they contribute nothing).
        """
        d = self._Z.shape[1]
        chol = []
        for c in classes:
            if c in self._factor_cache:
                continue
            n = int(self._counts[c])
            if n < 2:
                continue
            if n <= d:
                rows = self._order[self._starts[c]:self._starts[c + 1]]
                self._factor_cache[c] = (self._Z[rows] - self._means[c]).T / math.sqrt(n - 1)
            else:
                chol.append(c)
        step = max(1, _CHUNK_ELEMS // (d * d))
        for a in range(0, len(chol), step):
            group = chol[a:a + step]
            covs = torch.stack([self._class_cov(c, cache=False) for c in group])
            L = self._cholesky(covs, report)
            for c, f in zip(group, L):
                self._factor_cache[c] = f
        return {c: self._factor_cache[c] for c in classes if c in self._factor_cache}

    # ---------------------------------------------------------------- sampling
    def _draw(self, n_per_class: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """n_per_class: [C] int64 counts -> (features [G, D] float64, class indices [G]).

        Output grouped by class (classes in sorted label order), inside a class by the input order
        of the real sample the point was calibrated on, that sample's draws contiguous.

        A point calibrated on neighbour set S = {c_1..c_k} is
        ``mean + (1/sqrt(k)) sum_j F_{c_j} w_j + sqrt(alpha) u 1`` with independent standard normal
        ``w_j``, ``u``: exactly ``N(mean, (1/k) sum_j cov_{c_j} + alpha 1 1^T)``.  This needs one
        factor per *class* instead of one Cholesky per distinct neighbour set (thousands of them
        at CIFAR-100-LT scale), and the work is one batched matmul per neighbour class.
        """
        d = self._Z.shape[1]
        # 1. spread each class's budget over its real samples (positions in class-then-input order)
        src_counts = torch.zeros(self._Z.shape[0], dtype=torch.int64)
        for c in torch.nonzero(n_per_class > 0).flatten().tolist():
            a, b = int(self._starts[c]), int(self._starts[c + 1])
            g, n = int(n_per_class[c]), b - a
            cnt = torch.full((n,), g // n, dtype=torch.int64)
            rem = g % n
            if rem:
                cnt += (torch.randperm(n, generator=self._gen) < rem).to(torch.int64)
            src_counts[a:b] = cnt
        active = torch.nonzero(src_counts).flatten()
        counts = src_counts[active]  # draws per source
        rows = self._order[active]  # real-sample row of each source
        G = int(counts.sum())
        if G == 0:
            return torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        M = rows.numel()

        # 2. calibration per source: neighbour classes and calibrated mean
        nbr = self._nearest(rows)
        cal_mean = (self._means[nbr].sum(1) + self._Z[rows]) / (self.k + 1)
        src_of_pt = torch.repeat_interleave(torch.arange(M), counts)
        pt_start = torch.cumsum(counts, 0) - counts

        # 3. noise: for every neighbour class c, all points with c in their set in one matmul
        report = {"matrices": 0, "max_jitter": 0.0}
        factors = self._factors(torch.unique(nbr).tolist(), report)
        out = torch.zeros(G, d, dtype=torch.float64)
        pair_cls, order = torch.sort(nbr.reshape(-1), stable=True)
        pair_src = torch.arange(M).repeat_interleave(self.k)[order]
        cls_vals, cls_n = torch.unique_consecutive(pair_cls, return_counts=True)
        first = 0
        for c, n in zip(cls_vals.tolist(), cls_n.tolist()):
            srcs = pair_src[first:first + n]
            first += n
            f = factors.get(c)
            if f is None:  # zero covariance
                continue
            cnt = counts[srcs]
            m = int(cnt.sum())
            offs = torch.cumsum(cnt, 0) - cnt
            pts = torch.repeat_interleave(pt_start[srcs] - offs, cnt) + torch.arange(m)
            r = f.shape[1]
            step = max(1, _CHUNK_ELEMS // max(r, d))
            for a in range(0, m, step):
                p = pts[a:a + step]
                w = torch.randn(p.numel(), r, dtype=torch.float64, generator=self._gen)
                out.index_add_(0, p, w @ f.T)
        out /= math.sqrt(self.k)
        if self.alpha > 0:
            out += math.sqrt(self.alpha) * torch.randn(G, 1, dtype=torch.float64, generator=self._gen)
        out += cal_mean[src_of_pt]
        if report["matrices"]:
            warnings.warn(
                f"TailCalib: the covariance of {report['matrices']} class(es) was not positive "
                f"definite; added jitter eps*I (eps up to {report['max_jitter']:.3g}) before the "
                "Cholesky factorisation.",
                RuntimeWarning,
                stacklevel=3,
            )
        return out, self._yi[rows][src_of_pt]

    def sample(self, n_per_class: Mapping[int, int]):
        """Draw ``n`` calibrated features for each ``{label: n}``; returns ``(features, labels)``.

        Draws of a class are spread evenly over its real samples (module docstring, step 3).
        """
        self._need_fit()
        lookup = {int(c): i for i, c in enumerate(self._classes.tolist())}
        want = torch.zeros(self._classes.numel(), dtype=torch.int64)
        for lab, n in dict(n_per_class).items():
            if int(lab) not in lookup:
                raise UserError(f"sample(): label {lab!r} is not one of the fitted classes "
                                f"{sorted(lookup)[:20]}.")
            if isinstance(n, bool) or int(n) != n or n < 0:
                raise UserError(f"sample(): count for label {lab!r} must be an integer >= 0, got {n!r}.")
            want[lookup[int(lab)]] = int(n)
        feats, ci = self._draw(want)
        return self._spec.features(feats), self._spec.labels(self._classes[ci])

    def generate(self, *, shuffle: bool = True):
        """Balance every class to ``max count + extra``.

        Returns ``(features, labels, generated_per_class)``: the real (transformed) features plus
        the generated ones.  ``shuffle=False``: real rows first in input order, then the generated
        ones grouped by class (sorted label order); ``shuffle=True``: one seeded permutation of all.
        ``generated_per_class`` maps every label to the number of generated samples (0 included).
        """
        self._need_fit()
        T = int(self._counts.max()) + self.extra
        feats, ci = self._draw(T - self._counts)
        X = torch.cat([self._Z, feats])
        yi = torch.cat([self._yi, ci])
        if shuffle:
            perm = torch.randperm(X.shape[0], generator=self._gen)
            X, yi = X[perm], yi[perm]
        per_class = {int(c): T - int(n) for c, n in zip(self._classes.tolist(), self._counts.tolist())}
        return self._spec.features(X), self._spec.labels(self._classes[yi]), per_class


def generate(X, y, *, tukey: float = 1.0, alpha: float = 0.0, k: int = 3, extra: int = 0,
             seed: Optional[int] = None, shuffle: bool = True, normalize: bool = True,
             neighbours: str = "others", eps: float = 1e-6):
    """TailCalib on plain arrays: ``(features, labels, generated_per_class)``.

    ``X``: [N, D] numpy array or torch tensor (any device); ``y``: [N] integer labels with any
    values.  Every class is filled up to ``max class count + extra`` with features drawn from
    calibrated Gaussians (see the module docstring for every definition and choice).  Returns
    the real transformed features followed by (or, with ``shuffle``, permuted together with) the
    generated ones, their labels (same label values as ``y``), and ``{label: number generated}``.
    Same seed -> same output, identical for numpy and torch inputs holding the same values.
    Bad input raises :class:`utils.errors.UserError`.
    """
    gen = TailCalibGenerator(tukey=tukey, alpha=alpha, k=k, extra=extra, seed=seed,
                             normalize=normalize, neighbours=neighbours, eps=eps)
    return gen.fit(X, y).generate(shuffle=shuffle)
