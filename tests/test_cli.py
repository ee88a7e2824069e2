"""train.py's command line: --print-config shows the resolved config (every key) and builds nothing."""
import subprocess
import sys
from pathlib import Path

import yaml

from tresnet_train.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_print_config_shows_every_key_resolved_and_builds_nothing(tmp_path):
    out = tmp_path / "run"
    proc = train_py("--config", "configs/tresnet_m.yaml", "--print-config", "optim.lr=0.3",
                    "data.root=/no/such/folder", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    expected = to_dict(load_config("configs/tresnet_m.yaml",
                                   ["optim.lr=0.3", "data.root=/no/such/folder", f"run.output_dir={out}"]))
    assert printed == expected  # every section and key, the override and the file's values applied
    assert printed["optim"]["lr"] == 0.3 and printed["model"]["name"] == "tresnet_m"
    assert not out.exists()  # no run folder: nothing was built (the data folder is not even checked)
    path = tmp_path / "resolved.yaml"  # the output is itself a config file that gives the same run
    path.write_text(proc.stdout)
    assert to_dict(load_config(path)) == expected


def test_print_config_with_a_bad_key_exits_2_with_one_line():
    proc = train_py("--config", "configs/demo.yaml", "--print-config", "optim.lrr=1")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'optim.lrr'" in lines[0], proc.stderr


def test_help_points_to_print_config():
    proc = train_py("--help")
    assert proc.returncode == 0 and "--print-config" in proc.stdout.split("options:")[-1]
