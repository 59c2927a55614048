"""Head/tail split, confusing classes, decomposition and fusion (docs/METHOD.md section 2)."""

import math

import numpy as np
import pytest
import torch

from fsa.class_split import head_tail_split
from fsa.confusion import ScoreAccumulator, confusing_classes, confusing_table
from fsa.decomposition import SplitStatistics, split_masks
from fsa.fusion import ALL, MASK, NONZERO, DonorPool, fuse, fuse_from_cams, sample_donors
from utils.errors import UserError


# ---------------------------------------------------------------- head / tail split

def test_head_tail_split_hand_examples():
    counts = [500, 300, 100, 50, 30, 20]  # total 1000; cumulative 500, 800, 900, 950, 980, 1000
    assert head_tail_split(counts, 0.9) == ([0, 1, 2], [3, 4, 5])   # 900/1000 reaches 0.9 exactly
    assert head_tail_split(counts, 0.5) == ([0], [1, 2, 3, 4, 5])
    assert head_tail_split(counts, 0.51) == ([0, 1], [2, 3, 4, 5])
    assert head_tail_split(counts, 0.95) == ([0, 1, 2, 3], [4, 5])
    assert head_tail_split(counts, 0.951) == ([0, 1, 2, 3, 4], [5])
    assert head_tail_split(counts, 1.0) == ([0, 1, 2, 3, 4, 5], [])
    assert head_tail_split(torch.tensor(counts), 0.9) == ([0, 1, 2], [3, 4, 5])


def test_head_tail_split_unsorted_ties_and_zero():
    assert head_tail_split([30, 500, 20, 100, 300, 50], 0.9) == ([1, 3, 4], [0, 2, 5])
    # ties: the smaller class index ranks first
    assert head_tail_split([10, 10, 10, 10], 0.5) == ([0, 1], [2, 3])
    assert head_tail_split([10, 20, 20, 10], 0.6) == ([1, 2], [0, 3])
    assert head_tail_split([10, 20, 20, 10], 0.7) == ([0, 1, 2], [3])
    # classes without samples are never needed to reach hr, so they are tail
    assert head_tail_split([5, 0, 5], 1.0) == ([0, 2], [1])


@pytest.mark.parametrize("hr", [0, 0.0, -0.1, 1.01, float("nan"), "0.9", True])
def test_head_tail_split_bad_hr(hr):
    with pytest.raises(UserError):
        head_tail_split([5, 3, 1], hr)


@pytest.mark.parametrize("counts", [[], [0, 0], [3, -1], [1.5, 2]])
def test_head_tail_split_bad_counts(counts):
    with pytest.raises(UserError):
        head_tail_split(counts, 0.9)


# ---------------------------------------------------------------- confusing classes

# Row t = true class t. Row ranking and column ranking disagree on purpose.
S = torch.tensor([
    [0.70, 0.20, 0.05, 0.05],
    [0.00, 0.90, 0.10, 0.00],
    [0.30, 0.00, 0.60, 0.10],
    [0.40, 0.00, 0.00, 0.60],
])


def test_confusing_classes_rank_rows_not_columns():
    got = confusing_classes(S, [0, 3], nf=1)
    assert got == {0: [1], 3: [0]}
    # the transposed (buggy) ranking would give class 3 for class 0
    assert confusing_classes(S.T, [0], nf=1) == {0: [3]}
    # ties (0.05 vs 0.05) broken by class index; the class itself is never chosen
    assert confusing_classes(S, [0, 1, 2], nf=2) == {0: [1, 2], 1: [2, 0], 2: [0, 3]}
    assert confusing_classes(S, [2], nf=3) == {2: [0, 3, 1]}
    assert confusing_classes(S, [], nf=2) == {}


def test_confusing_classes_via_accumulator_orientation():
    # Feed logits whose softmax equals S's rows for samples of the true class: the accumulator's
    # matrix must reproduce S (rows = true class) and the ranking must follow.
    acc = ScoreAccumulator(4)
    eps = 1e-6
    logits = torch.log(S + eps)
    labels = torch.arange(4)
    acc.update(logits[[0, 1]], labels[[0, 1]])
    acc.update(logits[[2, 3, 0]], labels[[2, 3, 0]])
    expected = (S + eps) / (S + eps).sum(1, keepdim=True)
    torch.testing.assert_close(acc.matrix(), expected.float(), atol=1e-6, rtol=0)
    assert acc.counts.tolist() == [2, 1, 1, 1]
    assert confusing_classes(acc.matrix(), [0, 3], 1) == {0: [1], 3: [0]}


