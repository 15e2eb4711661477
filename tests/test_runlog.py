"""Progress a cluster log shows: plain lines when stdout is not a terminal."""
import io
import json
import subprocess
import sys
import time

import pytest
import torch

from distseg.engine.distributed import DistEnv
from distseg.engine.runlog import RunLog, process_age, progress_line

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def test_progress_line_names_the_stage_the_step_the_terms_and_the_eta():
    assert progress_line("ft", 25, 100, "loss=0.5000 1.0 img/s", 50.0, 25) == \
        "ft: step 25/100 loss=0.5000 1.0 img/s ETA 0:02:30"
    assert progress_line("ft", 10, 100, "loss=1", 7200.0, 5) == "ft: step 10/100 loss=1 ETA 36:00:00"
    assert progress_line("ft", 100, 100, "loss=0.1", 80.0, 100) == "ft: step 100/100 loss=0.1"


def test_a_log_file_gets_a_plain_line_at_each_losses_line_and_at_the_end(tmp_path):
    stream = io.StringIO()  # not a terminal, like a batch job's output file
    log = RunLog(tmp_path, CPU, total=10, start=0, every_s=0.0, stream=stream)
    for step in range(1, 11):
        log.advance(step, "loss=1.0000" if step % 5 == 0 else None)
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path.name}: step 5/10 loss=1.0000 ETA ")
    assert lines[1] == f"{tmp_path.name}: step 10/10 loss=1.0000"


def test_plain_lines_are_throttled_but_the_last_step_is_always_printed(tmp_path):
    stream = io.StringIO()
    log = RunLog(tmp_path, CPU, total=30, start=10, every_s=3600.0, stream=stream)
    for step in range(11, 31):
        log.advance(step, f"loss={step}")
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == [f"{tmp_path.name}: step 11/30",
                                                         f"{tmp_path.name}: step 30/30"]


def test_other_ranks_print_nothing(tmp_path):
    stream = io.StringIO()
    log = RunLog(tmp_path, DistEnv(1, 1, 2, torch.device("cpu")), total=4, start=0, every_s=0.0, stream=stream)
    log.advance(4, "loss=1")
    assert stream.getvalue() == ""


def test_distseg_run_prints_plain_stage_lines_into_a_log_file():
    """``distseg run`` off a terminal: one line per stage event, the running stage throttled, markup stripped."""
    from rich.console import Console

    from distseg.pipeline.runner import PlainProgress

    out = io.StringIO()
    progress = PlainProgress(Console(file=out, width=200), every_s=3600.0)
    with progress:
        a = progress.add_task("ft.s0 (finetune)", total=100, info="start")
        progress.update(a, completed=10, info="loss 0.900")   # the first poll is printed
        progress.update(a, completed=11, info="loss 0.890")   # throttled
        progress.update(a, completed=100, info="loss 0.500")  # the last step is printed once,
        progress.update(a, completed=100, info="loss 0.500")  # not at every poll while the stage finishes
        progress.update(a, completed=100, info="done in 50 s (49 CPU s)")
        b = progress.add_task("ssl.s0 (ssl)", total=50, info="start")
        progress.update(b, info="[red]failed (exit 1)")
    assert out.getvalue().splitlines() == ["ft.s0 (finetune): step 10/100 loss 0.900",
                                           "ft.s0 (finetune): step 100/100 loss 0.500",
                                           "ft.s0 (finetune): step 100/100 done in 50 s (49 CPU s)",
                                           "ssl.s0 (ssl): step 0/50 failed (exit 1)"]


def test_process_age_counts_from_the_process_start_not_from_the_import():
    code = ("import time; time.sleep(1.5); t = time.monotonic(); from distseg.engine.runlog import process_age; "
            "print(process_age(), time.monotonic() - t)")
    started = time.monotonic()
    age, import_s = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split())
    assert 1.5 + import_s - 0.02 <= age <= time.monotonic() - started + 0.02  # clock ticks: 10 ms


def test_the_first_step_records_and_prints_the_start_up(tmp_path):
    stream = io.StringIO()
    log = RunLog(tmp_path, CPU, total=10, start=4, every_s=0.0, stream=stream)
    log.starting(4)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 4 and 0 < record["startup_s"] <= process_age()
    assert stream.getvalue() == f"{tmp_path.name}: step 5 starts {record['startup_s']:.1f} s after the process started\n"


def test_a_resumed_log_keeps_the_steps_its_checkpoint_holds_and_drops_the_rest(tmp_path):
    """Killed after the step-5 checkpoint with steps 6-8 logged and step 9 half-written: the resumed run logs 6-8
    again, so those old lines (and the torn one) go; a line without a step and the step-5 lines stay."""
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 9)]
    lines.insert(5, json.dumps({"step": 5, "eval": {"score": 0.5}}))
    lines.insert(0, json.dumps({"note": "no step"}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    log = RunLog(tmp_path, CPU, total=10, start=5, every_s=0.0, stream=io.StringIO())
    log.write({"step": 6, "loss": 0.0})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in records] == [None, 1, 2, 3, 4, 5, 5, 6]
    assert records[-1]["loss"] == 0.0


def test_a_last_line_cut_before_its_newline_gets_one_before_the_next_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}')
    RunLog(tmp_path, CPU, total=10, start=2, every_s=0.0, stream=io.StringIO()).write({"step": 3})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_only_rank_0_rewrites_the_log(tmp_path):
    text = "\n".join(json.dumps({"step": s}) for s in range(1, 9)) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    RunLog(tmp_path, DistEnv(1, 1, 2, torch.device("cpu")), total=10, start=5, every_s=0.0, stream=io.StringIO())
    assert (tmp_path / "metrics.jsonl").read_text() == text


def test_process_age_without_proc_comes_from_psutil(monkeypatch):
    """Where /proc cannot be read, the start time comes from psutil (boot time in whole seconds: within ~1 s)."""
    from distseg.engine import runlog

    exact = process_age()

    def no_proc(path, *args, **kwargs):
        raise OSError(f"{path}: no such file")

    monkeypatch.setattr(runlog, "open", no_proc, raising=False)
    assert process_age() == pytest.approx(exact, abs=1.5)
