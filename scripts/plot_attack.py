"""Draw the robust accuracy of several `eval_wrn_ebm.py --eval attack` runs on one plot.

    python scripts/plot_attack.py runs/attack/refine0 runs/attack/refine1 runs/attack/refine10 \
        --out runs/attack/linf.png
"""
import os
import sys

# the repository's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jem.eval.attack import read_attack_result, run_label  # noqa: E402
from jem.eval.plots import legend_labels, plot_robustness  # noqa: E402
from jem.flags.common import OneLineErrors  # noqa: E402
from utils import run_cli  # noqa: E402


def parse_args(argv=None):
    parser = OneLineErrors(prog="plot_attack.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+",
                        help="attack.json files, or the save dirs that hold them")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per run (default: its refinement steps and chains)")
    parser.add_argument("--out", default="attack_overlay.png", help="the PNG to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = [read_attack_result(path) for path in args.runs]
    labels = legend_labels(args.labels, [run_label(result) for result in results])
    plot_robustness(list(zip(labels, results)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
