"""Benchmark: the main job's wall time per step, on a quiet machine or beside one busy CPU process.

Runs ``pipeline.py --config CONFIG`` in a fresh output folder (a subprocess, exactly as a user runs it)
and prints each step's seconds, read from the pipeline's own ``finished in X s`` lines, with the
phase I top-1 of the run. ``--busy`` starts one process that keeps one core busy (a pure-Python loop,
what another user's job looks like to the scheduler) for the whole run and stops it after. ``--log``
reads an existing pipeline log instead of running anything (e.g. a run of an older commit), and
``--against`` prints a second log's times beside, with the ratio.

    python benchmarks/bench_main_job.py [--config fashion-mnist-LT_resnet20] [--seed 0] [--busy]
                                        [--opts KEY=VALUE ...] [--log FILE] [--against FILE]

The figures are comparable only when measured on one machine with nothing else running (besides
``--busy``'s own process).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^\[pipeline\] \S+ (?:\d+/\d+ (?P<step>.+?)|(?P<report>report) \(.*\)): finished in (?P<s>[\d.]+) s(?: \(expected .*\))?$")
TOTAL_LINE = re.compile(r"^\[pipeline\] done in (?P<s>[\d.]+) s")


def step_seconds(log: str) -> dict[str, float]:
    """{step: seconds} of a pipeline's output, plus ``total`` (the pipeline's own 'done in' line)."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        if m := STEP_LINE.match(line.strip()):
            out[m["step"] or m["report"]] = float(m["s"])
        elif m := TOTAL_LINE.match(line.strip()):
            out["total"] = float(m["s"])
    return out


def run_pipeline(config: str, seed: int, opts: list[str], busy: bool) -> str:
    """The output of one pipeline run in a fresh temporary output folder (stdout and stderr)."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="bench_main_job_") as root:
            command = [sys.executable, str(REPO / "pipeline.py"), "--config", config, "--device", "cpu",
                       "--output-root", root, "--opts", f"seed={seed}", *opts]
            print("running:", " ".join(command), "(beside one busy process)" if busy else "", flush=True)
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"the pipeline failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            return done.stdout + done.stderr
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion-mnist-LT_resnet20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--busy", action="store_true", help="run beside one process that keeps a core busy")
    parser.add_argument("--log", help="read this pipeline log instead of running the pipeline")
    parser.add_argument("--against", help="a second pipeline log, shown beside with the ratio this / that")
    parser.add_argument("--save-log", help="write the run's pipeline output here")
    args = parser.parse_args()

    started = time.perf_counter()
    log = Path(args.log).read_text() if args.log else run_pipeline(args.config, args.seed, args.opts, args.busy)
    if args.save_log and not args.log:
        Path(args.save_log).write_text(log)
    this = step_seconds(log)
    if not this:
        sys.exit("no '[pipeline] ... finished in X s' lines in the log")
    other = step_seconds(Path(args.against).read_text()) if args.against else {}
    top1 = re.search(r"finished: test top1 ([\d.]+)", log)  # the first run of the chain: phase I
    print(f"\n{args.config}, seed {args.seed}{', beside one busy process' if args.busy else ''}"
          f"{f'; phase I top-1 {top1[1]}' if top1 else ''}"
          + ("" if args.log else f"; measured in {time.perf_counter() - started:.0f} s"))
    header = "| step | seconds |" + (" against (s) | x |" if other else "")
    print(header + "\n" + re.sub(r"[^|]+", "---:", header).replace("|---:|", "|:---|", 1))
    for step, seconds in this.items():
        row = f"| {step} | {seconds:.1f} |"
        if other:
            that = other.get(step)
            row += f" {that:.1f} | {seconds / that:.2f} |" if that else " - | - |"
        print(row)


if __name__ == "__main__":
    main()
