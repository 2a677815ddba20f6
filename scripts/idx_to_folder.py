"""Write the images of an MNIST-style IDX file as a folder of 32x32 RGB PNGs, one sub-folder per
label.

Grey 28x28 digits are padded by 2 pixels of black on every side and repeated to 3 channels, the
usual way to show MNIST or Fashion-MNIST to a CIFAR-10 model as an out-of-distribution set:

    python scripts/idx_to_folder.py ../shared/data/mnist/MNIST/raw/t10k-images-idx3-ubyte \
        ../shared/data/mnist/MNIST/raw/t10k-labels-idx1-ubyte runs/ood/mnist --max_images 1000

The result reads as `--ood_dataset runs/ood/mnist` (or in `--datasets`) of eval_wrn_ebm.py. Plain or
.gz IDX files both work.
"""
import argparse
import gzip
import os
import sys

import numpy as np
from PIL import Image

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # the IDX magic numbers of uint8 image and label files


def read_idx(path, magic, header_bytes):
    """The uint8 payload of an IDX file as (count, *shape); checks the magic number first."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        sys.exit(f"{path}: magic number {found}, expected {magic}: not an IDX {kind} file")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range((header_bytes - 4) // 4)]
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="IDX images (+ labels) -> PATH/<label>/NNNNN.png, "
                                                 "32x32 RGB",
                                     allow_abbrev=False)
    add = parser.add_argument
    add("images", help="IDX image file, e.g. t10k-images-idx3-ubyte(.gz)")
    add("labels", help="IDX label file, e.g. t10k-labels-idx1-ubyte(.gz)")
    add("out", help="folder to write (created)")
    add("--max_images", type=int, default=None, help="only the first this many images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    images = read_idx(args.images, IMAGES_MAGIC, 16)  # 16-byte header: magic, count, rows, cols
    labels = read_idx(args.labels, LABELS_MAGIC, 8)  # 8-byte header: magic, count
    if len(images) != len(labels):
        sys.exit(f"{len(images)} images but {len(labels)} labels: pass the matching pair of files")
    n = len(images) if args.max_images is None else min(args.max_images, len(images))
    pad = [((32 - images.shape[1]) // 2,) * 2, ((32 - images.shape[2]) // 2,) * 2]
    for i in range(n):
        folder = os.path.join(args.out, str(labels[i]))
        os.makedirs(folder, exist_ok=True)
        grey = np.pad(images[i], pad)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(os.path.join(folder, f"{i:05d}.png"))
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
