"""Write a folder of uniform-noise 32x32 RGB PNGs (every pixel independent, uniform over 0..255), an
out-of-distribution set that needs no data:

    python scripts/noise_folder.py runs/ood/noise --n_images 1000 --seed 0

The folder reads as `--ood_dataset runs/ood/noise` of eval_wrn_ebm.py (loose images, unlabeled).
"""
import argparse
import os

import numpy as np
from PIL import Image


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="a folder of uniform-noise 32x32 RGB PNGs",
                                     allow_abbrev=False)
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--n_images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.RandomState(args.seed)
    for i in range(args.n_images):
        pixels = rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(args.out, f"{i:05d}.png"))

    print(f"wrote {args.n_images} noise images to {args.out}")


if __name__ == "__main__":
    main()
