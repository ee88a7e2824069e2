"""scripts/bench_checkpoint.py in miniature (a tiny model, not timed): the three ways leave the same
three readable checkpoints, and the bytes it reports are the files actually written."""
import json
import sys
from pathlib import Path

import torch

from tresnet_train import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def test_bench_checkpoint_in_miniature(tmp_path):
    import bench_checkpoint as bench  # scripts/ is not a package
    state = bench.epoch_state("tresnet_tiny")
    assert len(state["optimizer"]["state"]) == len(state["model"]) - sum(  # momentum per parameter
        1 for k in state["model"] if k.endswith(("running_mean", "running_var", "batches_tracked")))
    for way in bench.WAYS:
        folder = tmp_path / way.replace(" ", "_")
        folder.mkdir()
        bench.write_epoch(state, folder, way)
        one = (folder / checkpoint.LAST).stat().st_size
        links = {(folder / n).stat().st_ino for n in bench.NAMES}
        assert len(links) == (1 if way == "one write + links" else 3)
        assert bench.disk_bytes(folder)[1] == one * len(links)
        for name in bench.NAMES:
            loaded = checkpoint.load(folder / name)
            assert torch.equal(loaded["ema"]["head.fc.weight"], state["ema"]["head.fc.weight"])

    assert bench.main(["--model", "tresnet_tiny", "--repeats", "1", "--out-dir",
                       str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "checkpoint-write.json").read_text())
    ways = report["ways"]
    assert [ways[w]["distinct_files"] for w in bench.WAYS] == [3, 1, 3]
    assert ways["three writes"]["median_file_bytes"] == 3 * ways["one write + links"][
        "median_file_bytes"] == ways["one write + copies"]["median_file_bytes"]
    assert report["state_bytes"] == checkpoint.tensor_bytes(state)
    assert not list((tmp_path / "out").glob("bench-ckpt-*"))  # temp folders removed
    md = (tmp_path / "out" / "checkpoint-write.md").read_text()
    assert "tresnet_tiny" in md and "one write + copies" in md and "--repeats 1" in md
