"""Benchmark: phase I training throughput under torchrun with 1, 2, ... processes (DDP scaling).

Runs the real `phase_i_train_or_test.py` under `torchrun --standalone --nproc_per_node=N` for every
N of `--procs`, in a scratch folder, and reads the per-epoch `train_s` / `images_per_s` that phase I
records in `results.json` (training only: evaluation and checkpoint writing are not in it). The
first epoch is a warm-up and left out; the figure is the best of the remaining epochs. The global
batch is the same for every N (each process takes batch / N rows), so every N does the same
optimisation; `scaling` is images/s at N over images/s at the smallest N.

On the CPU each process gets `--threads` torch threads (gloo between processes), or with
`--share-threads` `--threads / N` of them, so that every N uses the same cores (the fair question on a
CPU: does one process with all cores beat N processes sharing them?). On a machine with GPUs use
`--device auto` (one GPU per process, NCCL).

    python benchmarks/bench_ddp.py [--data synthetic|fashion-mnist] [--procs 1 2] [--epochs 3] [--threads 1]
                                   [--share-threads]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"synthetic": "smoke", "fashion-mnist": "fashion-mnist-LT_resnet32"}


def threads_per_process(procs: int, args: argparse.Namespace) -> int:
    return max(args.threads // procs, 1) if args.share_threads else args.threads


def run_phase_i(workdir: Path, procs: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(procs, args)), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (workdir / "configs").symlink_to(REPO / "configs")
    note = f"procs{procs}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(REPO / "phase_i_train_or_test.py"), "--config", CONFIGS[args.data], "--device", args.device,
               "--note", note, "--opts", f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}",
               f"train.batch_size={args.batch_size}", *args.opts]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"phase I with {procs} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads((workdir / f"checkpoints/phase_i/{CONFIGS[args.data]}/{note}/results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=tuple(CONFIGS))
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch (divisible by every N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--share-threads", action="store_true", help="N processes share --threads threads")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or auto (one GPU per process, NCCL)")
    parser.add_argument("--opts", nargs="*", default=[], help="more phase I --opts, e.g. accel.amp=bf16")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is a warm-up)")

    rows = []
    for procs in sorted(args.procs):
        with tempfile.TemporaryDirectory() as tmp:
            results = run_phase_i(Path(tmp), procs, args)
        timed = results["history"][1:]
        best = max(timed, key=lambda h: h["images_per_s"])
        rows.append((procs, threads_per_process(procs, args), best["images_per_s"], best["train_s"],
                     [round(h["images_per_s"], 1) for h in timed]))
    base = rows[0][2]
    print(f"phase I, config {CONFIGS[args.data]}, global batch {args.batch_size}, device {args.device}; "
          f"best of epochs 2..{args.epochs}")
    print(f"{'processes':>9} {'threads each':>12} {'images/s':>10} {'epoch train s':>14} {'scaling':>8}   all epochs (images/s)")
    for procs, threads, ips, seconds, every in rows:
        print(f"{procs:>9} {threads:>12} {ips:>10.1f} {seconds:>14.2f} {ips / base:>7.2f}x   {every}")


if __name__ == "__main__":
    main()
