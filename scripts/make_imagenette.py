"""Write a small real-photo dataset from fast.ai's Imagenette (10 ImageNet classes), for the tests
and the Imagenette time-to-accuracy run.

    # https://github.com/fastai/imagenette: imagenette2-320.tgz (or the full-size imagenette2.tgz)
    curl -L https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz | tar -xz
    python scripts/make_imagenette.py imagenette2-320 $TRESNET_DATA/imagenette-mini-96 --size 96 \\
        --train-per-class 40 --val-per-class 10            # the tests' set: 500 images, ~2 MB
    python scripts/make_imagenette.py imagenette2-320 $TRESNET_DATA/imagenette-128 --size 128 --quality 75

Each image is resized to size x size (aspect ratio not kept, bicubic) and saved as JPEG; the
official train/val split and class folders (wnids, sorted = labels) are kept; with a per-class
limit, the first files in sorted order are taken. ImageNet photos: non-commercial research and
education use only.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

EXTENSIONS = {".jpeg", ".jpg", ".png"}


def convert(src: Path, dst: Path, size: int, quality: int) -> None:
    with Image.open(src) as img:
        img.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, "JPEG", quality=quality)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", type=Path, help="Imagenette folder with train/ and val/ (e.g. imagenette2)")
    p.add_argument("dst", type=Path, help="folder to write (train/ and val/ in ImageFolder layout)")
    p.add_argument("--size", type=int, default=128, help="output width and height, pixels")
    p.add_argument("--train-per-class", type=int, default=0, help="at most this many per class (0: all)")
    p.add_argument("--val-per-class", type=int, default=0, help="at most this many per class (0: all)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = p.parse_args(argv)
    if not ((args.src / "train").is_dir() and (args.src / "val").is_dir()):
        print(f"error: {args.src} has no train/ and val/ folders (extract imagenette2.tgz first)",
              file=sys.stderr)
        return 2
    jobs = []
    for split, limit in (("train", args.train_per_class), ("val", args.val_per_class)):
        for cls in sorted(d for d in (args.src / split).iterdir() if d.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in EXTENSIONS)
            out = args.dst / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            jobs += [(f, out / (f.stem + ".JPEG")) for f in (files[:limit] if limit else files)]
    with ThreadPoolExecutor() as pool:  # Pillow decodes and resizes outside the GIL
        list(pool.map(lambda job: convert(*job, args.size, args.quality), jobs))
    print(f"wrote {len(jobs)} images ({args.size}x{args.size}) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
