"""scripts/bench_memory.py: the saved-tensor count is exact on a model whose saved tensors are known,
the report carries the per-image numbers, predictions, target ratio and the comparison with a
measured max batch; and our TResNet keeps what its layers promise (blur nothing, bf16 under autocast)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tresnet_train.models import create_model
from tresnet_train.models.layers import inplace_abn_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def load_script():
    import bench_memory  # scripts/ is not a package
    return bench_memory


def test_counter_counts_each_storage_once():
    """conv -> BN -> in-place ReLU -> view -> conv: BN keeps the conv output, ReLU its own output in
    place, the second conv the same storage through a view; parameters and the input are not counted."""
    bm = load_script()
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Unflatten(1, (8, 1)), nn.Flatten(1, 2), nn.Conv2d(8, 8, 1, bias=False))
    for batch in (2, 5):
        x = torch.rand(batch, 3, 6, 6)
        with bm.SavedTensorCounter(model, exclude=(x,)) as counter:
            model(x).sum()
        activation = batch * 8 * 6 * 6 * 4  # fp32 bytes of one (N, 8, 6, 6) tensor
        assert counter.total() == 2 * activation + 2 * 8 * 4  # + BN's saved mean and inverse std
        layers = counter.by_layer()
        assert layers["1"] == activation + 2 * 8 * 4 and layers["2"] == activation
        assert "0" not in layers and "5" not in layers  # the input and the ReLU output: counted before


def kept_by(model, precision):
    bm = load_script()
    args = bm.parse_args(["--device", "cpu"])
    counts = [bm.saved_for_backward(model, b, 32, precision, args, torch.device("cpu")) for b in (2, 4)]
    return {n: (counts[1].by_layer().get(n, 0) - counts[0].by_layer().get(n, 0)) / 2
            for n in counts[1].by_layer()}


def test_blur_and_bottleneck_conv3_keep_nothing():
    layers = kept_by(create_model("tresnet_tiny", norm="bn").train(), "fp32")
    assert not [n for n, v in layers.items() if n.endswith(".aa") and v > 0]
    # A Bottleneck's conv3 and its norm keep nothing of their own: they run again in backward from
    # their input, which the block keeps (stride 2: the blur's output, kept by nothing else).
    for stage in ("layer3", "layer4"):
        assert not [n for n, v in layers.items() if n.startswith(f"body.{stage}.0.conv3") and v > 0]
        assert layers[f"body.{stage}.0"] > 0
    model = create_model("tresnet_tiny", norm="bn").train()
    for m in model.modules():
        if hasattr(m, "recompute_conv3"):
            m.recompute_conv3 = False
    assert kept_by(model, "fp32")["body.layer3.0.conv3.bn"] > 0  # kept when not recomputed


@pytest.mark.skipif(not inplace_abn_available(), reason="inplace_abn is not installed")
def test_inplace_abn_keeps_bf16_under_autocast():
    model = create_model("tresnet_tiny", norm="iabn").train()
    fp32, bf16 = sum(kept_by(model, "fp32").values()), sum(kept_by(model, "bf16").values())
    assert bf16 <= 0.55 * fp32  # every activation kept in bf16 (an fp32 one would cost 4 bytes, not 2)


@pytest.mark.slow
def test_report_targets_predictions_and_max_batch_comparison(tmp_path):
    bm = load_script()
    gpu_run = tmp_path / "gpu.json"
    gpu_run.write_text(json.dumps({
        "device": {"device": "Some GPU", "gpu_memory_gib": 16.0}, "settings": {"amp": "bf16"},
        "results": [{"model": "tresnet_tiny", "size": 32, "variant": "iabn",
                     "max_batch": {"max_batch": 1000}},
                    {"model": "tresnet_tiny", "size": 32, "variant": "compile",
                     "max_batch": {"max_batch": 5}}]}))
    norms = "iabn,bn" if inplace_abn_available() else "bn"
    assert bm.main(["--models", "tresnet_tiny,timm/resnet18", "--norms", norms, "--ours", "tresnet_tiny",
                    "--resnet-ref", "timm/resnet18", "--sizes", "32", "--ratio-size", "32", "--max-batch-from", str(gpu_run),
                    "--out-dir", str(tmp_path / "out")]) == 0
    (json_path,) = (tmp_path / "out").glob("*-cpu-memory.json")
    report = json.loads(json_path.read_text())
    rows = {(r["model"], r["norm"], r["checkpointing"]): r for r in report["results"]}
    assert ("timm/resnet18", "bn", True) in rows  # timm's ResNet has gradient checkpointing
    for precision in ("fp32", "bf16"):  # so has ours: it keeps only each block's input
        ours_ckpt, ours = (rows[("tresnet_tiny", "bn", c)]["precisions"][precision]["per_image_bytes"]
                           for c in (True, False))
        assert 0 < ours_ckpt < 0.5 * ours
    plain, ckpt = rows[("timm/resnet18", "bn", False)], rows[("timm/resnet18", "bn", True)]
    for precision in ("fp32", "bf16"):
        m = plain["precisions"][precision]
        assert m["per_image_bytes"] > 0 and m["fixed_bytes"] >= 0
        assert ckpt["precisions"][precision]["per_image_bytes"] < m["per_image_bytes"]
        static = plain["params_bytes"] + plain["grads_bytes"] + plain["optimizer_bytes"] + m["fixed_bytes"]
        assert m["predicted_max_batch"]["16GiB"] == int((16 * 2**30 - static) // m["per_image_bytes"])
    n_params = sum(p.numel() for p in create_model("timm/resnet18").parameters())
    assert plain["params_bytes"] == plain["grads_bytes"] == plain["optimizer_bytes"] == 4 * n_params
    targets = {t["target"].split(", ")[2]: t for t in report["targets"]}
    if inplace_abn_available():
        ours = rows[("tresnet_tiny", "iabn", False)]["precisions"]["fp32"]["per_image_bytes"]
        assert targets["fp32"]["ratio"] == pytest.approx(ours / plain["precisions"]["fp32"]["per_image_bytes"])
        assert targets["fp32"]["status"] in ("met", "missed")
        (cmp,) = report["max_batch_comparison"]  # the compile variant is not compared
        assert cmp["measured_max_batch"] == 1000 and cmp["precision"] == "bf16"
        assert cmp["measured_over_predicted"] == pytest.approx(1000 / cmp["predicted_max_batch"])
    md = json_path.with_suffix(".md").read_text()
    assert "scripts/bench_memory.py --models tresnet_tiny" in md and "| timm/resnet18 + checkpointing |" in md


@pytest.mark.slow
def test_peak_step_runs_each_setting_in_a_fresh_process(tmp_path):
    """One training step per setting, each with its own peak RSS: checkpointing keeps less for backward."""
    bm = load_script()
    assert bm.main(["--peak-step", "2", "--models", "tresnet_tiny", "--norms", "bn", "--sizes", "64",
                    "--precisions", "fp32", "--out-dir", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*-cpu-memory-peak-step.json")
    report = json.loads(json_path.read_text())
    plain, ckpt = sorted(report["results"], key=lambda r: r["checkpointing"])
    assert (plain["checkpointing"], ckpt["checkpointing"]) == (False, True)
    assert 0 < ckpt["saved_bytes"] < plain["saved_bytes"]
    assert all(r["peak_rss_bytes"] >= r["rss_before_step_bytes"] > 0 for r in (plain, ckpt))
    assert "| tresnet_tiny (BatchNorm) + checkpointing | 64 | fp32 | 2 |" in json_path.with_suffix(".md").read_text()


@pytest.mark.slow
def test_speed_times_each_variant_in_a_fresh_process_with_its_own_package(tmp_path):
    """--speed: ours, ours with recompute_conv3 off, and the model of another checkout (here a folder
    whose tresnet_train links to this one), each timed by a process importing the right package."""
    bm = load_script()
    other = tmp_path / "other"
    other.mkdir()
    (other / "tresnet_train").symlink_to(bm.ROOT / "tresnet_train")
    assert bm.main(["--speed", "1", "--speed-warmup", "1", "--speed-batch", "2", "--repeats", "1",
                    "--models", "tresnet_tiny", "--norms", "bn", "--sizes", "32", "--precisions", "fp32",
                    "--against", str(other), "--out-dir", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*-cpu-memory-speed.json")
    report = json.loads(json_path.read_text())
    packages = {r["variant"]: r["package"] for r in report["results"]}
    assert packages == {"ours": str(bm.ROOT / "tresnet_train"), "conv3_kept": str(bm.ROOT / "tresnet_train"),
                        "against": str(other / "tresnet_train")}
    (entry,) = report["ratios"]
    assert all(v > 0 for v in entry["median_img_per_s"].values()) and len(entry["median_img_per_s"]) == 3
    assert entry["ours_over_against"]["per_round"] == [entry["median_img_per_s"]["ours"]
                                                       / entry["median_img_per_s"]["against"]]
    assert "| tresnet_tiny (BatchNorm) | 32 | fp32 | 1 |" in json_path.with_suffix(".md").read_text()


def test_against_must_be_a_checkout(tmp_path):
    bm = load_script()
    with pytest.raises(SystemExit):
        bm.parse_args(["--speed", "1", "--against", str(tmp_path)])


def test_batches_below_two_are_refused():
    bm = load_script()
    with pytest.raises(SystemExit):
        bm.parse_args(["--batches", "1,2"])
