"""Ablation report of one config: Phase I baseline, cRT control, FSA offline / online, TailCalib(X)
and any other phase III run side by side, from each run's selected model (best validation score, or
the final evaluation without a validation split).

    python report.py --config smoke
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2   # mean ± std over seeds

With two or more notes it also gives each FSA run's paired difference to its same-mode cRT control
and to phase I (same note = same seed and backbone): per note, mean and a 95% t-interval.

Reads checkpoints/<phase>/<config>/<note>/results.json; writes reports/<config>/ (ablation.md,
ablation.csv, ablation.png, per_class.png, report.json) and prints the table. A results.json that
exists but cannot be read is an error naming it (rerun that run with --overwrite, or delete it).
"""
import argparse

from utils.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name the runs were made with")
    parser.add_argument("--notes", nargs="+", default=["default"], metavar="NOTE",
                        help="notes to aggregate (default: default); several give mean ± sample std")
    args = parser.parse_args()
    from analysis import report  # imported after argument parsing so --help stays fast

    report.run(args.config, list(args.notes))


if __name__ == "__main__":
    run_cli(main)
