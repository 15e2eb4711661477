"""Locks and process hygiene: one process per run or stage folder, ``--force`` only replaces what distseg wrote, a
stage never outlives the ``distseg run`` that started it, and stage logs are appended per invocation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO, TINY_MODEL, stage_env
from distseg.cli import app
from distseg.engine.distributed import DistEnv
from distseg.folders import LOCK_NAME, FolderError, FolderLock
from distseg.pipeline.launch import Decision, run_process
from distseg.stages.folder import prepare_folder
from distseg.supervise import alive

ENV = DistEnv(0, 0, 1, torch.device("cpu"))
_HOLD = "import sys, time; from distseg.folders import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
        "print('locked', flush=True); time.sleep(120)"


def _wait(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_folder_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    folder = tmp_path / "run"
    lock = FolderLock(folder).acquire()
    with pytest.raises(FolderError, match=f"in use by process {os.getpid()} "):
        FolderLock(folder).acquire()
    lock.release()
    FolderLock(folder).acquire().release()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=stage_env(), cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderError, match=f"process {holder.pid} "):
        FolderLock(folder).acquire()
    holder.kill()  # kill -9: the kernel releases the lock with the process
    holder.wait()
    FolderLock(folder).acquire().release()


def test_a_stage_folder_in_use_is_refused(tmp_path):
    record = {"identity": {"config": 1}}
    folder, reopened, lock = prepare_folder(str(tmp_path / "stage"), record, ENV, resume=False, force=False)
    assert not reopened and (folder / "stage.json").is_file()
    with pytest.raises(FolderError, match=f"in use by process {os.getpid()}"):
        prepare_folder(str(folder), record, ENV, resume=True, force=False)
    lock.release()
    again = prepare_folder(str(folder), record, ENV, resume=True, force=False)
    assert again.reopened
    again.lock.release()


@pytest.mark.parametrize("marker", [None, "manifest.json"], ids=["notes", "shard-folder"])
def test_force_replaces_only_a_stage_folder(tmp_path, marker):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    if marker:
        (folder / marker).write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FolderError, match="not a stage folder .*--force only replaces folders distseg wrote"):
        prepare_folder(str(folder), {"identity": {}}, ENV, resume=False, force=True)
    assert sorted(p.name for p in folder.iterdir()) == before, "nothing deleted, not even a lock file written"
    stage = tmp_path / "stage"
    prepare_folder(str(stage), {"identity": {"a": 1}}, ENV, resume=False, force=False).lock.release()
    (stage / "old.txt").write_text("from the previous run")
    _, _, lock = prepare_folder(str(stage), {"identity": {"a": 2}}, ENV, resume=False, force=True)
    lock.release()
    assert sorted(p.name for p in stage.iterdir()) == [LOCK_NAME, "stage.json"]


def test_the_watchdog_kills_a_rank_whose_supervisor_is_gone(tmp_path):
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    rank = subprocess.Popen([sys.executable, "-c", "import time; from distseg.supervise import start_watchdog; "
                             "start_watchdog(0.05); print('watching', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**stage_env(), "DISTSEG_SUPERVISOR_PID": str(supervisor.pid)})
    assert rank.stdout.readline().strip() == "watching"
    time.sleep(0.3)
    assert rank.poll() is None, "a rank must run while its supervisor lives"
    supervisor.kill()
    supervisor.wait()
    assert rank.wait(timeout=30) == -signal.SIGKILL


def test_stage_logs_are_appended_per_invocation_and_copied_as_bytes(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    cut = "import sys; sys.stdout.buffer.write(b'rich bar \\xe2\\x94')"  # a UTF-8 character cut in half
    stage = SimpleNamespace(command=[sys.executable, "-c", cut], display="python -c ...", config=None, folder=folder)
    progress = SimpleNamespace(update=lambda *a, **k: None)
    log = tmp_path / "logs" / "stage.log"
    for _ in range(2):
        code, _, _ = run_process(stage, Decision("start", ""), log, progress, None)
        assert code == 0
    text = log.read_bytes()
    assert text.count(b"==== ") == 2 and text.count(b"rich bar \xe2\x94") == 2, text
    assert (folder / "run.log").read_bytes() == text


# -- distseg run: the run lock, refusing foreign folders, and stopping the stage with the run --------------------

def _recipe(root: Path, shards: Path, init: Path, steps: int) -> Path:
    data = {"name": "faults", "launcher": "python", "model": TINY_MODEL, "figure_tiles": 0,
            "datasets": {"target": str(shards)},
            "defaults": {"global_batch": 4, "micro_batch": 4,
                         "train": {"steps": steps, "log_every": 1, "fisher_batches": 0},
                         "data": {"stream": {"num_workers": 0, "augment": {"crop_size": 64}}},
                         "loss": {"kind": "ce"}},
            "stages": [{"name": "ft", "kind": "finetune", "data": "target", "weights": str(init)}]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_second_run_on_a_locked_run_folder_is_refused(tmp_path, target_shards, init_weights):
    recipe, out = _recipe(tmp_path, target_shards, init_weights, 2), tmp_path / "run"
    with FolderLock(out):
        result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"in use by process {os.getpid()}" in lines[0], result.stderr
    assert not (out / "ft").exists()


def test_a_run_refuses_a_stage_folder_it_did_not_write(tmp_path, target_shards, init_weights):
    recipe, out = _recipe(tmp_path, target_shards, init_weights, 2), tmp_path / "run"
    (out / "ft").mkdir(parents=True)
    (out / "ft" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2 and "not a stage folder" in result.stderr, result.output
    assert [p.name for p in (out / "ft").iterdir()] == ["notes.txt"]


def _stage_pid(folder: Path, run_pid: int) -> int | None:
    """The pid recorded in the stage folder's lock once the stage (not the run) holds it."""
    try:
        pid = json.loads((folder / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if pid != run_pid else None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_distseg_run_stops_its_stage(tmp_path, target_shards, init_weights, sig):
    recipe, out = _recipe(tmp_path, target_shards, init_weights, 100_000), tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "distseg.cli", "run", str(recipe), "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=stage_env(), cwd=REPO)
    stage = out / "ft"
    pid = None
    try:
        _wait(lambda: _stage_pid(stage, run.pid) and (stage / "metrics.jsonl").is_file(), 300, "the stage to train")
        pid = _stage_pid(stage, run.pid)
        if sig == signal.SIGTERM:  # meanwhile, a second run on the same folder is refused, naming the first
            second = subprocess.run([sys.executable, "-m", "distseg.cli", "run", str(recipe), "--out", str(out)],
                                    capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=300)
            assert second.returncode == 2 and f"in use by process {run.pid} " in second.stderr, second.stderr
        run.send_signal(sig)
        code = run.wait(timeout=60)
        _wait(lambda: not alive(pid), 30, f"stage process {pid} to end after {sig.name}")
    finally:  # never leave a 100,000-step stage behind, whatever failed above
        for leftover in (run.pid, pid):
            if leftover and alive(leftover):
                os.kill(leftover, signal.SIGKILL)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    if sig != signal.SIGKILL:
        errors = [ln for ln in run.stderr.read().splitlines() if ln.startswith("error:")]
        assert errors == [f"error: stopped by {sig.name}; the running stage was stopped too (run the same command "
                          f"to resume)"]
    assert not json.loads((stage / "stage.json").read_text())["finished"]
