"""Rewrite a checkpoint of an earlier version of this project (format 1) in the safe format (format
2).

Format 1 held numpy's random-number state as a pickled array, so it loads only with full unpickling,
which can run code hidden in a file: the training and evaluation scripts refuse it. For a file you
trust (one your own runs wrote), convert it once:

    python scripts/convert_checkpoint.py runs/old/last_ckpt.pt runs/old/last_ckpt_v2.pt

The new file holds tensors and plain values only: it resumes (`--resume`), loads (`--load_path`),
and opens with a plain `torch.load(path)`. NEW may be OLD itself; the write is atomic. Files of the
paper's code need no conversion.
"""
import os
import sys

# the repository's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the import below needs the path above
from jem.checkpoint import FORMAT_VERSION, convert_trusted_checkpoint  # noqa: E402
from jem.flags.common import OneLineErrors  # noqa: E402

from utils import run_cli  # noqa: E402


def parse_args(argv=None):
    parser = OneLineErrors(description="Rewrite a trusted format-1 JEM checkpoint in the safe "
                                       f"format (format {FORMAT_VERSION}). Reading OLD unpickles "
                                       "it fully.")
    parser.add_argument("old", help="checkpoint to read (full unpickling: only a file you trust)")
    parser.add_argument("new", help="where to write the converted checkpoint (may be OLD itself)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ckpt = convert_trusted_checkpoint(args.old, args.new)
    print(f"wrote {args.new} (format {ckpt['format_version']}, loads with weights_only=True)")


if __name__ == "__main__":
    run_cli(main)
