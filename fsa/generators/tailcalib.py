"""TailCalib / TailCalibX feature generation (Vigneswaran et al., ICVGIP 2021).

A library on plain arrays, independent of the CLI::

    from fsa.generators.tailcalib import generate, tukey_transform, TailCalibGenerator

    feats, labels, per_class = generate(X, y, tukey=1.0, alpha=0.0, k=3, seed=0)

What is computed (docs/METHOD.md section 3), with the choices this module makes where the paper is
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

Differences from the authors' release (github.com/rahulvigneswaran/TailCalibX: the pip package
``tailcalib_pip/src/tailcalib.py`` and the training code ``libs/core/TailCalib.py``), each available
here as an option; the defaults above are unchanged (``engine/`` relies on them):

- ``ridge``: the release adds ``1e-4 * I`` to every calibrated covariance before sampling (a
  Cholesky safeguard that, on L2-normalised features, is comparable to the per-dimension
  variances).  Default here ``0.0``; ``ridge=1e-4`` reproduces it (one extra ``sqrt(ridge) v``
  term per draw, ``v ~ N(0, I)``; still no per-sample factorisation).
- ``stats_before_tukey``: the release computes class means and covariances on the features
  *before* Tukey's transform and calibrates with the *transformed* sample (nearest means, and the
  calibrated mean ``(sum of k means + x) / (k + 1)``, mix the two spaces).  Identical for
  ``tukey=1``.  Default here ``False`` (statistics after the transform, one space).
- ``renormalize``: the release's training pipeline (``prepare_updated_dataset``) L2-normalises all
  training rows -- real and generated -- *after* Tukey's transform and generation, and test rows
  likewise (normalise -> Tukey -> normalise).  The pip package does not.  Default ``False``.
- ``neighbours="all"``: the release picks the ``k`` nearest means among all classes, the sample's
  own class included.  The library default is ``"others"`` (``engine/`` passes ``"all"``).
- Points per class: the same target ``max count + extra`` (the release's ``extra_points`` is
  added for the head class too).  The release gives every real sample ``floor(ratio)`` draws and
  hands out the remainder one at a time at random *with* replacement (a sample can get several
  extra); here the remainder goes to distinct samples.  The release indexes its class counts by
  label value (labels must be ``0..C-1``) and divides by ``n - 1`` (a single-sample class raises
  ``ZeroDivisionError``); here any labels and single-sample classes work.
- The release's pip package does not L2-normalise its input; its ``TailCalib`` adapter below
  uses ``normalize=False`` accordingly.

:class:`TailCalib` is a drop-in for the pip package's class (``from tailcalib import tailcalib``):
same constructor, ``generate`` keywords, defaults and return values, on this module's vectorised
sampler with a ``seed``.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from utils.errors import UserError

__all__ = ["generate", "tukey_transform", "TailCalibGenerator", "TailCalib"]

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


def _check_params(tukey, alpha, k, extra, neighbours, eps, ridge=0.0):
    for name, v in (("tukey", tukey), ("alpha", alpha), ("eps", eps), ("ridge", ridge)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise UserError(f"{name} must be a finite number, got {v!r}.")
    if eps <= 0:
        raise UserError(f"eps must be > 0, got {eps!r}.")
    if alpha < 0:
        raise UserError(f"alpha must be >= 0 (it is added to every covariance entry), got {alpha!r}.")
    if ridge < 0:
        raise UserError(f"ridge must be >= 0 (it is added to the covariance diagonal; the authors' release "
                        f"uses 1e-4), got {ridge!r}.")
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


def tukey_transform(x, lam: float = 1.0, *, eps: float = 1e-6, normalize: bool = False,
                    renormalize: bool = False):
    """Tukey's ladder of powers: ``x ** lam`` (``log(x + eps)`` for ``lam == 0``).

    Accepts a numpy array or a torch tensor and returns the same kind (same device; floating dtype
    kept).  ``normalize=True`` first L2-normalises the rows of a 2-D input, exactly as
    :func:`generate` does, so ``tukey_transform(X_test, lam, normalize=True)`` maps test features
    into the space the generated features live in.  ``renormalize=True`` L2-normalises the rows
    again *after* the transform (the authors' training pipeline does, see :func:`generate`).  For
    ``lam != 1`` the input must be non-negative (tiny round-off negatives are clamped); ``lam < 0``
    also adds ``eps``.
    """
    _check_params(lam, 0.0, 1, 0, "others", eps)
    spec = _Spec(x)
    t = _as_float64(x, "x")
    if (normalize or renormalize) and t.dim() != 2:
        flag = "normalize" if normalize else "renormalize"
        raise UserError(f"{flag}=True needs a 2-D array [N, D], got shape {tuple(t.shape)}.")
    if normalize:
        t = _l2_normalize(t)
    t = _tukey64(t, float(lam), float(eps))
    if renormalize:
        t = _l2_normalize(t)
    return spec.features(t)


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
                 eps: float = 1e-6, ridge: float = 0.0, stats_before_tukey: bool = False,
                 renormalize: bool = False):
        _check_params(tukey, alpha, k, extra, neighbours, eps, ridge)
        for name, v in (("normalize", normalize), ("stats_before_tukey", stats_before_tukey),
                        ("renormalize", renormalize)):
            if not isinstance(v, (bool, np.bool_)):
                raise UserError(f"{name} must be True or False, got {v!r}.")
        self.tukey = float(tukey)
        self.alpha = float(alpha)
        self.k = int(k)
        self.extra = int(extra)
        self.normalize = bool(normalize)
        self.ridge = float(ridge)
        self.stats_before_tukey = bool(stats_before_tukey)
        self.renormalize = bool(renormalize)
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
        S = Z  # the space of the class statistics: before Tukey (release) or after (default)
        Z = _tukey64(Z, self.tukey, self.eps)
        if not self.stats_before_tukey:
            S = Z
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
        means = torch.zeros(C, d, dtype=torch.float64).index_add_(0, yi, S) / counts[:, None]

        order = torch.argsort(yi, stable=True)  # rows grouped by class, input order inside
        starts = torch.zeros(C + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(counts, 0)

        self._spec = _Spec(X)
        self._Z, self._S, self._yi, self._classes = Z, S, yi, classes
        self._counts, self._means = counts, means
        self._order, self._starts = order, starts
        self._cov_cache: Dict[int, torch.Tensor] = {}
        self._factor_cache: Dict[int, torch.Tensor] = {}
        var = S.var(dim=0, unbiased=False).mean().item() if n > 1 else 0.0
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
        """[C, D] per-class means (of the transformed features; with ``stats_before_tukey`` of the
        features before Tukey's transform), rows in ``classes`` order."""
        self._need_fit()
        return self._spec.features(self._means)

    def transform(self, X):
        """Normalise (if configured), Tukey-transform and re-normalise (if configured) new features,
        e.g. test features: the space :meth:`generate` returns its rows in."""
        return tukey_transform(X, self.tukey, eps=self.eps, normalize=self.normalize,
                               renormalize=self.renormalize)

    def targets(self) -> Dict[int, int]:
        """Number of samples :meth:`generate` adds per class: ``max count + extra - n_c``."""
        self._need_fit()
        T = int(self._counts.max()) + self.extra
        return {int(c): T - int(n) for c, n in zip(self._classes.tolist(), self._counts.tolist())}

    def calibrate(self, indices):
        """Calibrated ``(means [m, D], covariances [m, D, D], neighbour labels [m, k])`` of real rows.

        ``indices`` index the rows of the fitted ``X``.  Returned in the fitted framework; meant for
        inspection and tests (sampling never materialises per-sample covariances).  The covariance
        includes ``alpha`` (every entry) and ``ridge`` (diagonal); both are in the space before the
        optional ``renormalize`` step.
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
                Xc = self._S[rows] - self._means[c]
                cov = (Xc.T @ Xc) / (n - 1)
            if cache:
                self._cov_cache[c] = cov
        return cov

    def _set_covs(self, sets: torch.Tensor) -> torch.Tensor:
        """[S, k] class-index sets -> [S, D, D] calibrated covariances (mean of k + alpha everywhere
        + ridge on the diagonal)."""
        d = self._Z.shape[1]
        out = torch.zeros(sets.shape[0], d, d, dtype=torch.float64)
        for j in range(sets.shape[1]):
            for c in torch.unique(sets[:, j]).tolist():
                out[sets[:, j] == c] += self._class_cov(c)
        out /= sets.shape[1]
        if self.alpha != 0.0:
            out += self.alpha
        if self.ridge != 0.0:
            out += self.ridge * torch.eye(d, dtype=torch.float64)
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
                self._factor_cache[c] = (self._S[rows] - self._means[c]).T / math.sqrt(n - 1)
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
        ``mean + (1/sqrt(k)) sum_j F_{c_j} w_j + sqrt(alpha) u 1 + sqrt(ridge) v`` with independent
        standard normal ``w_j``, ``u``, ``v`` (``v`` in R^D): exactly
        ``N(mean, (1/k) sum_j cov_{c_j} + alpha 1 1^T + ridge I)``.  This needs one
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
        if self.ridge > 0:
            out += math.sqrt(self.ridge) * torch.randn(G, d, dtype=torch.float64, generator=self._gen)
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
        if self.renormalize:
            feats = _l2_normalize(feats)
        return self._spec.features(feats), self._spec.labels(self._classes[ci])

    def generate(self, *, shuffle: bool = True):
        """Balance every class to ``max count + extra``.

        Returns ``(features, labels, generated_per_class)``: the real (transformed) features plus
        the generated ones (all rows L2-normalised again if ``renormalize``).  ``shuffle=False``: real rows first in input order, then the generated
        ones grouped by class (sorted label order); ``shuffle=True``: one seeded permutation of all.
        ``generated_per_class`` maps every label to the number of generated samples (0 included).
        """
        self._need_fit()
        T = int(self._counts.max()) + self.extra
        feats, ci = self._draw(T - self._counts)
        X = torch.cat([self._Z, feats])
        if self.renormalize:
            X = _l2_normalize(X)
        yi = torch.cat([self._yi, ci])
        if shuffle:
            perm = torch.randperm(X.shape[0], generator=self._gen)
            X, yi = X[perm], yi[perm]
        per_class = {int(c): T - int(n) for c, n in zip(self._classes.tolist(), self._counts.tolist())}
        return self._spec.features(X), self._spec.labels(self._classes[yi]), per_class


def generate(X, y, *, tukey: float = 1.0, alpha: float = 0.0, k: int = 3, extra: int = 0,
             seed: Optional[int] = None, shuffle: bool = True, normalize: bool = True,
             neighbours: str = "others", eps: float = 1e-6, ridge: float = 0.0,
             stats_before_tukey: bool = False, renormalize: bool = False):
    """TailCalib on plain arrays: ``(features, labels, generated_per_class)``.

    ``X``: [N, D] numpy array or torch tensor (any device); ``y``: [N] integer labels with any
    values.  Every class is filled up to ``max class count + extra`` with features drawn from
    calibrated Gaussians (see the module docstring for every definition and choice).  Returns
    the real transformed features followed by (or, with ``shuffle``, permuted together with) the
    generated ones, their labels (same label values as ``y``), and ``{label: number generated}``.
    Same seed -> same output, identical for numpy and torch inputs holding the same values.
    Bad input raises :class:`utils.errors.UserError`.

    Release-parity options (module docstring, "Differences from the authors' release"):
    ``ridge`` adds ``ridge * I`` to every calibrated covariance (release: ``1e-4``),
    ``stats_before_tukey`` fits class means / covariances on the features before Tukey's transform
    (release: yes), ``renormalize`` L2-normalises all returned rows after the transform (the
    release's training pipeline does, its pip package does not), ``neighbours="all"`` lets the
    sample's own class be a neighbour (release: yes).
    """
    gen = TailCalibGenerator(tukey=tukey, alpha=alpha, k=k, extra=extra, seed=seed,
                             normalize=normalize, neighbours=neighbours, eps=eps, ridge=ridge,
                             stats_before_tukey=stats_before_tukey, renormalize=renormalize)
    return gen.fit(X, y).generate(shuffle=shuffle)


# --------------------------------------------------------------------------------------------
# drop-in for the authors' pip package
# --------------------------------------------------------------------------------------------
_ENGINES = {"numpy": "numpy", "torch": "torch", "pytorch": "torch"}


class TailCalib:
    """Drop-in for the authors' pip package (``from tailcalib import tailcalib``): change the import
    to ``from fsa.generators.tailcalib import TailCalib as tailcalib`` and the release's examples
    run unchanged, on :class:`TailCalibGenerator` (vectorised, seedable) instead of a per-sample
    ``multivariate_normal`` loop.

    ``TailCalib(base_engine="numpy")``: ``"numpy"`` returns numpy arrays, ``"torch"`` (or the
    release's spelling ``"pytorch"``; case-insensitive) returns torch tensors (on ``X``'s device
    when ``X`` is a tensor).  Unlike the release, which asserts that ``X`` / ``y`` already have the
    engine's type, either kind of input is accepted and converted.

    :meth:`generate` has the release's keywords and defaults -- ``tukey_value=0.9`` (the code's
    default; the release's README and docstring say 1.0), ``alpha=0.0``, ``topk=1``,
    ``extra_points=0``, ``shuffle=True`` -- and its return value ``(feat_all, labs_all,
    generated_points)``:

    - ``feat_all`` [N + G, D]: the real rows Tukey-transformed, plus the generated rows; every class
      ends with ``max class count + extra_points`` rows (the largest class gets ``extra_points``).
    - ``labs_all`` [N + G] int64: their labels (the label values of ``y``).
    - ``generated_points``: ``{label: [n_c, D] generated rows of that class}``, only classes with
      ``n_c > 0`` (as the release: a class is skipped when nothing is generated for it), keys in
      sorted label order.  The rows are the same values as in ``feat_all``.

    The release shuffles ``feat_all`` / ``labs_all`` with one permutation and **ignores**
    ``shuffle=False`` (it always shuffles); here ``shuffle=False`` is honoured: real rows first in
    input order, then the generated rows grouped by class (sorted label order).  With ``shuffle``,
    the output equals ``generate(X, y, ..., shuffle=True)`` of this module for the same settings.

    What the release computes, and therefore the keyword-only defaults here (module docstring,
    "Differences from the authors' release"): no L2-normalisation of the input
    (``normalize=False``), class statistics before Tukey's transform (``stats_before_tukey=True``),
    neighbours among all classes, own class included (``neighbours="all"``), ``1e-4 * I`` added to
    every calibrated covariance (``ridge=1e-4``), no re-normalisation (``renormalize=False``; the
    release's training code, not its pip package, re-normalises -- ``normalize=True,
    renormalize=True`` reproduces that pipeline).

    Seeding: the release takes no seed; it draws from the global RNGs (``np.random`` for the split
    of draws over real samples in both engines and for the numpy engine's
    ``multivariate_normal`` / permutation, torch's default generator for the torch engine's
    ``MultivariateNormal.sample`` / ``randperm``), so its numpy and torch engines never agree and a
    run repeats only after ``np.random.seed(...)`` and ``torch.manual_seed(...)``.  Here ``seed=s``
    seeds one CPU ``torch.Generator`` and all math is float64 on the CPU: the numpy and torch
    engines give **identical numbers** for the same seed and same input values.  ``seed=None``
    draws the seed from the engine's global RNG (``np.random`` / ``torch``), so code that seeds
    globally, as the release requires, stays repeatable (the numbers are not the release's).

    :meth:`convert_others` maps validation / test features into the space of ``feat_all``; by
    default with the settings of the last :meth:`generate` call (the release's default there is a
    fixed ``tukey_value=1.0``, which silently differs from its ``generate`` default 0.9).  Bad
    arguments raise :class:`utils.errors.UserError` naming the fix.
    """

    def __init__(self, base_engine: str = "numpy"):
        key = base_engine.strip().lower() if isinstance(base_engine, str) else None
        if key not in _ENGINES:
            raise UserError(f"base_engine must be 'numpy' or 'torch' ('pytorch' is accepted too), "
                            f"got {base_engine!r}.")
        self.base_engine = base_engine
        self.engine = _ENGINES[key]
        self._last: Optional[dict] = None

    def __repr__(self) -> str:
        return f"TailCalib(base_engine={self.base_engine!r})"

    # ---------------------------------------------------------------- helpers
    def _out(self, a):
        """A numpy array or tensor in the engine's type (torch keeps the device)."""
        if self.engine == "numpy":
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu()
                return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
            return a
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))

    def _seed(self, seed) -> int:
        if seed is None:
            if self.engine == "numpy":
                return int(np.random.randint(0, 2**62, dtype=np.int64))
            return int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be an integer >= 0 or None, got {seed!r}.")
        return int(seed)

    @staticmethod
    def _check(tukey_value, alpha, topk, extra_points, shuffle):
        for name, v in (("tukey_value", tukey_value), ("alpha", alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
                raise UserError(f"{name} must be a finite number, got {v!r}.")
        if alpha < 0:
            raise UserError(f"alpha must be >= 0 (it is added to every covariance entry), got {alpha!r}.")
        for name, v, lo in (("topk", topk, 1), ("extra_points", extra_points, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise UserError(f"{name} must be an integer >= {lo}, got {v!r}.")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise UserError(f"shuffle must be True or False, got {shuffle!r}.")

    # ---------------------------------------------------------------- release API
    def generate(self, X, y, tukey_value: float = 0.9, alpha: float = 0.0, topk: int = 1,
                 extra_points: int = 0, shuffle: bool = True, *, seed: Optional[int] = None,
                 normalize: bool = False, stats_before_tukey: bool = True, neighbours: str = "all",
                 ridge: float = 1e-4, renormalize: bool = False, eps: float = 1e-6):
        """Balance ``X`` [N, D], ``y`` [N]: ``(feat_all, labs_all, generated_points)`` (class docstring)."""
        self._check(tukey_value, alpha, topk, extra_points, shuffle)
        gen = TailCalibGenerator(tukey=tukey_value, alpha=alpha, k=topk, extra=extra_points,
                                 seed=self._seed(seed), normalize=normalize, neighbours=neighbours,
                                 eps=eps, ridge=ridge, stats_before_tukey=stats_before_tukey,
                                 renormalize=renormalize)
        try:
            gen.fit(X, y)
        except UserError as exc:
            if str(exc).startswith(f"k={topk} nearest"):  # name the release's keyword
                raise UserError(str(exc).replace(f"k={topk}", f"topk={topk}", 1)
                                .replace("use k <=", "use topk <=")) from None
            raise
        feats, labs, per_class = gen.generate(shuffle=False)
        start = int(labs.shape[0]) - sum(per_class.values())
        generated = {}
        for lab, n in per_class.items():  # sorted label order, as the generated rows are
            if n:
                part = feats[start:start + n]
                generated[lab] = self._out(part.clone() if isinstance(part, torch.Tensor) else part.copy())
                start += n
        if shuffle:  # the same draw as TailCalibGenerator.generate(shuffle=True)
            perm = torch.randperm(int(labs.shape[0]), generator=gen._gen)
            if isinstance(feats, torch.Tensor):
                perm = perm.to(feats.device)
            else:
                perm = perm.numpy()
            feats, labs = feats[perm], labs[perm]
        self._last = {"tukey": gen.tukey, "eps": gen.eps, "normalize": gen.normalize,
                      "renormalize": gen.renormalize}
        return self._out(feats), self._out(labs), generated

    def convert_others(self, X, tukey_value: Optional[float] = None, y=None):
        """Transform validation / test features into the space of :meth:`generate`'s ``feat_all``.

        ``tukey_value=None`` (and the normalisation settings) come from the last :meth:`generate`
        call (1.0 and no normalisation before any call).  The release's signature is
        ``convert_others(X, tukey_value=1.0)`` returning the array; its README calls
        ``X_test, y_test = a.convert_others(X=X_test, y=y_test)``, which the release rejects --
        here passing ``y`` returns ``(X_transformed, y)`` so that example works too.
        """
        last = self._last or {"tukey": 1.0, "eps": 1e-6, "normalize": False, "renormalize": False}
        lam = last["tukey"] if tukey_value is None else tukey_value
        out = self._out(tukey_transform(X, lam, eps=last["eps"], normalize=last["normalize"],
                                        renormalize=last["renormalize"]))
        if y is None:
            return out
        labels = _as_labels(y)
        if labels.dim() != 1 or labels.shape[0] != out.shape[0]:
            raise UserError(f"y must be a 1-D array with one label per row of X ({out.shape[0]}), "
                            f"got shape {tuple(labels.shape)}.")
        if isinstance(out, torch.Tensor):
            labels = labels.to(out.device)
        return out, self._out(labels)
