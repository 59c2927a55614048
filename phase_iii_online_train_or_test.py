"""Phase III (online): fine-tune the classifier with feature-space augmentation.

    python phase_iii_online_train_or_test.py --config cifar10-LT_resnet18 --device 0
    python phase_iii_online_train_or_test.py --config cifar10-LT_resnet18 --opts finetune.generator=none   # cRT control
"""
from utils.cli import run_cli, training_parser


def main() -> None:
    args = training_parser(__doc__).parse_args()
    from engine import phase_iii  # imported after argument parsing so --help stays fast

    phase_iii.run(args, "online")


if __name__ == "__main__":
    run_cli(main)
