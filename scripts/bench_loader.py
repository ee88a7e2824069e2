"""Loader throughput: images/s of each backend's training pipeline (decode + augment, no model).

Compare the number with the model's training images/s: the loader must be faster, or the GPU waits.

    python scripts/bench_loader.py --data /data/imagenet/train --backend torch dali \\
        --img-size 224 --batch-size 128 --workers 8 --steps 200 --json bench.json

--data is a folder of class folders (e.g. imagenet/train) or a root holding train/. Batches come out
on the device exactly as the trainer gets them (float32 NCHW, normalised). The first --warmup
batches (pipeline build, worker start-up) are not timed; epochs roll over as needed, so each DALI
epoch's pipeline rebuild is included in the time. --upscale-from SRC --count N first fills --data
with N photos from SRC resized to --upscale-size (default 500x375, ImageNet's typical size), since
small test sets (imagenette-128) make decoding unrealistically cheap.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tresnet_train.config import DECODERS, DEVICES  # noqa: E402
from tresnet_train.data import Preprocess, TrainPlan, index_images  # noqa: E402
from tresnet_train.data.build import resolve_backend  # noqa: E402

TRESNET = {"crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0),
           "std": (1.0, 1.0, 1.0)}


def upscale_folder(src: Path, dest: Path, count: int, size: tuple[int, int]) -> None:
    """`count` images of `src` (class folders, round-robin over classes) resized to `size`."""
    from PIL import Image
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    files = [sorted(c.glob("*")) for c in classes]
    for k in range(count):
        c = k % len(classes)
        path = files[c][k // len(classes)]
        out = dest / classes[c].name / f"{path.stem}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize(size, Image.BICUBIC).save(out, quality=90)


def bench(backend: str, split, args, device: torch.device) -> dict:
    from types import SimpleNamespace
    data_cfg = SimpleNamespace(img_size=args.img_size, val_img_size=0, crop_pct=0.0, scale=[0.08, 1.0],
                               hflip=0.5, randaugment=args.randaugment, train_interpolation="",
                               autoaugment="", color_jitter=0.0)
    pre = Preprocess.from_config(data_cfg, TRESNET)
    plan = TrainPlan(len(split.samples), args.batch_size, 1, 0, seed=0)
    if plan.steps == 0:
        raise SystemExit(f"{split.folder}: {len(split.samples)} images < one batch of {args.batch_size}")
    t0 = time.perf_counter()
    if backend == "dali":
        from tresnet_train.data.dali_backend import DaliTrainLoader
        loader = DaliTrainLoader(split, plan, pre, device, args.workers)
    else:
        from tresnet_train.data.torch_backend import TorchTrainLoader
        loader = TorchTrainLoader(split, plan, pre, device, args.workers, strict=False)

    def batches():
        while True:
            yield from loader

    it = batches()
    for _ in range(args.warmup):
        next(it)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        x, _ = next(it)
        images += x.shape[0]
    sync()
    seconds = time.perf_counter() - start
    return {"backend": backend, "img_per_s": images / seconds, "images": images, "seconds": seconds,
            "warmup_s": start - t0, "steps_per_epoch": len(loader)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of class folders, or a root with train/")
    p.add_argument("--backend", nargs="+", default=["torch", "dali"], choices=DECODERS)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers / DALI threads")
    p.add_argument("--steps", type=int, default=100, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--randaugment", default="", help="timm spec, e.g. rand-m9-mstd0.5-inc1")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--upscale-from", help="fill --data first with photos from this folder, resized")
    p.add_argument("--count", type=int, default=400, help="photos for --upscale-from")
    p.add_argument("--upscale-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = Path(args.data)
    if args.upscale_from and not data.exists():
        upscale_folder(Path(args.upscale_from), data, args.count, tuple(args.upscale_size))
    if (data / "train").is_dir():
        data = data / "train"
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and
                                                              torch.cuda.is_available()) else "cpu")
    split = index_images(data, threads=max(4, args.workers))
    results = {"data": str(data), "images_in_folder": len(split.samples), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "img_size": args.img_size, "batch_size": args.batch_size, "workers": args.workers,
               "randaugment": args.randaugment, "runs": []}
    print(f"{data}: {len(split.samples)} images | {device} | img {args.img_size} | batch "
          f"{args.batch_size} | workers {args.workers} | {args.steps} timed steps")
    for backend in sorted(set(args.backend), key=["torch", "dali"].index):  # fork before DALI threads
        resolve_backend(backend)  # a clear error when DALI is missing
        r = bench(backend, split, args, device)
        results["runs"].append(r)
        print(f"  {backend:5s} {r['img_per_s']:8.1f} img/s  ({r['images']} images in "
              f"{r['seconds']:.1f} s; warm-up {r['warmup_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
