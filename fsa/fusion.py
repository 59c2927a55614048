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

__all__ = ["FusionInfo", "fuse", "fuse_from_cams", "DonorPool", "sample_donors", "allowed_positions"]

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
