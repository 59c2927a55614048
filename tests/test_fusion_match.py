"""fusion.match (fsa.fusion.match_statistics), the per-class statistics behind it and the ones every phase III
map run records (engine.map_statistics.RowStatistics), the cosine schedule and finetune.init: reinit."""
import math

import pytest
import torch

from engine import map_statistics, phase_iii_maps
from fsa.batch_composition import TailHeadComposer
from fsa.confusion import confusing_table
from fsa.fusion import PooledMoments, class_statistics, match_statistics
from fsa.generators import FusionGenerator, GeneratorContext, ResampleGenerator
from models import CosineClassifier, build_model, fresh_like

# real pooled features, D = 2: class 0 rows (3, 4) and (0, 2); class 1 row (1, 0); class 2 none
REAL = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
REAL_Y = torch.tensor([0, 0, 1])


def maps_of(pooled: torch.Tensor) -> torch.Tensor:
    """[N, D, 1, 2] maps whose spatial mean is `pooled` (the two positions differ, so a map is not its mean)."""
    offset = torch.arange(pooled.shape[1], dtype=pooled.dtype) + 1.0
    return torch.stack([pooled + offset, pooled - offset], dim=-1)[:, :, None, :]


def test_class_statistics_by_hand():
    t = class_statistics(REAL, REAL_Y, 3)
    assert t.count.tolist() == [2, 1, 0]
    assert t.norm[:2].tolist() == [3.5, 1.0]                  # (5 + 2) / 2, 1
    assert t.mean[:2].tolist() == [[1.5, 3.0], [1.0, 0.0]]
    assert t.std[:2].tolist() == [[1.5, 1.0], [0.0, 0.0]]     # population std: |3 - 0| / 2, |4 - 2| / 2
    assert torch.isnan(t.norm[2]) and torch.isnan(t.mean[2]).all()
    assert t.summary() == {"rows": [2, 1, 0], "norm": [3.5, 1.0, None], "std": [1.25, 0.0, None]}


def test_pooled_moments_equal_a_direct_computation_and_add_up():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g) * 3 + 1, torch.randint(0, 4, (50,), generator=g)
    whole = class_statistics(x, y, 4)
    parts = PooledMoments(4, 6).add(x[:20], y[:20])
    parts.sums += PooledMoments(4, 6).add(x[20:], y[20:]).sums  # two processes' sums
    for t in (whole, parts.statistics()):
        for c in range(4):
            rows = x[y == c].double()
            torch.testing.assert_close(t.norm[c], rows.norm(dim=1).mean())
            torch.testing.assert_close(t.mean[c], rows.mean(0))
            torch.testing.assert_close(t.std[c], rows.std(0, correction=0))


