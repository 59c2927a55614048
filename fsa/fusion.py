"""Feature fusion (docs/METHOD.md 2.6), vectorised over the batch (no per-sample loop).

One fused map per row ``i``: draw ``gamma_i ~ U(0, 1)``; take ``n_tail_i = round(gamma_i * L)``
feature vectors (``L = H*W``), sampled uniformly WITH repetition from the tail map's allowed
positions, and the other ``L - n_tail_i`` from the donor map's allowed positions; assemble them
into a ``C x H x W`` map (tail vectors first in raster order; the spatial order is irrelevant
because global average pooling follows). The fused map keeps its row's TAIL label.

Random draws are made on the generator's device (on the data's device when no generator is
given) and then moved to the data's device, so a CPU ``torch.Generator`` also works for GPU
tensors and the draws depend only on the generator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fsa.decomposition import split_masks
from utils.errors import UserError

__all__ = ["FusionInfo", "fuse", "fuse_from_cams", "DonorPool", "sample_donors", "allowed_positions",
           "MATCH_MODES", "ClassStatistics", "PooledMoments", "class_statistics", "match_statistics"]

# Fallback levels reported in FusionInfo.tail_fallback / donor_fallback.
MASK, NONZERO, ALL = 0, 1, 2


@dataclass
class FusionInfo:
    """Where every position of the fused maps came from.

    ``from_tail bool[N, L]``: position ``l`` of row ``i`` is a tail vector (else a donor vector).
    ``src_index long[N, L]``: index into the flattened (``H*W``) tail or donor map of that row.
    ``gamma float[N]``, ``n_tail long[N]`` (= ``round(gamma * L)``, = ``from_tail.sum(1)``).
    ``tail_fallback`` / ``donor_fallback`` ``long[N]``: 0 = the mask's positions were used,
    1 = the mask had no usable position so all non-zero positions were used, 2 = the map is
    entirely zero so all positions were used.
    """

    from_tail: Tensor
    src_index: Tensor
    gamma: Tensor
    n_tail: Tensor
    tail_fallback: Tensor
    donor_fallback: Tensor


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=gen_device).to(device)


def _uniform_index(counts: Tensor, u: Tensor) -> Tensor:
    """Uniform integer in ``[0, counts)`` per element from uniforms ``u`` in [0, 1)."""
    return torch.minimum((u * counts.to(u.dtype)).long(), (counts - 1).clamp_min(0))


def allowed_positions(fmaps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Allowed positions ``bool[N, L]`` and the fallback level ``long[N]`` for each row.

    Allowed = ``mask`` AND feature vector not all-zero. If that is empty, all non-zero positions
    of the map (level 1); if the map is entirely zero, all positions (level 2).
    """
    nonzero = (fmaps.flatten(2) != 0).any(dim=1)                   # [N, L]
    allowed = mask.flatten(1).to(torch.bool) & nonzero
    level = torch.full((fmaps.shape[0],), MASK, dtype=torch.long, device=fmaps.device)
    no_allowed = ~allowed.any(dim=1)
    no_nonzero = ~nonzero.any(dim=1)
    allowed = torch.where(no_allowed[:, None], nonzero, allowed)
    allowed = torch.where(no_nonzero[:, None], torch.ones_like(allowed), allowed)
    level = torch.where(no_allowed, torch.full_like(level, NONZERO), level)
    level = torch.where(no_nonzero, torch.full_like(level, ALL), level)
    return allowed, level


def _sample_positions(allowed: Tensor, u: Tensor) -> Tensor:
    """For each row, ``u.shape[1]`` positions drawn uniformly with repetition among the row's
    allowed positions (inverse-CDF on the integer cumulative count: exact, no float weights)."""
    cum = allowed.long().cumsum(dim=1)                             # [N, L]
    k = _uniform_index(cum[:, -1:], u)                             # k-th allowed position, 0-based
    # The k-th allowed position is the first index whose running count exceeds k.
    return torch.searchsorted(cum, k, right=True)