def test_confusing_classes_bad_nf():
    for nf in (0, 4, 5, 1.5):
        with pytest.raises(UserError):
            confusing_classes(S, [0], nf)
    with pytest.raises(UserError):
        confusing_classes(S, [7], 1)


def test_score_accumulator_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    C = 7
    acc = ScoreAccumulator(C)
    all_logits, all_labels = [], []
    for b in range(5):
        logits = torch.randn(13, C, generator=gen) * 3
        labels = torch.randint(0, C - 1, (13,), generator=gen)  # class C-1 never appears
        acc.update(logits, labels)
        all_logits.append(logits.numpy())
        all_labels.append(labels.numpy())
    lg = np.concatenate(all_logits).astype(np.float64)
    lb = np.concatenate(all_labels)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = np.zeros((C, C))
    cnt = np.zeros(C, dtype=np.int64)
    for row, lab in zip(p, lb):
        ref[lab] += row
        cnt[lab] += 1
    nonempty = cnt > 0
    ref[nonempty] /= cnt[nonempty, None]
    np.testing.assert_allclose(acc.matrix().numpy(), ref, atol=1e-6)
    assert acc.counts.tolist() == cnt.tolist()
    assert (acc.matrix()[C - 1] == 0).all() and acc.counts[C - 1] == 0
    with pytest.raises(UserError):
        acc.update(torch.randn(2, C + 1), torch.tensor([0, 1]))
    with pytest.raises(UserError):
        acc.update(torch.randn(2, C), torch.tensor([0, C]))


def test_confusing_table():
    table = confusing_table({0: [1, 2], "3": [0, 1]}, 4, 2)
    assert table.tolist() == [[1, 2], [-1, -1], [-1, -1], [0, 1]]


# ---------------------------------------------------------------- decomposition

def test_split_masks_inclusive_exclusive():
    cam = torch.tensor([[[0.0, 0.2, 0.5], [0.79, 0.8, 1.0]]])
    specific, generic = split_masks(cam, 0.8, 0.2)
    assert specific.dtype == torch.bool and generic.dtype == torch.bool
    assert specific.tolist() == [[[False, False, False], [False, True, True]]]   # >= ts
    assert generic.tolist() == [[[True, False, False], [False, False, False]]]   # <  tg
    assert not (specific & generic).any()


@pytest.mark.parametrize("ts,tg", [(0.2, 0.8), (0.5, 0.5), (1.2, 0.1), (0.8, -0.1), (float("nan"), 0.1)])
def test_split_masks_bad_thresholds(ts, tg):
    with pytest.raises(UserError):
        split_masks(torch.zeros(1, 2, 2), ts, tg)