def test_norm_match_gives_every_generated_row_its_class_mean_real_norm():
    target = class_statistics(REAL, REAL_Y, 3)
    pooled = torch.tensor([[6.0, 8.0], [0.5, 0.5], [2.0, 0.0], [0.0, 0.0], [7.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 0, 2])
    out = match_statistics(maps_of(pooled), labels, target, "norm")
    p = out.double().mean(dim=(2, 3))
    norms = p.norm(dim=1)
    torch.testing.assert_close(norms[:3], torch.tensor([3.5, 3.5, 1.0], dtype=torch.float64))
    # direction kept: row 0 (6, 8) -> 3.5 * (0.6, 0.8)
    torch.testing.assert_close(p[0], torch.tensor([2.1, 2.8], dtype=torch.float64))
    # a zero feature cannot be rescaled; a class without real rows is left as it is
    torch.testing.assert_close(out[3:], maps_of(pooled)[3:])


def test_moments_match_gives_each_classs_generated_rows_the_real_per_dimension_mean_and_std():
    target = class_statistics(REAL, REAL_Y, 3)
    pooled = torch.tensor([[6.0, 8.0], [0.5, 1.5], [2.0, -1.0],   # class 0: three rows
                           [2.0, 3.0],                            # class 1: one row
                           [7.0, 1.0]])                           # class 2: no real rows
    labels = torch.tensor([0, 0, 0, 1, 2])
    maps = maps_of(pooled).requires_grad_()
    out = match_statistics(maps, labels, target, "moments")
    p = out.double().mean(dim=(2, 3))
    torch.testing.assert_close(p[:3].mean(0), torch.tensor([1.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(p[:3].std(0, correction=0), torch.tensor([1.5, 1.0], dtype=torch.float64))
    # order within the class is kept per dimension (an increasing affine map)
    assert p[:3, 0].argsort().tolist() == pooled[:3, 0].argsort().tolist()
    # one row: its std cannot be matched, it takes the real mean; no real rows: unchanged
    torch.testing.assert_close(p[3], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[4], maps[4].detach())
    out.sum().backward()  # gradients (an unfrozen last stage) stay finite
    assert torch.isfinite(maps.grad).all()


def test_match_none_returns_the_maps_themselves():
    target = class_statistics(REAL, REAL_Y, 3)
    maps = maps_of(torch.rand(4, 2))
    assert match_statistics(maps, torch.zeros(4, dtype=torch.long), target, "none") is maps
    with pytest.raises(ValueError, match="unknown fusion.match"):
        match_statistics(maps, torch.zeros(4, dtype=torch.long), target, "whiten")


LABELS = torch.tensor([0] * 50 + [1] * 30 + [2] * 6 + [3] * 4 + [4] * 2)
HEAD, TAIL = [0, 1], [2, 3, 4]
CONFUSING = confusing_table({2: [0, 1], 3: [1, 0], 4: [0, 3]}, 5, 2)


def context(match: str, nt: int = 3, na: int = 2) -> GeneratorContext:
    composer = TailHeadComposer(LABELS, TAIL, HEAD, nt, na, seed=0)
    ctx = GeneratorContext(labels=LABELS, confusing=CONFUSING, composer=composer, na=na, ts=0.8, tg=0.2, match=match)
    ctx.targets = class_statistics(torch.rand(len(LABELS), 64, generator=torch.Generator().manual_seed(2)) + 1, LABELS, 5)
    return ctx


def test_match_rescales_fused_rows_only_never_the_controls_real_rows():
    maps, labels = torch.rand(4, 64, 2, 2) * 5, torch.tensor([2, 2, 3, 4])
    assert FusionGenerator(context("norm")).matches and not FusionGenerator(context("none")).matches
    assert FusionGenerator(context("none")).match(maps, labels) is maps
    control = ResampleGenerator(context("norm"))
    assert not control.matches and control.match(maps, labels) is maps
    fused = FusionGenerator(context("norm"))
    torch.testing.assert_close(fused.match(maps, labels).mean(dim=(2, 3)).norm(dim=1),
                               fused.ctx.targets.norm[labels].float())


def _batches(match: str, iterations: int = 3):
    """batch_loss over a few iterations of a tiny fusion run, with a spy on the rows the classifier gets."""
    ctx = context(match)
    gen = FusionGenerator(ctx)
    model = build_model("resnet8", 5)
    table = torch.rand(len(LABELS), 64, 2, 2, generator=torch.Generator().manual_seed(1)) * 2
    seen = []
    head = model.head

    def spy(fmap):
        seen.append(fmap.detach().clone())
        return head(fmap)

    model.head = spy

    def fetch(indices, rng):
        return table[indices], torch.rand(len(indices), 2, 2, generator=rng), LABELS[indices]

    return ctx, gen, model, fetch, seen


@pytest.mark.parametrize("match", ["none", "norm"])
def test_recorded_statistics_equal_an_independent_computation(match):
    ctx, gen, model, fetch, seen = _batches(match)
    stats = map_statistics.RowStatistics(5, 64, torch.device("cpu"), gen.matches)
    outputs, targets = [], []
    for it in range(3):
        plan, rng = ctx.composer.plan(it)
        loss, logits, y = phase_iii_maps.batch_loss(model, gen, plan, rng, fetch, stats=stats)
        outputs.append((loss.detach(), logits.detach()))
        targets.append(y)
    stats.book()
    summary = stats.summary(3, ctx.targets if gen.matches else None)
    # independently: the pooled rows the classifier saw; rows nt .. nt + nt*na of each batch are the generated ones
    nt, na = 3, 2
    rows = torch.cat([s.mean(dim=(2, 3)) for s in seen]).double()
    y = torch.cat(targets)
    generated = torch.cat([torch.arange(len(s)) for s in seen])
    generated = (generated >= nt) & (generated < nt + nt * na)
    for group, mask in (("generated", generated), ("real", ~generated)):
        for c in range(5):
            sel = rows[mask & (y == c)]
            assert summary[group]["rows"][c] == len(sel)
            if not len(sel):
                assert summary[group]["norm"][c] is None and summary[group]["std"][c] is None
                continue
            assert summary[group]["norm"][c] == pytest.approx(float(sel.norm(dim=1).mean()), rel=1e-9)
            assert summary[group]["std"][c] == pytest.approx(float(sel.std(0, correction=0).mean()), rel=1e-6, abs=1e-9)
    assert ("generated_before_match" in summary) == (match != "none") == ("match_targets" in summary)
    # recording changes nothing the classifier trains on
    ctx2, gen2, model2, fetch2, _ = _batches(match)
    model2.load_state_dict(model.state_dict())
    for it in range(3):
        plan, rng = ctx2.composer.plan(it)
        loss, logits, _ = phase_iii_maps.batch_loss(model2, gen2, plan, rng, fetch2)
        assert torch.equal(loss.detach(), outputs[it][0]) and torch.equal(logits.detach(), outputs[it][1])
    # last.pt carries the booked sums: a resumed run continues them
    again = map_statistics.RowStatistics(5, 64, torch.device("cpu"), gen.matches)
    again.load(stats.state(), 3)
    assert again.summary(3, None)["real"] == summary["real"] and again.first == 0
    old = map_statistics.RowStatistics(5, 64, torch.device("cpu"), gen.matches)
    old.load(None, 2)  # a last.pt from before the record: the statistics cover the iterations from 2 on
    assert old.summary(3, None)["iterations"] == [2, 3]


def test_cosine_schedule_by_iteration():
    f = {"lr": 0.2, "iterations": 100, "schedule": "cosine"}
    lr = phase_iii_maps.finetune_lr
    assert lr(0, f) == pytest.approx(0.2)
    assert lr(50, f) == pytest.approx(0.1)
    assert lr(100, f) == pytest.approx(0.0, abs=1e-12)
    for i in (1, 17, 73, 99):
        assert lr(i, f) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * i / 100)))
    assert [lr(i, {**f, "schedule": "constant"}) for i in (0, 50, 99)] == [0.2, 0.2, 0.2]


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_reinit_gives_a_fresh_classifier_of_the_backbones_kind(classifier):
    torch.manual_seed(123)
    model = build_model("resnet8", 5, classifier=classifier)
    with torch.no_grad():
        model.fc.weight.fill_(0.5)  # "phase I" weights
    before = torch.get_rng_state()
    fresh = phase_iii_maps.fresh_classifier(model, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the run's other draws are untouched
    assert type(fresh) is type(model.fc) and fresh.weight.shape == model.fc.weight.shape
    assert not torch.equal(fresh.weight, model.fc.weight)
    if classifier == "cosine":
        assert isinstance(fresh, CosineClassifier) and fresh.scale_value() == model.fc.scale_value()
    again = phase_iii_maps.fresh_classifier(model, seed=7)  # fsa and its control start from the same one
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(7)  # drawn from the seed
    drawn = fresh_like(model.fc)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), drawn.state_dict().values()))
    assert not torch.equal(phase_iii_maps.fresh_classifier(model, seed=8).weight, fresh.weight)