def fuse(
    tail_fmaps: Tensor,
    tail_specific: Tensor,
    donor_fmaps: Tensor,
    donor_generic: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, FusionInfo]:
    """Fuse row ``i`` of the tail maps with row ``i`` of the donor maps.

    ``tail_fmaps``/``donor_fmaps`` ``[N, C, H, W]`` (any float dtype, may carry gradients),
    ``tail_specific``/``donor_generic`` ``bool[N, H, W]``. A side's allowed positions are its
    mask's positions whose feature vector is not all zero. Fallback (documented contract): if a
    side has no allowed position, its whole set of non-zero positions is used instead; if its
    map is entirely zero, all ``L`` positions are used. The levels are in ``FusionInfo``.

    Returns ``(fused [N, C, H, W], info)``; labels of the fused maps are the tail rows' labels.
    """
    if tail_fmaps.dim() != 4 or tail_fmaps.shape != donor_fmaps.shape:
        raise ValueError(f"tail and donor maps must both be [N,C,H,W] of equal shape; got "
                         f"{tuple(tail_fmaps.shape)} and {tuple(donor_fmaps.shape)}")
    n, c, h, w = tail_fmaps.shape
    if tail_specific.shape != (n, h, w) or donor_generic.shape != (n, h, w):
        raise ValueError(f"masks must be [N,H,W] = {(n, h, w)}; got {tuple(tail_specific.shape)} "
                         f"and {tuple(donor_generic.shape)}")
    device = tail_fmaps.device
    length = h * w
    tail_flat, donor_flat = tail_fmaps.flatten(2), donor_fmaps.flatten(2)     # [N, C, L]
    tail_ok, tail_level = allowed_positions(tail_fmaps, tail_specific.to(device))
    donor_ok, donor_level = allowed_positions(donor_fmaps, donor_generic.to(device))

    gamma = _rand((n,), generator, device)
    n_tail = torch.round(gamma * length).long()                               # [N]
    # Draw L candidates from each side and keep the first n_tail from the tail side: two
    # fixed-shape draws instead of a ragged per-row split.
    u = _rand((2, n, length), generator, device)
    tail_pos = _sample_positions(tail_ok, u[0])
    donor_pos = _sample_positions(donor_ok, u[1])
    from_tail = torch.arange(length, device=device)[None, :] < n_tail[:, None]  # [N, L]
    src_index = torch.where(from_tail, tail_pos, donor_pos)

    gather_idx = src_index[:, None, :].expand(n, c, length)
    fused = torch.where(
        from_tail[:, None, :],
        tail_flat.gather(2, gather_idx),
        donor_flat.gather(2, gather_idx),
    ).reshape(n, c, h, w)
    info = FusionInfo(from_tail, src_index, gamma, n_tail, tail_level, donor_level)
    return fused, info


class DonorPool:
    """Donor sample indices grouped by class in CSR form (vectorised sampling, built once).

    ``indices[offsets[c]:offsets[c+1]]`` are the sample indices of class ``c``.
    """

    def __init__(self, indices: Tensor, offsets: Tensor):
        self.indices = indices.long()
        self.offsets = offsets.long()
        self.num_classes = self.offsets.numel() - 1

    @classmethod
    def from_labels(cls, labels: Tensor, num_classes: int, sample_ids: Tensor | None = None) -> "DonorPool":
        """Pool where sample ``sample_ids[i]`` (default ``i``) has class ``labels[i]``."""
        labels = torch.as_tensor(labels).reshape(-1).long()
        ids = torch.arange(labels.numel(), device=labels.device) if sample_ids is None else \
            torch.as_tensor(sample_ids, device=labels.device).reshape(-1).long()
        order = torch.sort(labels, stable=True).indices
        counts = torch.bincount(labels, minlength=int(num_classes))
        offsets = torch.zeros(int(num_classes) + 1, dtype=torch.long, device=labels.device)
        offsets[1:] = counts.cumsum(0)
        return cls(ids[order], offsets)

    @classmethod
    def from_mapping(cls, by_class: Mapping[int, Sequence[int] | Tensor], num_classes: int) -> "DonorPool":
        ids, labels = [], []
        for c, members in by_class.items():
            members = torch.as_tensor(members, dtype=torch.long).reshape(-1)
            ids.append(members)
            labels.append(torch.full_like(members, int(c)))
        if not ids:
            return cls(torch.zeros(0, dtype=torch.long), torch.zeros(int(num_classes) + 1, dtype=torch.long))
        return cls.from_labels(torch.cat(labels), num_classes, torch.cat(ids))

    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str) -> "DonorPool":
        return DonorPool(self.indices.to(device), self.offsets.to(device))


