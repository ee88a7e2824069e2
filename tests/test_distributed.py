"""The process group: its timeout comes from the config, object collectives and barriers run on a
gloo group beside NCCL, and an error path aborts instead of waiting on in-flight work."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from tresnet_train import distributed
from tresnet_train.config import load_config


@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2, with the group-creating calls recorded instead of made."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "_host_group", None)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "gloo-group")
    return calls


class _Stop(Exception):
    pass


def test_the_configured_timeout_reaches_init_process_group(two_ranks, monkeypatch, tmp_path):
    from tresnet_train import trainer

    def stop(world):
        raise _Stop

    monkeypatch.setattr(trainer, "setup_console", stop)  # the line after joining the group
    cfg = load_config(None, ["data.root=/d", "run.device=cpu", "run.dist_timeout_min=90",
                             f"run.output_dir={tmp_path}"])
    with pytest.raises(_Stop):
        trainer.Trainer(cfg)
    [(kind, kw)] = two_ranks  # on CPU the default group is gloo already: no second group
    assert kind == "init" and kw["backend"] == "gloo"
    assert kw["timeout"] == datetime.timedelta(minutes=90)


def test_the_default_timeout_is_an_hour(two_ranks):
    distributed.init_distributed("cpu")
    assert two_ranks[0][1]["timeout"] == datetime.timedelta(hours=1)


def test_with_nccl_objects_and_barriers_go_through_one_gloo_group(two_ranks, monkeypatch):
    monkeypatch.setattr(distributed, "pick_device", lambda *a, **k: torch.device("cuda", 0))
    distributed.init_distributed("cuda", 30)
    assert [kind for kind, _ in two_ranks] == ["init", "new_group"]
    assert two_ranks[0][1]["backend"] == "nccl"
    assert two_ranks[1][1] == {"backend": "gloo", "timeout": datetime.timedelta(minutes=30)}

    used = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "barrier", lambda group=None: used.append(("barrier", group)))
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda out, obj, group=None: used.append(("gather", group)))
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src=0, group=None: used.append(("broadcast", group)))
    distributed.barrier()
    distributed.gather_objects(1)
    distributed.broadcast_object(1)
    assert used == [("barrier", "gloo-group"), ("gather", "gloo-group"), ("broadcast", "gloo-group")]


def test_cleanup_aborts_after_an_error_and_destroys_after_success(tmp_path, monkeypatch):
    calls = []
    real_abort, real_destroy = dist.distributed_c10d._abort_process_group, dist.destroy_process_group
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group",
                        lambda: (calls.append("abort"), real_abort()))
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda: (calls.append("destroy"), real_destroy()))
    for failed in (True, False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store_{failed}", rank=0,
                                world_size=1)
        distributed.cleanup(failed=failed)
        assert not dist.is_initialized()
    assert calls == ["abort", "destroy"]
