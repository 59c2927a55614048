"""Benchmark: step times at 1 and 2 CPU threads, quiet and beside one busy process (the thread policy's case).

Three kinds of step, each timed in a fresh process (torch's thread pool starts clean):

  conv      a ResNet-20 training step on a batch of 128 Fashion-size images (1x28x28), float32 or
            bf16 autocast + channels-last (``--amp``)
  small     a linear classifier's SGD step on 128 of 20,000 64-d features (what TailCalib, cRT and the
            classifier-only phase III steps are made of: many small operations)
  tailcalib ``fsa.generators.tailcalib.generate`` on Fashion-MNIST-LT-sized input (14,886 64-d features,
            10 classes, 6000 -> 60 per class)

For each, the mean time of a step at 1 and 2 threads (``torch.set_num_threads``), first on a quiet
machine, then beside one process that keeps a core busy (a pure-Python loop), and ``auto``: what
``accel.threads: auto`` (utils/threads.py) does there, i.e. the thread count it settles on after its
first load reading. Ratios are against the quiet 2-thread time. Run it on an otherwise idle machine.

    python benchmarks/bench_threads.py [--amp none|bf16] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, REPO)
import torch
kind, threads, amp, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
if threads == "auto":
    from utils import threads as policy_module
    policy = policy_module.apply("auto")
    end = time.monotonic() + policy_module.FIRST_CHECK_S + 0.05
    while time.monotonic() < end:  # busy for the first reading, as a run is
        torch.randn(256, 256) @ torch.randn(256, 256)
    policy.tick()
else:
    torch.set_num_threads(int(threads))
if kind == "conv":
    from models import build_model
    model = build_model("resnet20", 10, 1)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    if amp == "bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
elif kind == "small":
    lin = torch.nn.Linear(64, 10); opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    feats, labels = torch.randn(20000, 64), torch.randint(0, 10, (20000,))
    def step():
        idx = torch.randint(0, 20000, (128,))
        loss = torch.nn.functional.cross_entropy(lin(feats[idx]), labels[idx])
        opt.zero_grad(); loss.backward(); opt.step()
else:
    from fsa.generators import tailcalib_api as tailcalib
    counts = [int(6000 * 0.01 ** (i / 9)) for i in range(10)]
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)]); X = torch.rand(len(y), 64)
    def step():
        tailcalib.generate(X, y, seed=0)
step(); step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"ms": (time.perf_counter() - start) / steps * 1000, "threads": torch.get_num_threads()}))
'''

STEPS = {"conv": 8, "small": 600, "tailcalib": 3}


def timed(kind: str, threads: str, amp: str, scale: float) -> dict:
    steps = max(1, int(STEPS[kind] * scale))
    out = subprocess.run([sys.executable, "-c", CHILD.replace("REPO", repr(str(REPO))), kind, threads, amp, str(steps)],
                         capture_output=True, text=True, check=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # auto must see no fixed count
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each kind's number of timed steps")
    args = parser.parse_args()
    rows = {}
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        time.sleep(0.5 if busy else 0)
        try:
            for kind in STEPS:
                for threads in ("1", "2", "auto"):
                    rows[(kind, threads, busy)] = timed(kind, threads, args.amp, args.scale)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(f"\nstep times in ms, amp {args.amp} for conv; ratio against quiet with 2 threads; auto: the count it chose")
    print("| step | threads | quiet | x | beside one busy process | x |\n|:---|:---|---:|---:|---:|---:|")
    for kind in STEPS:
        base = rows[(kind, "2", False)]["ms"]
        for threads in ("1", "2", "auto"):
            quiet, busy = rows[(kind, threads, False)], rows[(kind, threads, True)]
            label = threads if threads != "auto" else f"auto ({quiet['threads']} quiet, {busy['threads']} busy)"
            print(f"| {kind} | {label} | {quiet['ms']:.2f} | {quiet['ms'] / base:.2f} | {busy['ms']:.2f} | "
                  f"{busy['ms'] / base:.2f} |")


if __name__ == "__main__":
    main()
