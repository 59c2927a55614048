"""Ablation report of one config: a row per method of the method table (engine.methods, METHODS.arms():
phase I methods, then each phase III method on each backbone) and any other phase III run, side by side,
from each run's selected model (best validation score, or the final evaluation without a validation split).

    python report.py --config smoke
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2   # mean ± std over seeds
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2 --pairs fsa_offline:la_posthoc
    python report.py --config cifar10-LT_resnet18 --seeds 0 1 2                 # the same as --notes seed0 seed1 seed2
    python report.py --config cifar10-LT_resnet18 --variants default lr05 --seeds 0 1 2   # variants side by side

With two or more notes it also gives each method's paired difference to its control (FSA: the
same-mode cRT control) and to its phase I backbone (same note = same seed and backbone), and to any
further reference asked for with --pairs METHOD:REFERENCE (report.json row ids): per note, mean and
a 95% t-interval.

--variants A B ... sets the runs of pipeline.py --note A, --note B ... (no --note: variant default) side
by side, over the notes pipeline.py --seeds gives them (A-seed0 ..., seed0 ... for default; without
--seeds the note A itself): one table with a column group per variant, and each row's paired difference
B - A by seed (same seed = pair) with its 95% t-interval.

Reads checkpoints/<phase>/<config>/<note>/results.json; writes reports/<config>/<notes>/ (ablation.md,
ablation.csv, report.json, and the figures ablation.png, forest.png, per_class.png, confusion_<row>.png,
curves_<row>.png) and prints the table. <notes> names the note set: the note (reports/smoke/default/), or
the sorted notes joined with '+' (reports/cifar10-LT_resnet18/seed0+seed1+seed2/; past 100 characters a
prefix and a hash), so the report of one note set never replaces another's; variants side by side go to
the variants joined with ',' in the order given, then '@' and the seed notes (default,lr05@seed0+seed1).
The table also names the code versions (commits) its runs come from when they are mixed.

Runs that do not belong together are an error naming them and the fix, never a table: a results.json
that cannot be read or holds a metric that is not a finite number (null = absent group); runs whose
saved dataset or model settings or class counts differ (only the seed may); a phase III run whose
phase I run was retrained or edited after it (phase III's provenance check).
"""
from utils.cli import ScriptParser, run_cli


def main() -> None:
    parser = ScriptParser(__doc__)  # --output-root: where the runs are read and the report written
    parser.add_argument("--config", required=True, help="config name the runs were made with")
    notes = parser.add_mutually_exclusive_group()
    notes.add_argument("--notes", nargs="+", metavar="NOTE",
                       help="notes to aggregate (default: default); several give mean ± sample std")
    notes.add_argument("--variants", nargs="+", metavar="NAME",
                       help="variants side by side (each the --note of a pipeline.py run; default = none), the "
                            "first the reference of the paired differences")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="the notes pipeline.py --seeds made: seedS, or NAME-seedS of each --variants NAME")
    parser.add_argument("--pairs", nargs="+", default=[], metavar="METHOD:REFERENCE",
                        help="further paired differences, by report.json row id (e.g. fsa_offline:crt)")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    if bad := [text for text, pair in zip(args.pairs, pairs) if len(pair) != 2 or not all(pair)]:
        parser.error(f"--pairs takes METHOD:REFERENCE row ids (e.g. fsa_offline:crt), got {' '.join(bad)}")
    if args.variants and pairs:
        parser.error("--pairs compares rows within one note set; with --variants each row is compared across variants")
    if args.notes and args.seeds:
        parser.error("--seeds names the notes (seedS); give either --notes or --seeds, or --variants with --seeds")
    from analysis import report  # imported after argument parsing so --help stays fast

    if args.variants:
        report.build_variant_report(args.config, args.variants, args.seeds)
    else:
        notes = report.variant_notes(report.DEFAULT_VARIANT, args.seeds) if args.seeds else args.notes or ["default"]
        report.run(args.config, notes, pairs)


if __name__ == "__main__":
    run_cli(main)
