"""scripts/offline/{prepare,install}.sh: bundle wheels and data into parts, install them with no index.

No network: a local folder of tiny wheels stands in for the index (pip reads PIP_NO_INDEX and
PIP_FIND_LINKS). tiny-a needs tiny-b and tiny-c; the target "already has" tiny-c (--exclude), as a
GPU machine already has its torch.
"""
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "scripts" / "offline" / "prepare.sh"
INSTALL = REPO / "scripts" / "offline" / "install.sh"


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel: module `name` with VERSION."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                      + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = [f"{path},sha256={digest(text)},{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return path


def run(cmd: list, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """prepare.sh's output for tiny-a (tiny-c excluded) and one data folder, in 3 KiB parts."""
    tmp = tmp_path_factory.mktemp("offline")
    index = tmp / "index"
    index.mkdir()
    make_wheel(index, "tiny_a", "1.0", ("tiny_b>=2", "tiny_c"))
    make_wheel(index, "tiny_b", "2.1")
    make_wheel(index, "tiny_c", "3.0")
    data = tmp / "photos"
    for i in range(4):
        (data / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (data / "train" / f"c{i % 2}" / f"{i}.JPEG").write_bytes(os.urandom(2000 + 100 * i))
    out = tmp / "bundle"
    proc = run([PREPARE, "--exclude", "tiny-c", "--iabn", "none", "--data", data, "--part-size", "3K",
                "--out", out, "tiny_a"], PIP_NO_INDEX=1, PIP_FIND_LINKS=index)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"out": out, "index": index, "data": data, "tmp": tmp, "stdout": proc.stdout}


def test_prepare_writes_checked_parts_without_the_excluded_package(bundle):
    out = bundle["out"]
    parts = sorted(out.glob("bundle.tar.part*"))
    assert len(parts) > 3 and all(p.stat().st_size <= 3 * 1024 for p in parts)
    manifest = (out / "bundle.sha256").read_text().split("\n")
    assert [line.split()[1] for line in manifest if line] == [p.name for p in parts]
    info = (out / "bundle.txt").read_text()
    assert "tiny_a-1.0-py3-none-any.whl" in info and "tiny_b-2.1-py3-none-any.whl" in info
    assert "tiny_c" not in info.split("wheels:")[1]  # excluded: the target already has it
    assert "the target already has (not bundled): tiny-c" in info
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_install_from_parts_in_two_folders(bundle, tmp_path):
    # the target's environment, which already has tiny-c (as a GPU machine has its torch)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=900)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index",
                    bundle["index"] / "tiny_c-3.0-py3-none-any.whl"], check=True, timeout=900)
    # parts copied over in two batches, to two folders
    first, second = tmp_path / "usb1", tmp_path / "usb2"
    first.mkdir(), second.mkdir()
    parts = sorted(bundle["out"].glob("bundle.tar.part*"))
    for i, part in enumerate(parts):
        shutil.copy(part, first if i % 2 else second)
    shutil.copy(bundle["out"] / "bundle.sha256", first)
    data_dir = tmp_path / "datasets"
    env = {"TMPDIR": tmp_path}
    proc = run([INSTALL, "--python", py, "--data-dir", data_dir, first, second], **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = subprocess.run([py, "-c", "import tiny_a, tiny_b, tiny_c; print(tiny_a.VERSION, tiny_b.VERSION, "
                            "tiny_c.VERSION)"], capture_output=True, text=True, timeout=900)
    assert check.stdout.split() == ["1.0", "2.1", "3.0"], check.stderr
    src = bundle["data"]
    copied = {p.relative_to(data_dir / "photos"): p.read_bytes() for p in (data_dir / "photos").rglob("*.JPEG")}
    assert copied == {p.relative_to(src): p.read_bytes() for p in src.rglob("*.JPEG")}
    assert f"export TRESNET_DATA={data_dir}" in proc.stdout
    again = run([INSTALL, "--python", py, "--data-dir", data_dir, first, second], **env)
    assert again.returncode == 0 and "exists: kept as it is" in again.stdout, again.stdout + again.stderr


def test_install_names_a_missing_or_damaged_part(bundle, tmp_path):
    parts = sorted(bundle["out"].glob("bundle.tar.part*"))
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in parts[1:]:
        shutil.copy(part, folder)
    shutil.copy(bundle["out"] / "bundle.sha256", folder)
    proc = run([INSTALL, "--python", tmp_path / "never-used", folder], TMPDIR=tmp_path)
    assert proc.returncode == 3 and f"missing part(s): {parts[0].name}" in proc.stderr, proc.stderr
    damaged = folder / parts[0].name
    damaged.write_bytes(parts[0].read_bytes()[:-1] + b"x")
    proc = run([INSTALL, "--python", tmp_path / "never-used", folder], TMPDIR=tmp_path)
    assert proc.returncode == 1 and f"{damaged} is damaged" in proc.stderr, proc.stderr
