"""Real DeepSpeed stage runs on tiny synthetic shards: head -> distill -> ssl, on 2 CPU ranks, plus resume."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, kill_after_checkpoint, launch, stage_record, tiny_stage_config

pytestmark = pytest.mark.slow



def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, target_shards, init_weights):
    """head -> distill -> ssl, and a mim stage, each a real 2-process `deepspeed --num_gpus 2` run with ZeRO-1 on gloo."""
    tmp = tmp_path_factory.mktemp("chain")
    cfg = tiny_stage_config(tmp, steps=4, eval_every=2, ckpt_every=2)
    common = ["--config", str(cfg), "--data", str(target_shards), "--ds_config", "ds_configs/zero1_fp32.json"]
    launch("finetune_head.py", *common, "--out", str(tmp / "head"), "--parent", str(init_weights), nproc=2)
    launch("distill.py", *common, "--out", str(tmp / "distill"), "--teacher", str(tmp / "head"), nproc=2)
    # a pool of two folders (the same one twice: sources named by position) with the per-source guard rail
    launch("ssl.py", *common, "--out", str(tmp / "ssl"), "--init", str(tmp / "distill"),
           "--unlabeled", str(target_shards), "--unlabeled", str(target_shards),
           "--set", "ssl.tau=0.5", "--set", "ssl.balance_bound=4.0", nproc=2)
    launch("pretrain_mim.py", *common, "--out", str(tmp / "mim"), "--parent", str(init_weights),
           "--set", "mim.patch_size=16", nproc=2)
    return tmp


def test_stages_finish_with_identical_replicas(chain):
    assert stage_record(chain / "mim")["finished"] and stage_record(chain / "mim")["rank_divergence"] == {"student": 0.0}
    for name in ("head", "distill", "ssl"):
        record = stage_record(chain / name)
        assert record["finished"] and record["world_size"] == 2 and record["steps"] == 4
        assert (chain / name / "model.safetensors").is_file() and (chain / name / "fisher.safetensors").is_file()
        # parameters and BN buffers of every replica agree across ranks (teacher too, for ssl)
        assert record["rank_divergence"] and all(v == 0.0 for v in record["rank_divergence"].values()), record
    assert set(stage_record(chain / "ssl")["rank_divergence"]) == {"student", "teacher"}


def test_head_stage_trains_only_the_classifier(chain, init_weights):
    start, head = load_file(str(init_weights)), load_file(str(chain / "head" / "model.safetensors"))
    changed = {k for k in head if k in start and head[k].shape == start[k].shape and not torch.equal(head[k], start[k])}
    assert changed and all(k.startswith("classifier") for k in changed), changed


def test_distill_logs_every_loss_term(chain):
    logged = [m for m in _metrics(chain / "distill") if "loss" in m]
    assert logged and {"sup", "kd", "ewc", "lr", "images_per_s"} <= set(logged[-1])
    assert all(m["kd"] >= 0 and m["ewc"] >= 0 for m in logged)


def test_ssl_logs_pseudo_label_statistics(chain):
    logged = [m for m in _metrics(chain / "ssl") if "loss" in m]
    last = logged[-1]
    assert 0.0 <= last["kept_fraction"] <= 1.0 and 0.0 <= last["entropy"] <= 1.0
    assert len(last["class_hist"]) == 6
    ratios = [last[f"class_share_ratio/{i}"] for i in range(2)]  # one per pool folder, all-reduced over the 2 ranks
    assert all(len(r) == 6 and min(r) > 0 for r in ratios) and 0 < last["balance_damping"] <= 1
    evals = [m["eval"] for m in _metrics(chain / "ssl") if "eval" in m]
    assert evals and all({"teacher", "student"} <= set(e) for e in evals)
    assert (chain / "ssl" / "student.safetensors").is_file()


def test_every_stage_writes_tensorboard_scalars_from_rank_0(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("head", "distill", "ssl"):
        folder = chain / name / "tensorboard"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, "one writer: rank 0"
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        wanted = {"train/loss", "train/sup", "train/lr", "train/images_per_s", "train/skipped_steps", "eval/score",
                  "Train/Samples/lr"}  # the last one is DeepSpeed's own, per optimizer step
        model = "teacher" if name == "ssl" else "student"
        wanted |= {f"eval/{model}/miou", f"eval/{model}/pixel_acc"} | ({"train/kept_fraction"} if name == "ssl" else set())
        assert wanted <= tags, sorted(wanted - tags)
        assert any(t.startswith(f"eval/{model}/per_class_iou/") for t in tags), "per-class IoU by class name"
        logged = [m for m in _metrics(chain / name) if "loss" in m]
        scalars = {e.step: e.value for e in events.Scalars("train/loss")}
        assert scalars == pytest.approx({m["step"]: m["loss"] for m in logged})


def test_exported_weights_reproduce_eval_miou(chain, target_shards, tmp_path):
    launch("evaluate.py", str(chain / "distill"), "--data", str(target_shards), "--split", "val", "--no-sliding",
           "--out", str(tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    record = stage_record(chain / "distill")
    last = next(m["eval"]["student"] for m in _metrics(chain / "distill") if m.get("step") == 4 and "eval" in m)
    assert (result["checkpoint"], result["step"]) == ("last", 4), "the headline: the end of the schedule"
    assert result["whole_tile"]["miou"] == pytest.approx(last["miou"], abs=1e-9)
    assert result["whole_tile"]["confusion"] == last["confusion"]
    best = result["best_val"]  # beside it: the model validation chose (step 2 or 4)
    assert best["step"] == record["best_step"]
    assert best["whole_tile"]["miou"] == pytest.approx(record["metrics"]["student"]["miou"], abs=1e-9)
    assert best["whole_tile"]["confusion"] == record["metrics"]["student"]["confusion"]


def _max_diff(a, b):
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.mark.parametrize("script,extra,exports", [
    ("finetune_head.py", ["--set", "head.train_head=true"], ["model.safetensors"]),
    ("ssl.py", ["--set", "ssl.tau=0.5", "--set", "ssl.ema.warmup_steps=1000"], ["model.safetensors", "student.safetensors"]),
    ("pretrain_mim.py", ["--set", "mim.patch_size=16"], ["model.safetensors"]),
], ids=["head", "ssl", "mim"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, target_shards, init_weights, script, extra, exports):
    cfg = tiny_stage_config(tmp_path, steps=10, ckpt_every=2, fisher_batches=0)
    args = ["--config", str(cfg), "--data", str(target_shards), "--parent", str(init_weights), *extra]
    launch(script, *args, "--out", str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_after_checkpoint([sys.executable, str(REPO / "launch" / script), *args, "--out", str(killed)], killed)
    launch(script, *args, "--out", str(killed), "--resume")
    assert stage_record(killed)["finished"] and stage_record(killed)["steps"] == 10
    whole = [(p["from_step"], p["to_step"]) for p in stage_record(tmp_path / "straight")["cost"]["pieces"]]
    pieces = [(p["from_step"], p["to_step"]) for p in stage_record(killed)["cost"]["pieces"]]
    assert whole == [(0, 10)] and len(pieces) == 2, "the killed run's cost counts both of its pieces"
    assert pieces[0][0] == 0 and pieces[0][1] == pieces[1][0] >= 4 and pieces[1][1] == 10
    assert stage_record(killed)["cost"]["complete"]
    for name in exports:  # for ssl: the EMA teacher and the student
        assert _max_diff(tmp_path / "straight" / "last" / name, killed / "last" / name) < 1e-6, name
    lrs = [m["lr"] for m in _metrics(killed) if "lr" in m]
    assert lrs[-1] == pytest.approx([m["lr"] for m in _metrics(tmp_path / "straight") if "lr" in m][-1])
