"""Benchmark: vectorised TailCalib `generate` vs a straightforward per-sample loop.

Input has the size of CIFAR-100-LT (imbalance 100): 100 classes, n_i = floor(500 * 100^(-i/99)),
10,847 samples, random non-negative features of dimension 64 and 512.  The loop reference has the
public release's structure: per real sample of an under-filled class, find the k nearest class
means, build the calibrated mean / covariance, and call numpy's `multivariate_normal` for that
sample's share of draws (one SVD per call).  When the loop would run longer than `--loop-budget`
seconds it is timed on a random subset of the real samples and extrapolated; the output says so.

Default: the library's `generate` (L2-normalised input, statistics after Tukey, neighbours among
the other classes, no ridge) against a loop with the same semantics.  `--release`: the drop-in
`TailCalib("numpy").generate` with the pip package's semantics (no L2-normalisation, statistics
before Tukey, own class among the neighbours, `+ 1e-4 I` on every calibrated covariance) against a
loop with those semantics, i.e. the release's own algorithm.

    python benchmarks/bench_tailcalib.py [--dims 64 512] [--loop-budget 60] [--repeats 3] [--release]
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsa.generators.tailcalib_api import generate  # noqa: E402
from fsa.generators.tailcalib_dropin import TailCalib  # noqa: E402


def cifar100_lt_labels(n_max=500, rho=100, C=100):
    counts = [int(np.floor(n_max * rho ** (-i / (C - 1)))) for i in range(C)]
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)]), counts


def loop_reference(X, y, *, tukey=1.0, alpha=0.0, k=3, seed=0, budget=60.0, release=False):
    """Per-sample loop. Returns (seconds for the full job, extrapolated?, sources done, sources total).

    release=False: the library's semantics; release=True: the pip package's (see module docstring).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    S = X if release else X / np.linalg.norm(X, axis=1, keepdims=True)
    Z = np.log(S + 1e-6) if tukey == 0 else S**tukey
    if not release:
        S = Z  # class statistics after the transform
    classes = np.unique(y)
    means, covs, rows = [], [], []
    for c in classes:
        idx = np.flatnonzero(y == c)
        rows.append(idx)
        means.append(S[idx].mean(0))
        covs.append(np.cov(S[idx], rowvar=False) if len(idx) > 1 else np.zeros((S.shape[1],) * 2))
    means, covs = np.array(means), np.array(covs)
    T = max(len(r) for r in rows)
    jobs = []  # (class index, row, number of draws)
    for ci, idx in enumerate(rows):
        need = T - len(idx)
        if need <= 0:
            continue
        share = np.full(len(idx), need // len(idx))
        share[: need % len(idx)] += 1
        jobs += [(ci, r, s) for r, s in zip(idx, share) if s > 0]
    t_stats = time.perf_counter() - t0

    order = rng.permutation(len(jobs))  # random subset if the budget runs out
    t1 = time.perf_counter()
    done = 0
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in order:
            ci, r, s = jobs[j]
            x = Z[r]
            dist = np.linalg.norm(means - x, axis=1)
            if not release:
                dist[ci] = np.inf
            nn = np.argpartition(dist, k)[:k]
            mu = (means[nn].sum(0) + x) / (k + 1)
            cov = covs[nn].mean(0) + alpha
            if release:
                cov += 1e-4 * np.eye(len(x))
            out.append(rng.multivariate_normal(mu, cov, size=s))
            done += 1
            if time.perf_counter() - t1 > budget:
                break
    t_loop = time.perf_counter() - t1
    total = t_stats + t_loop * len(jobs) / done
    return total, done < len(jobs), done, len(jobs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--loop-budget", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--release", action="store_true",
                    help="time the drop-in TailCalib with the pip package's semantics (and loop)")
    args = ap.parse_args()
    if args.release:
        drop_in = TailCalib("numpy")

        def run(X, y, seed):
            return drop_in.generate(X=X, y=y, tukey_value=1.0, topk=args.k, seed=seed)
    else:
        def run(X, y, seed):
            return generate(X, y, k=args.k, seed=seed)

    y, counts = cifar100_lt_labels()
    print(f"CIFAR-100-LT-sized input: {len(counts)} classes, {len(y)} samples "
          f"({counts[0]} -> {counts[-1]} per class), k={args.k}, "
          f"{len(counts) * counts[0] - len(y)} samples to generate; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; semantics: {'release (drop-in TailCalib)' if args.release else 'library'}")
    for d in args.dims:
        rng = np.random.default_rng(d)
        X = rng.random((len(y), d)).astype(np.float32)
        times, n_warn = [], 0
        for rep in range(args.repeats):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                f, lab, per = run(X, y, rep)
                times.append(time.perf_counter() - t0)
            n_warn = sum(issubclass(w.category, RuntimeWarning) for w in rec)
        vec = float(np.median(times))
        assert f.shape == (len(counts) * counts[0], d)
        loop, extrap, done, total = loop_reference(X, y, k=args.k, budget=args.loop_budget, release=args.release)
        how = (f"EXTRAPOLATED from {done}/{total} real samples timed in ~{args.loop_budget:.0f} s"
               if extrap else f"full run, {total} real samples")
        print(f"D={d:4d}: vectorised {vec:8.3f} s (median of {args.repeats}; jitter warnings "
              f"per call: {n_warn}) | per-sample loop {loop:9.2f} s ({how}) | speed-up x{loop / vec:.1f}")


if __name__ == "__main__":
    main()
