"""A wrong file where a checkpoint belongs gets one line naming the file and what it is, and exit 2,
from train.py (model.init_from, model.pretrained, run.resume) and validate.py alike; so does a data
source that does not match its folder."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainer_helpers import NO_STDERR_FD, ROOT, env, main_in_process
from tresnet_train.cli import train_main
from tresnet_train.validation import main as validate_main


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference):
    """A text file, an empty file, a YAML config, a truncated and a whole tresnet_tiny checkpoint (the
    shared reference run's, read only)."""
    folder = tmp_path_factory.mktemp("files")
    whole = (reference.out / "last.pth").read_bytes()
    paths = {"text": folder / "notes.txt", "empty": folder / "empty.pth",
             "yaml": ROOT / "configs" / "demo.yaml", "truncated": folder / "truncated.pth",
             "tiny": reference.out / "last.pth"}
    paths["text"].write_text("101 things to do\n")
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    return paths


EXPECTED = {"text": "is a text file", "empty": "is empty (0 bytes)", "yaml": "is a text file",
            "truncated": "is truncated or corrupt", "tiny": "fit"}


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr


def _train_argv(tmp_path, *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"run.output_dir={tmp_path / 'out'}",
            "run.device=cpu", *overrides]


def _train_py(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *_train_argv(tmp_path, *overrides)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)


@NO_STDERR_FD
@pytest.mark.parametrize("kind", ["text", "empty", "yaml", "truncated"])
def test_train_py_names_the_key_and_the_file(tmp_path, files, kind, capsys):
    key = {"text": "model.init_from", "empty": "model.pretrained", "yaml": "run.resume",
           "truncated": "model.init_from"}[kind]
    proc = main_in_process(train_main, _train_argv(tmp_path, f"{key}={files[kind]}"), capsys)
    _one_line(proc, f"'{key}'", str(files[kind]), EXPECTED[kind])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["model.init_from", "run.resume"])
def test_train_py_refuses_another_models_checkpoint(tmp_path, files, key):
    proc = _train_py(tmp_path, "model.name=tresnet_m", "data.img_size=64", f"{key}={files['tiny']}")
    _one_line(proc, str(files["tiny"]), "fit")


@NO_STDERR_FD
def test_digits_source_on_another_dataset_names_the_key(tmp_path, files, capsys):
    folder = tmp_path / "photos"
    (folder / "train" / "cat").mkdir(parents=True)
    proc = main_in_process(train_main, _train_argv(tmp_path, f"data.root={folder}"), capsys)
    _one_line(proc, "'data.source' is digits", str(folder), "data.source=folder")


@pytest.mark.parametrize("kind", ["text", "empty", "yaml", "truncated", "tiny"])
def test_validate_py_names_the_file(tmp_path, files, digits, kind, capsys):
    extra = ["--model", "tresnet_m"] if kind == "tiny" else []
    proc = main_in_process(validate_main, ["--ckpt", str(files[kind]), "--data", str(digits),
                                       "--device", "cpu", "--workers", "0", *extra], capsys)
    _one_line(proc, str(files[kind]), EXPECTED[kind])
    assert "weights_only=False" not in proc.stderr  # never advise unsafe loading


class Custom:  # an object a weights-only load refuses
    pass


def test_a_weights_only_refusal_gives_no_unsafe_advice(tmp_path):
    from tresnet_train import checkpoint
    path = tmp_path / "pickled.pth"
    torch.save({"model": Custom()}, path)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(path)
    assert "weights_only=False" not in str(err.value) and str(path) in str(err.value)