def sample_donors(
    tail_labels: Tensor,
    confusing: Tensor,
    donor_pool_by_class: DonorPool | Mapping[int, Sequence[int] | Tensor],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """For each tail sample: a confusing class uniformly among its row of ``confusing``
    (``LongTensor[C, nf]``, see :func:`fsa.confusion.confusing_table`), then a donor uniformly
    among that class's pool. Returns ``(donor_ids long[N], donor_classes long[N])``.

    Entries of -1 and confusing classes without any donor in the pool are skipped (the choice is
    uniform over the remaining ones); a tail class with none left raises UserError.
    """
    pool = donor_pool_by_class if isinstance(donor_pool_by_class, DonorPool) else \
        DonorPool.from_mapping(donor_pool_by_class, confusing.shape[0])
    device = tail_labels.device
    pool = pool.to(device)
    confusing = confusing.to(device).long()
    labels = tail_labels.reshape(-1).long()
    n = labels.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    candidates = confusing[labels]                                          # [N, nf]
    class_counts = pool.counts()
    in_range = (candidates >= 0) & (candidates < pool.num_classes)
    safe = torch.where(in_range, candidates, torch.zeros_like(candidates))
    valid = in_range & (class_counts[safe] > 0)                             # [N, nf]
    n_valid = valid.sum(dim=1)
    if bool((n_valid == 0).any()):
        bad = sorted(set(labels[n_valid == 0].tolist()))
        raise UserError(
            f"tail classes {bad} have no donor: none of their confusing classes has a sample in "
            "the donor pool. Check the phase-II confusing-class file against the dataset."
        )
    u = _rand((2, n), generator, device)
    # k-th valid candidate per row via the running count of valid entries.
    k = _uniform_index(n_valid, u[0])
    slot = torch.searchsorted(valid.long().cumsum(dim=1), k[:, None], right=True).squeeze(1)
    donor_class = safe.gather(1, slot[:, None]).squeeze(1)
    member = _uniform_index(class_counts[donor_class], u[1])
    donor_ids = pool.indices[pool.offsets[donor_class] + member]
    return donor_ids, donor_class


def fuse_from_cams(
    tail_fmaps: Tensor,
    tail_cams: Tensor,
    tail_labels: Tensor,
    donor_fmaps: Tensor,
    donor_cams: Tensor,
    ts: float,
    tg: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, FusionInfo]:
    """Convenience for phase III: masks from the CAMs (tail: ``cam >= ts``, donor: ``cam < tg``),
    then :func:`fuse`. Returns ``(fused, labels, info)`` where ``labels`` are the tail rows' own
    labels, row by row (never one label for the whole batch)."""
    tail_specific, _ = split_masks(tail_cams, ts, tg)
    _, donor_generic = split_masks(donor_cams, ts, tg)
    fused, info = fuse(tail_fmaps, tail_specific, donor_fmaps, donor_generic, generator)
    labels = tail_labels.reshape(-1).long().clone()
    if labels.numel() != fused.shape[0]:
        raise ValueError(f"got {labels.numel()} tail labels for {fused.shape[0]} tail maps")
    return fused, labels, info


# ---------------------------------------------------------------- matching fused rows to real statistics

# `fusion.match`: none = the paper's rule (fused maps as they come), norm, moments (see match_statistics)
MATCH_MODES = ("none", "norm", "moments")


@dataclass
class ClassStatistics:
    """Per-class statistics of pooled features (``K`` classes, ``D`` dimensions), float64.

    ``count [K]`` rows; ``norm [K]`` mean L2 norm of the rows; ``mean [K, D]`` and ``std [K, D]`` the
    per-dimension mean and population standard deviation (correction 0, so that a matched set of rows
    reproduces it exactly). Entries of a class without rows are NaN."""

    count: Tensor
    norm: Tensor
    mean: Tensor
    std: Tensor

    def to(self, device: torch.device | str) -> "ClassStatistics":
        return ClassStatistics(self.count.to(device), self.norm.to(device), self.mean.to(device), self.std.to(device))

    def summary(self) -> dict:
        """Plain per-class lists for results.json: ``rows``, ``norm`` (mean L2 norm) and ``std`` (the mean over
        dimensions of the per-dimension std); null where a class has no row."""
        present = (self.count > 0).tolist()

        def listed(values: Tensor) -> list:
            return [float(v) if ok else None for v, ok in zip(values.tolist(), present)]

        return {"rows": [int(n) for n in self.count.tolist()], "norm": listed(self.norm),
                "std": listed(self.std.mean(dim=1) if self.std.shape[1] else self.std.sum(dim=1))}


class PooledMoments:
    """Running per-class sums of pooled feature rows, on their device (no per-sample Python loop):
    ``sums [K, 2 + 2D]`` float64 = (rows, sum of L2 norms, sum of x, sum of x^2) per class. The sums of
    two accumulators (or of the ranks of a torchrun job) add up to those of all their rows."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu"):
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.sums = torch.zeros(self.num_classes, 2 + 2 * self.dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, pooled: Tensor, labels: Tensor) -> "PooledMoments":
        """Add rows ``pooled [N, D]`` of classes ``labels [N]``."""
        if pooled.dim() != 2 or pooled.shape[1] != self.dim:
            raise ValueError(f"pooled rows must be [N, {self.dim}]; got {tuple(pooled.shape)}")
        x = pooled.detach().to(self.sums.device, torch.float64)
        rows = torch.cat([torch.ones_like(x[:, :1]), x.norm(dim=1, keepdim=True), x, x * x], dim=1)
        self.sums.index_add_(0, labels.reshape(-1).to(self.sums.device).long(), rows)
        return self

    def statistics(self) -> ClassStatistics:
        n = self.sums[:, 0]
        d = self.dim
        per_row = self.sums[:, 1:] / n[:, None]  # NaN where a class has no row
        mean = per_row[:, 1:1 + d]
        var = (per_row[:, 1 + d:] - mean * mean).clamp_min(0)
        return ClassStatistics(n.clone(), per_row[:, 0], mean, var.sqrt())


def class_statistics(pooled: Tensor, labels: Tensor, num_classes: int) -> ClassStatistics:
    """:class:`ClassStatistics` of rows ``pooled [N, D]`` with classes ``labels [N]``."""
    return PooledMoments(num_classes, pooled.shape[1], pooled.device).add(pooled, labels).statistics()


def match_statistics(maps: Tensor, labels: Tensor, target: ClassStatistics, mode: str) -> Tensor:
    """Generated maps ``[N, C, H, W]`` of classes ``labels [N]``, rescaled so that their pooled features
    (the spatial mean, ``LTModel.pool``) take the real statistics ``target`` of their class.

    ``none``: ``maps`` itself (the paper's rule).

    ``norm`` (per sample): each map times ``target.norm[y] / ||p||``, ``p`` its pooled feature, so every
    generated row of class ``y`` has the class's mean real norm. A row whose ``p`` is zero stays as it is.

    ``moments`` (per class, over this batch's generated rows): the rows of class ``y`` are standardised with
    their own per-dimension mean ``m`` and population std ``s``, then mapped to the real ones, ``p' =
    target.mean[y] + (p - m) * target.std[y] / s``; done on the map as the per-channel affine ``a * F + b``
    (``a = target.std / s``, ``b = target.mean - a * m``), which the spatial mean carries to ``p'`` exactly.
    After it, the generated rows of each class have the real per-dimension mean and std exactly. Why this and
    not a per-sample affine: a per-dimension std is a property of a set of rows, which one row cannot be
    rescaled to; the class's generated rows of the batch (at least ``na`` per tail sample) are the smallest
    such set that needs no state carried between iterations, so a run stays a pure function of (seed,
    iteration) and resumes exactly. Where ``s`` is 0 (a class with one generated row in the batch, or a
    dimension constant over its rows) the rows take the class's real mean there. Under torchrun the set is
    this process's generated rows.

    Classes without real rows in ``target`` (count 0) are left as they are. The factors are computed in
    float64 from the maps themselves and are differentiated through (like a normalisation layer) when the
    maps carry gradients (an unfrozen last stage)."""
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown fusion.match {mode!r}; available: {', '.join(MATCH_MODES)}")
    if mode == "none" or maps.shape[0] == 0:
        return maps
    if maps.dim() != 4:
        raise ValueError(f"maps must be [N, C, H, W]; got {tuple(maps.shape)}")
    # (every division and square root below only sees values where it is defined, so that no NaN reaches
    # the gradients either)
    device = maps.device
    count, t_norm = target.count.to(device), target.norm.to(device).nan_to_num(0.0)
    t_mean, t_std = target.mean.to(device).nan_to_num(0.0), target.std.to(device).nan_to_num(0.0)
    y = labels.reshape(-1).to(device).long()
    known = count[y] > 0                                                     # [N]
    pooled = maps.to(torch.float64).mean(dim=(2, 3))                         # [N, C]
    if mode == "norm":
        sq = (pooled * pooled).sum(dim=1)
        ok = known & (sq > 0)
        norm = torch.where(ok, sq, torch.ones_like(sq)).sqrt()
        scale = torch.where(ok, t_norm[y] / norm, torch.ones_like(norm))
        return maps * scale.to(maps.dtype)[:, None, None, None]
    n = torch.zeros_like(count, dtype=torch.float64).index_add_(0, y, torch.ones_like(pooled[:, 0]))
    m = torch.zeros_like(t_mean).index_add_(0, y, pooled) / n.clamp_min(1)[:, None]       # [K, C]
    dev = pooled - m[y]
    var = torch.zeros_like(t_mean).index_add_(0, y, dev * dev) / n.clamp_min(1)[:, None]
    spread = var > 0
    a = torch.where(spread, t_std / torch.where(spread, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    a, b = a[y], t_mean[y] - a[y] * m[y]                                     # [N, C]
    a = torch.where(known[:, None], a, torch.ones_like(a))
    b = torch.where(known[:, None], b, torch.zeros_like(b))
    return maps * a.to(maps.dtype)[:, :, None, None] + b.to(maps.dtype)[:, :, None, None]
