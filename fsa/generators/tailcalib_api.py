"""TailCalib's public API on plain arrays (numpy arrays or torch tensors), independent of the CLI::

    from fsa.generators.tailcalib_api import generate, tukey_transform, TailCalibGenerator

    feats, labels, per_class = generate(X, y, tukey=1.0, alpha=0.0, k=3, seed=0)

``generate`` balances a data set in one call; :class:`TailCalibGenerator` fits once and samples
repeatedly (TailCalibX re-fits every epoch); :func:`tukey_transform` maps test features into the space
of the generated ones.  This module checks and converts the input; the math, and the definition of
every step, is in :mod:`fsa.generators.tailcalib`.  :mod:`fsa.generators.tailcalib_dropin` holds the
drop-in for the authors' pip package and the differences from their release (the options ``ridge``,
``stats_before_tukey``, ``renormalize``, ``neighbours="all"``).

Determinism and frameworks: all math runs on the CPU in float64 with a ``torch.Generator`` seeded
by ``seed``; inputs are converted there and the results converted back.  Therefore numpy and torch
inputs holding the same values give **bit-identical** outputs for the same seed, on any input
device.  Output follows the input: numpy in -> numpy out, torch in -> torch out on the same device;
features keep the input's floating dtype (float64 for integer input), labels are int64 and keep the
input's label values (they need not be ``0..C-1``).  Bad input raises :class:`utils.errors.UserError`.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from fsa.generators.tailcalib import CalibratedGaussians, l2_normalize, tukey64
from utils.errors import UserError

__all__ = ["generate", "tukey_transform", "TailCalibGenerator"]


# --------------------------------------------------------------------------------------------
# conversions and checks
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


def as_labels(y) -> torch.Tensor:
    """Integer class labels (numpy, torch or a list) as an int64 CPU tensor; anything else is a ``UserError``."""
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
        t = l2_normalize(t)
    t = tukey64(t, float(lam), float(eps))
    if renormalize:
        t = l2_normalize(t)
    return spec.features(t)


# --------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------
class TailCalibGenerator:
    """Class statistics + calibrated sampling, reusable across calls (TailCalibX re-fits every epoch).

    ``fit(X, y)`` transforms the features and stores per-class means (covariances are computed
    lazily, only for classes that serve as neighbours, and cached).  ``generate()`` balances every
    class to ``max count + extra``; ``sample({label: n})`` draws ``n`` calibrated features for the
    given classes.  The internal ``torch.Generator`` (:attr:`rng`) is seeded once in ``__init__`` and
    its stream continues across calls: successive calls give fresh draws, a new instance with the
    same seed replays them.  See :mod:`fsa.generators.tailcalib` for all definitions.
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
        self.rng = torch.Generator(device="cpu")
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(int(seed))
        self._core: Optional[CalibratedGaussians] = None

    # ---------------------------------------------------------------- fitting
    def fit(self, X, y) -> "TailCalibGenerator":
        is_tensor = isinstance(X, torch.Tensor)
        ndim = X.dim() if is_tensor else np.ndim(X)
        if ndim != 2:
            shape = tuple(X.shape) if is_tensor else np.shape(X)
            raise UserError(f"X must be a 2-D array of features [N, D], got shape {shape}.")
        Z = _as_float64(X)
        labels = as_labels(y)
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
            Z = l2_normalize(Z)
        S = Z  # the space of the class statistics: before Tukey (release) or after (default)
        Z = tukey64(Z, self.tukey, self.eps)
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
        # set only after every check passed, so a failed re-fit keeps the previous fit
        self._spec, self._classes = _Spec(X), classes
        self._core = CalibratedGaussians(Z, S, yi, C, k=self.k, alpha=self.alpha, ridge=self.ridge,
                                         neighbours=self.neighbours, generator=self.rng)
        return self

    def _fitted(self) -> CalibratedGaussians:
        if self._core is None:
            raise UserError("TailCalibGenerator.fit(X, y) must be called before sampling.")
        return self._core

    # ---------------------------------------------------------------- inspection
    @property
    def classes(self):
        """The distinct label values, sorted (in the fitted framework)."""
        self._fitted()
        return self._spec.labels(self._classes)

    @property
    def class_counts(self) -> Dict[int, int]:
        counts = self._fitted().counts
        return {int(c): int(n) for c, n in zip(self._classes.tolist(), counts.tolist())}

    @property
    def class_means(self):
        """[C, D] per-class means (of the transformed features; with ``stats_before_tukey`` of the
        features before Tukey's transform), rows in ``classes`` order."""
        return self._spec.features(self._fitted().means)

    def transform(self, X):
        """Normalise (if configured), Tukey-transform and re-normalise (if configured) new features,
        e.g. test features: the space :meth:`generate` returns its rows in."""
        return tukey_transform(X, self.tukey, eps=self.eps, normalize=self.normalize,
                               renormalize=self.renormalize)

    def targets(self) -> Dict[int, int]:
        """Number of samples :meth:`generate` adds per class: ``max count + extra - n_c``."""
        counts = self._fitted().counts
        T = int(counts.max()) + self.extra
        return {int(c): T - int(n) for c, n in zip(self._classes.tolist(), counts.tolist())}

    def calibrate(self, indices):
        """Calibrated ``(means [m, D], covariances [m, D, D], neighbour labels [m, k])`` of real rows.

        ``indices`` index the rows of the fitted ``X``.  Returned in the fitted framework; meant for
        inspection and tests (sampling never materialises per-sample covariances).  The covariance
        includes ``alpha`` (every entry) and ``ridge`` (diagonal); both are in the space before the
        optional ``renormalize`` step.
        """
        core = self._fitted()
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        nbr = core.nearest(idx)
        cal_mean = core.calibrated_means(idx, nbr)
        cov = core.calibrated_covs(nbr)
        return (self._spec.features(cal_mean), self._spec.features(cov),
                self._spec.labels(self._classes[nbr]))

    # ---------------------------------------------------------------- sampling
    def sample(self, n_per_class: Mapping[int, int]):
        """Draw ``n`` calibrated features for each ``{label: n}``; returns ``(features, labels)``.

        Draws of a class are spread evenly over its real samples (:mod:`fsa.generators.tailcalib`, step 3).
        """
        core = self._fitted()
        lookup = {int(c): i for i, c in enumerate(self._classes.tolist())}
        want = torch.zeros(self._classes.numel(), dtype=torch.int64)
        for lab, n in dict(n_per_class).items():
            if int(lab) not in lookup:
                raise UserError(f"sample(): label {lab!r} is not one of the fitted classes "
                                f"{sorted(lookup)[:20]}.")
            if isinstance(n, bool) or int(n) != n or n < 0:
                raise UserError(f"sample(): count for label {lab!r} must be an integer >= 0, got {n!r}.")
            want[lookup[int(lab)]] = int(n)
        feats, ci = core.draw(want)
        if self.renormalize:
            feats = l2_normalize(feats)
        return self._spec.features(feats), self._spec.labels(self._classes[ci])

    def generate(self, *, shuffle: bool = True):
        """Balance every class to ``max count + extra``.

        Returns ``(features, labels, generated_per_class)``: the real (transformed) features plus
        the generated ones (all rows L2-normalised again if ``renormalize``).  ``shuffle=False``: real
        rows first in input order, then the generated ones grouped by class (sorted label order);
        ``shuffle=True``: one seeded permutation of all.
        ``generated_per_class`` maps every label to the number of generated samples (0 included).
        """
        core = self._fitted()
        T = int(core.counts.max()) + self.extra
        feats, ci = core.draw(T - core.counts)
        X = torch.cat([core.Z, feats])
        if self.renormalize:
            X = l2_normalize(X)
        yi = torch.cat([core.yi, ci])
        if shuffle:
            perm = torch.randperm(X.shape[0], generator=self.rng)
            X, yi = X[perm], yi[perm]
        per_class = {int(c): T - int(n) for c, n in zip(self._classes.tolist(), core.counts.tolist())}
        return self._spec.features(X), self._spec.labels(self._classes[yi]), per_class


def generate(X, y, *, tukey: float = 1.0, alpha: float = 0.0, k: int = 3, extra: int = 0,
             seed: Optional[int] = None, shuffle: bool = True, normalize: bool = True,
             neighbours: str = "others", eps: float = 1e-6, ridge: float = 0.0,
             stats_before_tukey: bool = False, renormalize: bool = False):
    """TailCalib on plain arrays: ``(features, labels, generated_per_class)``.

    ``X``: [N, D] numpy array or torch tensor (any device); ``y``: [N] integer labels with any
    values.  Every class is filled up to ``max class count + extra`` with features drawn from
    calibrated Gaussians (see :mod:`fsa.generators.tailcalib` for every definition and choice).  Returns
    the real transformed features followed by (or, with ``shuffle``, permuted together with) the
    generated ones, their labels (same label values as ``y``), and ``{label: number generated}``.
    Same seed -> same output, identical for numpy and torch inputs holding the same values.
    Bad input raises :class:`utils.errors.UserError`.

    Release-parity options (:mod:`fsa.generators.tailcalib_dropin`, "Differences from the authors' release"):
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
