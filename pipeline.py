"""The whole FSA-LT chain for one config, then the ablation report.

    python pipeline.py --config smoke
    python pipeline.py --config fashion-mnist-LT_resnet32 --seeds 0 1 2 --device 0

For each note: phase I -> phase II -> phase III online (fsa) -> phase III offline (fsa) ->
phase III offline (none: the cRT control) -> phase III offline (tailcalib) and online (tailcalibx)
where available -> visualize; then report.py over all notes (reports/<config>/).
configs/phase_i, phase_ii and phase_iii/NAME.yaml must all exist. Finished steps are skipped and
interrupted ones resumed, so rerunning the same command continues where it stopped.
--seeds 0 1 2 runs notes seed0 seed1 seed2 with --opts seed=N (same long-tailed subset).
"""
import argparse
import sys

from utils.cli import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config name: configs/phase_i|phase_ii|phase_iii/NAME.yaml must all exist")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--note", default=None, help="experiment name; outputs go to .../<config>/<note>/ (default: default)")
    group.add_argument("--seeds", type=int, nargs="+", metavar="N",
                       help="run the chain for notes seedN with seed=N each, then one report over them")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, or a GPU index such as 0")
    args = parser.parse_args()
    from engine import pipeline  # imported after argument parsing so --help stays fast

    try:
        pipeline.run(args)
    except KeyboardInterrupt:
        print("interrupted: run the same pipeline command again to resume where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