def test_split_statistics():
    cam = torch.tensor([
        [[1.0, 0.9], [0.1, 0.5]],   # class 0: specific 2/4, generic 1/4
        [[0.0, 0.0], [0.0, 0.0]],   # class 0: specific 0,   generic 4/4
        [[0.85, 0.3], [0.3, 0.3]],  # class 2: specific 1/4, generic 0
    ])
    whole = SplitStatistics(3, 0.8, 0.2)
    whole.update(cam, torch.tensor([0, 0, 2]))
    stats = whole.result()
    torch.testing.assert_close(stats["specific"][[0, 2]], torch.tensor([0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(stats["generic"][[0, 2]], torch.tensor([0.625, 0.0], dtype=torch.float64))
    assert math.isnan(stats["specific"][1]) and math.isnan(stats["generic"][1])
    assert stats["count"].tolist() == [2, 0, 1]
    acc = SplitStatistics(3, 0.8, 0.2)   # batch by batch gives the same
    acc.update(cam[:1], torch.tensor([0]))
    acc.update(cam[1:], torch.tensor([0, 2]))
    torch.testing.assert_close(acc.result()["generic"], stats["generic"], equal_nan=True)


# ---------------------------------------------------------------- fusion

def _random_case(n=300, c=4, h=5, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tail = torch.rand(n, c, h, w, generator=g) + 0.1
    donor = torch.rand(n, c, h, w, generator=g) + 0.1
    # knock out some feature vectors entirely (as ReLU features often are)
    tail = tail * (torch.rand(n, 1, h, w, generator=g) > 0.3)
    donor = donor * (torch.rand(n, 1, h, w, generator=g) > 0.3)
    spec = torch.rand(n, h, w, generator=g) > 0.6
    gen = torch.rand(n, h, w, generator=g) > 0.5
    return tail, spec, donor, gen


def test_fusion_positions_come_from_allowed_sets():
    tail, spec, donor, gen = _random_case()
    n, c, h, w = tail.shape
    L = h * w
    fused, info = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(1))
    assert fused.shape == tail.shape
    tail_ok = spec.flatten(1) & (tail.flatten(2) != 0).any(1)
    donor_ok = gen.flatten(1) & (donor.flatten(2) != 0).any(1)
    has_t, has_d = tail_ok.any(1), donor_ok.any(1)
    assert has_t.float().mean() > 0.9 and has_d.float().mean() > 0.9  # the case is meaningful
    ft, idx = info.from_tail, info.src_index
    assert ft.shape == (n, L) and idx.shape == (n, L)
    # each output vector equals the source vector it claims to come from
    src = torch.where(ft[:, None, :], tail.flatten(2).gather(2, idx[:, None, :].expand(n, c, L)),
                      donor.flatten(2).gather(2, idx[:, None, :].expand(n, c, L)))
    assert torch.equal(fused.flatten(2), src)
    # tail positions: class-specific & non-zero in that row's tail map (rows with a usable mask)
    rows_t = has_t[:, None] & ft
    assert tail_ok.gather(1, idx)[rows_t].all()
    rows_d = has_d[:, None] & ~ft
    assert donor_ok.gather(1, idx)[rows_d].all()
    assert (info.tail_fallback[has_t] == MASK).all() and (info.donor_fallback[has_d] == MASK).all()
    # never a zero vector: every map here has non-zero vectors
    assert ((fused.flatten(2) != 0).any(1)).all()


def test_fusion_counts_follow_gamma():
    tail, spec, donor, gen = _random_case(n=4000, c=2, seed=3)
    L = 25
    _, info = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(4))
    assert torch.equal(info.n_tail, torch.round(info.gamma * L).long())
    assert torch.equal(info.from_tail.sum(1), info.n_tail)
    share = info.n_tail.float() / L
    assert abs(share.mean().item() - 0.5) < 0.02
    assert abs((info.gamma < 0.25).float().mean().item() - 0.25) < 0.03   # gamma ~ U(0, 1)
    assert info.gamma.min() >= 0 and info.gamma.max() < 1


def test_fusion_samples_uniformly_with_repetition():
    n, c, h, w = 2000, 3, 4, 4
    tail = torch.ones(n, c, h, w)
    donor = torch.ones(n, c, h, w)
    spec = torch.zeros(n, h, w, dtype=torch.bool)
    spec[:, 0, 1] = spec[:, 3, 2] = True         # positions 1 and 14
    gen = torch.zeros(n, h, w, dtype=torch.bool)
    gen[:, 2, :] = True                          # positions 8..11
    _, info = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(5))
    t_idx = info.src_index[info.from_tail]
    d_idx = info.src_index[~info.from_tail]
    assert set(t_idx.unique().tolist()) == {1, 14}
    assert set(d_idx.unique().tolist()) == {8, 9, 10, 11}
    assert abs((t_idx == 1).float().mean().item() - 0.5) < 0.02
    assert abs((d_idx == 9).float().mean().item() - 0.25) < 0.02
    # repetition: rows with more than two tail positions necessarily repeat one of the two
    assert (info.n_tail > 2).any()


def test_fusion_keeps_each_rows_tail_label():
    labels = torch.tensor([3, 7, 1, 7, 0, 5])
    n, c, h, w = len(labels), 2, 3, 3
    # tail vectors encode their label (+1), donor vectors are -1: the tail part of fused row i
    # must carry label i
    tail = (labels.float() + 1)[:, None, None, None].expand(n, c, h, w).clone()
    donor = -torch.ones(n, c, h, w)
    cams_t = torch.rand(n, h, w, generator=torch.Generator().manual_seed(0))
    cams_t[:, 0, 0] = 1.0
    cams_d = torch.zeros(n, h, w)
    fused, out_labels, info = fuse_from_cams(tail, cams_t, labels, donor, cams_d, 0.8, 0.2,
                                             generator=torch.Generator().manual_seed(1))
    assert out_labels.tolist() == labels.tolist()
    for i in range(n):
        vals = fused[i, 0].flatten()[info.from_tail[i]]
        assert (vals == labels[i] + 1).all()
        assert (fused[i, 0].flatten()[~info.from_tail[i]] == -1).all()


def test_fusion_fallbacks():
    n, c, h, w = 4, 2, 3, 3
    g = torch.Generator().manual_seed(0)
    tail = torch.rand(n, c, h, w, generator=g) + 0.5
    donor = torch.rand(n, c, h, w, generator=g) + 0.5
    spec = torch.zeros(n, h, w, dtype=torch.bool)
    gen = torch.zeros(n, h, w, dtype=torch.bool)
    # row 0: tail mask empty -> all non-zero tail positions; zero out some of them
    tail[0, :, 0, :] = 0
    # row 1: tail mask only on zero vectors -> also falls back to the non-zero positions
    tail[1, :, 1, 1] = 0
    spec[1, 1, 1] = True
    gen[1] = True
    # row 2: tail map entirely zero -> all positions; donor has a proper generic set
    tail[2] = 0
    spec[2, 0, 0] = True
    gen[2, 2, 2] = True
    # row 3: donor map entirely zero, tail mask proper
    donor[3] = 0
    spec[3, 2, 0] = True
    fused, info = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(2))
    assert info.tail_fallback.tolist() == [NONZERO, NONZERO, ALL, MASK]
    assert info.donor_fallback.tolist() == [NONZERO, MASK, MASK, ALL]
    ti = info.src_index
    ft = info.from_tail
    assert (ti[0][ft[0]] >= 3).all()                    # row 0 tail: never the zeroed top row
    assert (ti[1][ft[1]] != 4).all()                    # row 1 tail: never the zero centre
    assert (ti[2][~ft[2]] == 8).all()                   # row 2 donor: its generic position
    assert (ti[3][ft[3]] == 6).all()                    # row 3 tail: its specific position
    assert torch.isfinite(fused).all()
    # non-zero output vectors wherever the source side had non-zero vectors
    nz = (fused.flatten(2) != 0).any(1)
    assert nz[0].all() and nz[1].all()
    assert nz[2][~ft[2]].all() and not nz[2][ft[2]].any()
    assert nz[3][ft[3]].all() and not nz[3][~ft[3]].any()


