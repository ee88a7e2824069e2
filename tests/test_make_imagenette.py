"""scripts/make_imagenette.py: the real-photo test set from an Imagenette-style folder."""
import subprocess
import sys

from PIL import Image

from data_helpers import REPO, photo

SCRIPT = REPO / "scripts" / "make_imagenette.py"


def test_resizes_and_limits_per_class_keeping_split_and_classes(tmp_path):
    src, dst = tmp_path / "imagenette2", tmp_path / "mini"
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n02102040")):
            folder = src / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                img = photo(90 + 13 * i, 70 + 7 * c, seed=10 * c + i)
                img.convert("L" if i == 1 else "RGB").save(folder / f"{wnid}_{i}.JPEG", quality=90)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(src), str(dst), "--size", "24",
                           "--train-per-class", "2", "--val-per-class", "5"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.JPEG"))
    assert files == [f"{split}/{wnid}/{wnid}_{i}.JPEG" for split, n in (("train", 2), ("val", 2))
                     for wnid in ("n01440764", "n02102040") for i in range(n)]
    for path in dst.rglob("*.JPEG"):
        with Image.open(path) as img:
            assert img.size == (24, 24) and img.mode == "RGB" and img.format == "JPEG"
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none"), str(dst)],
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "has no train/ and val/" in bad.stderr
