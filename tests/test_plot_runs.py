"""scripts/plot_runs.py: one PNG from real runs (the shared short CPU training run), and its refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest

from trainer_helpers import ROOT

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plot]')")
Image = pytest.importorskip("PIL.Image")
SCRIPT = ROOT / "scripts" / "plot_runs.py"


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_plots_real_runs_overlaid(tmp_path, reference):
    run = reference.out  # the shared reference run, read only
    # A second run of the same name (the legend then shows paths) that was resumed (its last steps
    # logged twice), is still writing (a half line at the end) and has half the loss.
    other = tmp_path / "other" / run.name
    other.mkdir(parents=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v / 2 if k == "train/loss" else v for k, v in r.items()} for r in records]
    (other / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records + records[-2:]) + '{"kind": "tr')
    out = tmp_path / "plots" / "cmp.png"
    proc = plot(str(run), str(other), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (2 runs)"
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (1500, 800)
    pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not blank: axes, curves and labels
    # each of the six panels has ink of the curves' colours, not just the white background
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
    for row in (slice(0, 380), slice(400, 740)):
        for col in (slice(0, 500), slice(500, 1000), slice(1000, 1500)):
            assert coloured[row, col].sum() > 50, (row, col)
    # both runs' curves in the loss panel: matplotlib's first two colours, blue and orange
    loss_panel = rgb[30:330, 50:490]
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(loss_panel - colour).sum(axis=2) < 40).sum() > 30, colour


def test_missing_or_empty_run_is_one_line_and_exit_2(tmp_path):
    proc = plot(str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no metrics.jsonl (not a run folder, or the run has not logged yet)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    proc = plot(str(empty), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds no train or val records" in proc.stderr
    assert not (tmp_path / "x.png").exists()
