"""The whole FSA-LT chain for one config, then the ablation report.

    python pipeline.py --config smoke
    python pipeline.py --config fashion-mnist-LT_resnet32 --seeds 0 1 2 --device 0
    python pipeline.py --config smoke --note iters100 --opts finetune.iterations=100 --seeds 0 1

For each note: phase I -> phase II -> every phase III method of the --suite in the method table's order
(engine/methods/; the default suite fsa: post-hoc logit adjustment, tau-normalised classifier, cRT
control and FSA offline, cRT control and FSA online, TailCalib, TailCalibX) -> visualize; then
report.py over all notes (reports/<config>/<notes>/). The first line the pipeline prints lists the steps. configs/phase_i/NAME.yaml must exist; a missing
configs/phase_ii or phase_iii/NAME.yaml means that phase's defaults. Finished steps are skipped, never
rerun, and interrupted ones resumed with their own settings, so rerunning the same command continues
where it stopped.
--seeds 0 1 2 runs notes seed0 seed1 seed2 (NOTE-seed0 ... with --note NOTE) with --opts seed=N
(same long-tailed subset).
--opts KEY=VALUE goes to every phase whose config has KEY (e.g. train.lr: phase I only,
finetune.iterations: phase III only, seed: all; visualize gets phase II's). An unknown key is an
error listing the known ones. Because finished steps are not rerun, --opts that would change an
existing run of the same note is refused: run a variant under a new --note.
"""
import argparse
import sys

from engine.methods import SUITES  # the method table imports nothing heavy
from utils.cli import ScriptParser, run_cli


def resolved_configs(args: argparse.Namespace) -> str:
    """--print-config: the config of each phase as the chain's (first) note gets it, one YAML document per
    phase (``yaml.safe_load_all`` reads them back), headed by a comment naming the phase."""
    from app.steps import config_sources, notes_and_opts, route_opts
    from utils.config import CONFIG_PHASES, config_text, load_config

    sources = config_sources(args.config)
    routed = route_opts(list(args.opts), seeded=bool(args.seeds))
    notes = notes_and_opts(args.note, args.seeds)
    note, seeded = notes[0]
    others = " (the other notes differ in seed only)" if len(notes) > 1 else ""
    return "".join(f"--- # {phase} of note {note}{others}\n"
                   f"{config_text(load_config(sources[phase], phase, [*seeded, *routed[phase]]))}"
                   for phase in CONFIG_PHASES)


def main() -> None:
    parser = ScriptParser(__doc__, print_config=resolved_configs)
    parser.add_argument("--config", required=True,
                        help="config name: configs/phase_i/NAME.yaml (phase_ii / phase_iii NAME.yaml optional)")
    parser.add_argument("--note", default=None,
                        help="experiment name; outputs go to .../<config>/<note>/ (default: default); "
                             "with --seeds the notes are NOTE-seedN")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="N",
                        help="run the chain for notes seedN (NOTE-seedN) with seed=N each, then one report over them")
    parser.add_argument("--opts", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, each passed to every phase whose config has KEY (e.g. train.lr=0.05 "
                             "finetune.iterations=1000); finished steps are not rerun, so use a new --note for a variant")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, or a GPU index such as 0")
    parser.add_argument("--suite", default="fsa", choices=SUITES,
                        help="fsa (default): the FSA chain, its cRT controls, TailCalib(X) and the post-hoc methods "
                             "(seconds); full: also the re-trained classifiers (LWS, cRT) and the other phase I "
                             "methods (focal, class-balanced, balanced softmax, logit-adjusted, LDAM-DRW, CosineCE), "
                             "each a phase I run; tailcalibx: the TailCalibX release's seven experiments (CE, CosineCE, "
                             "cRT, CBD and its teachers, TailCalib(X) on CosineCE, TailCalibX on CBD)")
    args = parser.parse_args()
    from app import pipeline  # imported after argument parsing so --help stays fast

    spec = pipeline.PipelineSpec(config=args.config, note=args.note, seeds=tuple(args.seeds) if args.seeds else None,
                                 opts=tuple(args.opts), device=args.device, suite=args.suite)
    try:
        pipeline.run(spec)
    except KeyboardInterrupt:
        print("interrupted: run the same pipeline command again to resume where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
