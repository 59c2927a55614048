"""TailCalib library: the math of TailCalib / TailCalibX feature generation (Vigneswaran et al., ICVGIP 2021).

TailCalib lives in three modules:

- this one, the math on float64 CPU tensors: Tukey's ladder transform and :class:`CalibratedGaussians`
  (class statistics, nearest class means, square-root factors, calibrated draws);
- :mod:`fsa.generators.tailcalib_api`, the public API on numpy arrays / torch tensors (input checks and
  conversion): ``generate(X, y)``, ``TailCalibGenerator`` (fit once, sample repeatedly), ``tukey_transform``;
- :mod:`fsa.generators.tailcalib_dropin`, ``TailCalib``, a drop-in for the authors' pip package, with the
  list of differences from their release.

What is computed (docs/METHOD.md section 3), with the choices made where the paper is silent:

1. Rows of ``X`` are L2-normalised (``normalize=True``), then Tukey's ladder transform is applied
   (:func:`tukey64`: ``z ** lam``, ``log`` for ``lam == 0``).  Pooled features of a ReLU
   backbone are ``>= 0``; for ``lam != 1`` round-off negatives (``>= -1e-6`` relative to the largest
   magnitude) are clamped to 0 and clearly negative inputs are a ``UserError`` (a fractional power
   or a log of a negative number is undefined).  ``lam <= 0`` adds ``eps`` (default ``1e-6``)
   before the power / log so that exact zeros stay finite.  Evaluation must apply the same
   transform to test features: use ``TailCalibGenerator.transform`` or ``tukey_transform``.
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

All math runs on the CPU in float64 with one seeded ``torch.Generator``, so the same seed gives
bit-identical draws whatever framework or device the input came from.  The release-parity options
(``ridge``, ``stats_before_tukey``, ``renormalize``, ``neighbours="all"``) are explained in
:mod:`fsa.generators.tailcalib_dropin`.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import torch

from utils.errors import UserError

__all__ = ["CalibratedGaussians", "l2_normalize", "tukey64"]

# Work-space bound (number of float64 elements) for one chunk of stacked covariances / padded draws.
_CHUNK_ELEMS = 1 << 24
_NEG_TOL = 1e-6
_JITTER_START = 1e-10  # relative to the covariance scale
_JITTER_STEPS = 11  # up to 1.0 x scale


def tukey64(x: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """Tukey's ladder of powers on a float64 tensor (step 1); negative inputs are a ``UserError``."""
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


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` scaled to unit L2 norm (all-zero rows stay zero)."""
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


class CalibratedGaussians:
    """Per-class statistics of fitted features and draws from their calibrated Gaussians (steps 2-5).

    ``Z`` [N, D]: the transformed features a calibration starts from; ``S`` [N, D]: the features the
    class statistics are computed on (``Z`` itself, or for ``stats_before_tukey`` the features before
    Tukey's transform); ``yi`` [N]: class indices ``0..num_classes-1``.  All float64 on the CPU and
    already checked (``TailCalibGenerator.fit`` does that).  Covariances and factors are computed
    lazily, only for classes that serve as neighbours, and cached.  Draws continue ``generator``'s
    stream, so the caller decides how draws repeat.
    """

    def __init__(self, Z: torch.Tensor, S: torch.Tensor, yi: torch.Tensor, num_classes: int, *, k: int,
                 alpha: float, ridge: float, neighbours: str, generator: torch.Generator):
        self.Z, self.S, self.yi = Z, S, yi
        self.k, self.alpha, self.ridge, self.neighbours = k, alpha, ridge, neighbours
        self.generator = generator
        self.counts = torch.bincount(yi, minlength=num_classes)
        self.means = (torch.zeros(num_classes, Z.shape[1], dtype=torch.float64).index_add_(0, yi, S)
                      / self.counts[:, None])
        self._order = torch.argsort(yi, stable=True)  # rows grouped by class, input order inside
        self._starts = torch.zeros(num_classes + 1, dtype=torch.int64)
        self._starts[1:] = torch.cumsum(self.counts, 0)
        self._cov_cache: Dict[int, torch.Tensor] = {}
        self._factor_cache: Dict[int, torch.Tensor] = {}
        var = S.var(dim=0, unbiased=False).mean().item() if Z.shape[0] > 1 else 0.0
        self._scale = var if var > 0 else 1.0  # fallback jitter scale for all-zero covariances

    # ---------------------------------------------------------------- calibration
    def nearest(self, idx: torch.Tensor) -> torch.Tensor:
        """[m] row indices -> [m, k] class indices of the nearest class means, sorted ascending."""
        if idx.numel() == 0:
            return torch.zeros(0, self.k, dtype=torch.int64)
        dist = torch.cdist(self.Z[idx], self.means)
        if self.neighbours == "others":
            dist[torch.arange(idx.numel()), self.yi[idx]] = math.inf
        nbr = torch.topk(dist, self.k, dim=1, largest=False).indices
        return torch.sort(nbr, dim=1).values

    def calibrated_means(self, idx: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """[m] row indices and their [m, k] neighbour classes -> [m, D] calibrated means (step 4)."""
        return (self.means[nbr].sum(1) + self.Z[idx]) / (self.k + 1)

    def calibrated_covs(self, sets: torch.Tensor) -> torch.Tensor:
        """[S, k] class-index sets -> [S, D, D] calibrated covariances (mean of k + alpha everywhere
        + ridge on the diagonal)."""
        d = self.Z.shape[1]
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

    # ---------------------------------------------------------------- statistics
    def _class_cov(self, c: int, cache: bool = True) -> torch.Tensor:
        cov = self._cov_cache.get(c)
        if cov is None:
            rows = self._order[self._starts[c]:self._starts[c + 1]]
            n = rows.numel()
            if n < 2:  # undefined: documented zero-covariance fallback
                cov = torch.zeros(self.Z.shape[1], self.Z.shape[1], dtype=torch.float64)
            else:
                Xc = self.S[rows] - self.means[c]
                cov = (Xc.T @ Xc) / (n - 1)
            if cache:
                self._cov_cache[c] = cov
        return cov

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

    def _factors(self, classes: List[int], report: dict) -> Dict[int, torch.Tensor]:
        """Square-root factors ``F_c`` [D, r_c] with ``F_c F_c^T = cov_c`` (cached per fit).

        ``n_c <= D``: the centred data itself, ``(Z_c - mean_c)^T / sqrt(n_c - 1)`` (exact, also for
        the rank-deficient covariance of a small class, r_c = n_c); ``n_c > D``: the Cholesky factor
        of ``cov_c`` (r_c = D), batched over classes, with jitter if not positive definite.
        Single-sample classes have the zero covariance and no factor (they contribute nothing).
        """
        d = self.Z.shape[1]
        chol = []
        for c in classes:
            if c in self._factor_cache:
                continue
            n = int(self.counts[c])
            if n < 2:
                continue
            if n <= d:
                rows = self._order[self._starts[c]:self._starts[c + 1]]
                self._factor_cache[c] = (self.S[rows] - self.means[c]).T / math.sqrt(n - 1)
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
    def draw(self, n_per_class: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """n_per_class: [C] int64 counts -> (features [G, D] float64, class indices [G]).

        Output grouped by class (classes in index order), inside a class by the input order of the
        real sample the point was calibrated on, that sample's draws contiguous.

        A point calibrated on neighbour set S = {c_1..c_k} is
        ``mean + (1/sqrt(k)) sum_j F_{c_j} w_j + sqrt(alpha) u 1 + sqrt(ridge) v`` with independent
        standard normal ``w_j``, ``u``, ``v`` (``v`` in R^D): exactly
        ``N(mean, (1/k) sum_j cov_{c_j} + alpha 1 1^T + ridge I)``.  This needs one
        factor per *class* instead of one Cholesky per distinct neighbour set (thousands of them
        at CIFAR-100-LT scale), and the work is one batched matmul per neighbour class.
        """
        d = self.Z.shape[1]
        # 1. spread each class's budget over its real samples (positions in class-then-input order)
        src_counts = torch.zeros(self.Z.shape[0], dtype=torch.int64)
        for c in torch.nonzero(n_per_class > 0).flatten().tolist():
            a, b = int(self._starts[c]), int(self._starts[c + 1])
            g, n = int(n_per_class[c]), b - a
            cnt = torch.full((n,), g // n, dtype=torch.int64)
            rem = g % n
            if rem:
                cnt += (torch.randperm(n, generator=self.generator) < rem).to(torch.int64)
            src_counts[a:b] = cnt
        active = torch.nonzero(src_counts).flatten()
        counts = src_counts[active]  # draws per source
        rows = self._order[active]  # real-sample row of each source
        G = int(counts.sum())
        if G == 0:
            return torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        M = rows.numel()

        # 2. calibration per source: neighbour classes and calibrated mean
        nbr = self.nearest(rows)
        cal_mean = self.calibrated_means(rows, nbr)
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
                w = torch.randn(p.numel(), r, dtype=torch.float64, generator=self.generator)
                out.index_add_(0, p, w @ f.T)
        out /= math.sqrt(self.k)
        if self.alpha > 0:
            out += math.sqrt(self.alpha) * torch.randn(G, 1, dtype=torch.float64, generator=self.generator)
        if self.ridge > 0:
            out += math.sqrt(self.ridge) * torch.randn(G, d, dtype=torch.float64, generator=self.generator)
        out += cal_mean[src_of_pt]
        if report["matrices"]:
            warnings.warn(
                f"TailCalib: the covariance of {report['matrices']} class(es) was not positive "
                f"definite; added jitter eps*I (eps up to {report['max_jitter']:.3g}) before the "
                "Cholesky factorisation.",
                RuntimeWarning,
                stacklevel=3,
            )
        return out, self.yi[rows][src_of_pt]
