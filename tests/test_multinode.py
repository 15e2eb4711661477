"""Several nodes per stage: the recipe's ``launch:`` block becomes deepspeed/torchrun arguments, the world size counts
every node, and two simulated nodes on localhost train identical replicas on disjoint data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, stage_env, tiny_stage_config
from distseg.cli import app
from distseg.pipeline import RecipeError, build_plan, load_recipe


def _recipe(tmp_path, shards, launcher: str, launch: dict, nproc: int = 1):
    data = {"name": "mn", "launcher": launcher, "nproc": nproc, "launch": launch, "model": {"backbone": "test_resnet"},
            "datasets": {"target": str(shards)},
            "stages": [{"name": "ft", "kind": "finetune", "data": "target", "weights": "init.safetensors"},
                       {"name": "ev", "kind": "eval", "data": "target", "parent": "ft"}]}
    (tmp_path / "init.safetensors").write_bytes(b"")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(path, launch=None):
    return build_plan(load_recipe(path, launch=launch), path)


def test_deepspeed_hostfile_and_master_address(tmp_path, target_shards):
    (tmp_path / "hosts").write_text("node1 slots=4\nnode2 slots=4\n")
    path = _recipe(tmp_path, target_shards, "deepspeed", {"num_nodes": 2, "hostfile": "hosts",
                                                          "master_addr": "node1", "master_port": 29510}, nproc=4)
    plan = _plan(path)
    ft, ev = plan.stages
    hosts = str(tmp_path / "hosts")
    assert ft.display.startswith(f"deepspeed --num_gpus 4 --num_nodes 2 --hostfile {hosts} --master_addr node1 "
                                 f"--master_port 29510 --module distseg.stages finetune")
    assert ev.display.startswith("deepspeed --num_gpus 4 --num_nodes 2") and "distseg.stages eval" in ev.display
    assert ft.identity["ds_config_resolved"]["train_micro_batch_size_per_gpu"] == 1, "8 images over 8 ranks"
    assert plan.recipe.launch.leader


def test_torchrun_static_and_rendezvous(tmp_path, target_shards):
    path = _recipe(tmp_path, target_shards, "torchrun", {"num_nodes": 2, "node_rank": 1, "master_addr": "10.0.0.1",
                                                         "master_port": 29511})
    plan = _plan(path)
    assert plan.stages[0].display.startswith("torchrun --nproc_per_node 1 --nnodes 2 --node_rank 1 --master_addr "
                                             "10.0.0.1 --master_port 29511 -m distseg.stages finetune")
    assert not plan.recipe.launch.leader
    rdzv = _plan(path, ["rdzv_endpoint=head:29400", "rdzv_id=job7", "master_addr=null", "master_port=null"])
    assert "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint head:29400 --rdzv_id job7 -m" in rdzv.stages[0].display


@pytest.mark.parametrize("launcher,launch,message", [
    ("deepspeed", {"num_nodes": 2}, "need launch.hostfile"),
    ("torchrun", {"num_nodes": 2, "master_addr": "a"}, "need launch.node_rank"),
    ("torchrun", {"num_nodes": 2, "node_rank": 0}, "master_addr or launch.rdzv_endpoint"),
    ("torchrun", {"num_nodes": 2, "node_rank": 2, "master_addr": "a"}, "node_rank must be in 0..1"),
    ("torchrun", {"hostfile": "h"}, "['hostfile'] do not apply"),
    ("deepspeed", {"rdzv_id": "x"}, "['rdzv_id'] do not apply"),
    ("python", {"num_nodes": 2}, "do not apply to launcher 'python'"),
])
def test_launch_options_that_cannot_work_are_refused(tmp_path, target_shards, launcher, launch, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        _plan(_recipe(tmp_path, target_shards, launcher, launch))


def test_cli_launch_overrides_show_in_the_dry_run(tmp_path, target_shards):
    path = _recipe(tmp_path, target_shards, "torchrun", {})
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run",
                                      "--launch", "num_nodes=2", "--launch", "node_rank=0",
                                      "--launch", "rdzv_endpoint=head:29400"])
    assert result.exit_code == 0, result.output
    assert result.output.count("--nnodes 2 --rdzv_backend c10d --rdzv_endpoint head:29400") == 2
    bad = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--launch", "nodes=2"])
    assert bad.exit_code == 2 and "nodes" in bad.stderr


_NODE = r"""
import json, os, sys
from distseg.engine.distributed import init_distributed
from distseg.stages.launcher import build_config
from distseg.stages.registry import get_kind
from distseg.stages.trainer import Trainer

config, shards, parent, out = sys.argv[1:5]
cfg = build_config("finetune", config, {"data.shards": shards, "parent": parent, "out": out}, [])
env = init_distributed(device="cpu")
trainer = Trainer(get_kind("finetune"), cfg, env)
keys, step = [], trainer.task.step

def recording(batches):
    keys.extend(batches.labelled.key)
    return step(batches)

trainer.task.step = recording
trainer.run()
with open(os.path.join(os.path.dirname(out), f"keys_rank{env.rank}.json"), "w") as fh:
    json.dump({"rank": env.rank, "node": int(os.environ["GROUP_RANK"]), "local_rank": env.local_rank,
               "world_size": env.world_size, "keys": keys}, fh)
"""


@pytest.mark.slow
def test_two_simulated_nodes_train_identical_replicas_on_disjoint_data(tmp_path, target_shards, init_weights):
    """Two ``torchrun --nnodes 2 --node_rank {0,1}`` processes on 127.0.0.1, one rank each: one epoch of the train
    split (18 tiles = 2 ranks × 3 batches of 4, 3 of them padding) is split by global rank."""
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    cfg = tiny_stage_config(tmp_path, steps=3, fisher_batches=0)
    port = str(29600 + os.getpid() % 300)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(script), str(cfg), str(target_shards), str(init_weights), str(tmp_path / "stage")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=stage_env(), cwd=REPO)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    record = json.loads((tmp_path / "stage" / "stage.json").read_text())
    assert record["finished"] and record["world_size"] == 2 and record["rank_divergence"] == {"student": 0.0}
    seen = [json.loads((tmp_path / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["node"], s["local_rank"], s["world_size"]) for s in seen] == [(0, 0, 0, 2), (1, 1, 0, 2)]
    manifest = json.loads((target_shards / "manifest.json").read_text())
    train = {k for s in manifest["shards"] if s["split"] == "train" for k in s["keys"]}
    first, second = set(seen[0]["keys"]), set(seen[1]["keys"])
    assert len(seen[0]["keys"]) == len(seen[1]["keys"]) == 12
    assert not first & second, "two nodes read the same tiles"
    assert first | second == train, "one epoch covers the split"
