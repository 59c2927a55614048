"""TailCalib drop-in: the authors' pip package class (``from tailcalib import tailcalib``) on this project's sampler.

TailCalib lives in three modules: :mod:`fsa.generators.tailcalib` (the math and the definition of every
step), :mod:`fsa.generators.tailcalib_api` (``generate``, ``TailCalibGenerator``, ``tukey_transform`` on
plain arrays) and this one, :class:`TailCalib`: same constructor, ``generate`` keywords, defaults and
return values as the pip package's class, on the vectorised, seedable ``TailCalibGenerator``.

Differences from the authors' release (github.com/rahulvigneswaran/TailCalibX: the pip package
``tailcalib_pip/src/tailcalib.py`` and the training code ``libs/core/TailCalib.py``), each available
as an option of ``TailCalibGenerator`` / ``generate``, whose defaults follow the definitions in
:mod:`fsa.generators.tailcalib` (``engine/`` relies on them):

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
- The release's pip package does not L2-normalise its input; :class:`TailCalib` below uses
  ``normalize=False`` accordingly.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from fsa.generators.tailcalib_api import TailCalibGenerator, as_labels, tukey_transform
from utils.errors import UserError

__all__ = ["TailCalib"]

_ENGINES = {"numpy": "numpy", "torch": "torch", "pytorch": "torch"}


class TailCalib:
    """Drop-in for the authors' pip package (``from tailcalib import tailcalib``): change the import
    to ``from fsa.generators.tailcalib_dropin import TailCalib as tailcalib`` and the release's examples
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
    the output equals ``generate(X, y, ..., shuffle=True)`` of :mod:`fsa.generators.tailcalib_api` for
    the same settings.

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
            perm = torch.randperm(int(labs.shape[0]), generator=gen.rng)
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
        labels = as_labels(y)
        if labels.dim() != 1 or labels.shape[0] != out.shape[0]:
            raise UserError(f"y must be a 1-D array with one label per row of X ({out.shape[0]}), "
                            f"got shape {tuple(labels.shape)}.")
        if isinstance(out, torch.Tensor):
            labels = labels.to(out.device)
        return out, self._out(labels)
