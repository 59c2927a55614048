"""Ablation report of one config: Phase I baseline, cRT control, FSA offline / online, TailCalib(X)
and any other phase III run side by side, from each run's selected model (best validation score, or
the final evaluation without a validation split).

    python report.py --config smoke
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2   # mean ± std over seeds
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2 --pairs fsa_offline:la_posthoc

With two or more notes it also gives each method's paired difference to its control (FSA: the
same-mode cRT control) and to its phase I backbone (same note = same seed and backbone), and to any
further reference asked for with --pairs METHOD:REFERENCE (report.json row ids): per note, mean and
a 95% t-interval.

Reads checkpoints/<phase>/<config>/<note>/results.json; writes reports/<config>/<notes>/ (ablation.md,
ablation.csv, ablation.png, per_class.png, report.json) and prints the table. <notes> names the note
set: the note (reports/smoke/default/), or the sorted notes joined with '+'
(reports/cifar10-LT_resnet18/seed0+seed1+seed2/; past 100 characters a prefix and a hash), so the
report of one note set never replaces another's.

Runs that do not belong together are an error naming them and the fix, never a table: a results.json
that cannot be read or holds a metric that is not a finite number (null = absent group); runs whose
saved dataset or model settings or class counts differ (only the seed may); a phase III run whose
phase I run was retrained or edited after it (phase III's provenance check).
"""
import argparse

from utils.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name the runs were made with")
    parser.add_argument("--notes", nargs="+", default=["default"], metavar="NOTE",
                        help="notes to aggregate (default: default); several give mean ± sample std")
    parser.add_argument("--pairs", nargs="+", default=[], metavar="METHOD:REFERENCE",
                        help="further paired differences, by report.json row id (e.g. fsa_offline:crt)")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    if bad := [text for text, pair in zip(args.pairs, pairs) if len(pair) != 2 or not all(pair)]:
        parser.error(f"--pairs takes METHOD:REFERENCE row ids (e.g. fsa_offline:crt), got {' '.join(bad)}")
    from analysis import report  # imported after argument parsing so --help stays fast

    report.run(args.config, list(args.notes), pairs)


if __name__ == "__main__":
    run_cli(main)