def test_fusion_reproducible_and_differentiable():
    tail, spec, donor, gen = _random_case(n=8)
    a, _ = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(9))
    b, _ = fuse(tail, spec, donor, gen, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    t = tail.clone().requires_grad_(True)
    out, _ = fuse(t, spec, donor, gen, generator=torch.Generator().manual_seed(9))
    out.sum().backward()
    assert t.grad is not None and t.grad.sum() > 0
    half, _ = fuse(tail.half(), spec, donor.half(), gen, generator=torch.Generator().manual_seed(9))
    assert half.dtype == torch.float16


# ---------------------------------------------------------------- donor sampling

def test_sample_donors_only_from_confusing_classes():
    C, nf = 6, 2
    pool_labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 10 + [3] * 5 + [4] * 3 + [5] * 2)
    pool = DonorPool.from_labels(pool_labels, C)
    table = confusing_table({3: [0, 1], 4: [2, 0], 5: [1, 3]}, C, nf)
    tail_labels = torch.tensor([3, 4, 5] * 2000)
    ids, cls = sample_donors(tail_labels, table, pool, generator=torch.Generator().manual_seed(0))
    assert ids.shape == tail_labels.shape and cls.shape == tail_labels.shape
    assert torch.equal(pool_labels[ids], cls)            # the donor really is of that class
    allowed = table[tail_labels]
    assert ((allowed == cls[:, None]).any(1)).all()
    # uniform over the nf confusing classes, and over the members of the chosen class
    m3 = tail_labels == 3
    assert abs((cls[m3] == 0).float().mean().item() - 0.5) < 0.05
    members1 = ids[cls == 1]
    assert len(members1.unique()) == 20
    # mapping input works the same way
    by_class = {c: torch.nonzero(pool_labels == c).flatten() + 1000 for c in range(C)}
    ids2, cls2 = sample_donors(tail_labels[:30], table, by_class, generator=torch.Generator().manual_seed(0))
    assert ((table[tail_labels[:30]] == cls2[:, None]).any(1)).all()
    assert torch.equal(pool_labels[ids2 - 1000], cls2)


def test_sample_donors_skips_empty_classes_and_errors():
    pool = DonorPool.from_labels(torch.tensor([0, 0, 1, 1]), 4)   # classes 2 and 3 have no donors
    table = torch.tensor([[1, 2], [0, -1], [3, 0], [2, 3]])
    ids, cls = sample_donors(torch.tensor([2] * 100 + [1] * 100), table, pool,
                             generator=torch.Generator().manual_seed(1))
    assert (cls == 0).all()
    with pytest.raises(UserError):
        sample_donors(torch.tensor([3]), table, pool)
