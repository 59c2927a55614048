"""An honest hyper-parameter sweep: every grid point of a method and of its paired control per seed, each
arm's point chosen by mean validation score over the seeds, reported once on test.

    python sweep.py --config NAME --method fsa_offline --grid finetune.lr=0.001,0.01 finetune.iterations=200,400 --seeds 0 1 2
    python sweep.py --config NAME --method fsa_online --grid fusion.match=none,norm,moments --seeds 0 1 2 --against crt la_posthoc
    python sweep.py --config smoke --method fsa_offline --grid finetune.lr=0.005,0.02 --seeds 0 \\
        --opts dataset.val.source=train dataset.val.fraction=0.2

--method and --control are method-table ids (engine/methods/: fsa_offline, control_offline, fsa_online,
control_online, crt, tailcalib, ...); --control defaults to the method's paired control (FSA: the cRT
control of its mode), --control none sweeps the method alone. --grid KEY=V1,V2 ... takes keys of any
phase's config (routed to the phases that have them, as pipeline.py's --opts); the points are the
product of the values. Each point runs per seed as its own note, sweep-<point>-seedN (e.g.
sweep-lr0.001_iterations200-seed0), through the pipeline's step logic: finished runs are skipped,
interrupted ones resumed, so rerunning the command continues a sweep. Phase I and II are trained once per
seed (the pipeline's note seedN) and once per distinct value of the grid's phase I / II keys: a grid
over phase III keys fine-tunes every point on the same backbone (phase III --upstream-note seedN). A key
an arm does not read (tailcalib.* for the cRT control, fusion.* for it too) runs once for it.

The point of each arm is the one with the best mean validation score (mean class accuracy on the
validation split, as every run selects its checkpoint) over the seeds; a config without a validation
split (dataset.val) is refused: pass e.g. --opts dataset.val.source=train. Before anything runs, the
size (points x seeds x runs) and the expected wall time are printed (--dry-run: only that).

Writes reports/<config>/sweep-<method>-<keys>-<hash>/ (sweep.md, also printed, and sweep.json): every
point's validation score (mean ± sd over seeds), the chosen points' test numbers only, and the paired
difference chosen method - chosen control (and - each --against method's own run on the seeds' base
notes) per seed with the 95% t-interval.
"""
import argparse

from utils.cli import ScriptParser, run_cli


def _spec(args: argparse.Namespace):
    from app.sweep_plan import SweepSpec

    return SweepSpec(config=args.config, method=args.method, grid=tuple(args.grid),
                     seeds=tuple(args.seeds) if args.seeds else None, control=args.control, against=tuple(args.against),
                     opts=tuple(args.opts), note=args.note, device=args.device, dry_run=args.dry_run)


def resolved_configs(args: argparse.Namespace) -> str:
    from app import sweep

    return sweep.resolved_configs(_spec(args))


def main() -> None:
    parser = ScriptParser(__doc__, print_config=resolved_configs)
    parser.add_argument("--config", required=True,
                        help="config name: configs/phase_i/NAME.yaml (phase_ii / phase_iii NAME.yaml optional)")
    parser.add_argument("--method", required=True, metavar="ID", help="the method-table id of the swept method")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="a config key and its values, comma-separated (brackets keep a list value whole); "
                             "the points are the product of all keys' values")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="N",
                        help="run every point for each seed (notes ...-seedN, base notes seedN); the point is chosen "
                             "by the mean over them")
    parser.add_argument("--control", metavar="ID",
                        help="the control swept over the same grid (default: the method's paired control; none: no control)")
    parser.add_argument("--against", nargs="+", default=[], metavar="ID",
                        help="further methods (not swept: their own runs on the base notes) the chosen method is "
                             "paired with, e.g. crt la_posthoc")
    parser.add_argument("--opts", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="fixed config overrides of every run, routed to the phases whose config has KEY")
    parser.add_argument("--note", default=None,
                        help="prefix of the sweep's notes: base notes NOTE-seedN, points NOTE-sweep-<point>-seedN")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, or a GPU index such as 0")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the sweep and print its size and expected wall time; run nothing")
    args = parser.parse_args()
    from app import sweep  # imported after argument parsing so --help stays fast

    sweep.run(_spec(args))


if __name__ == "__main__":
    run_cli(main)
