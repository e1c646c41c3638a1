"""Nothing is lost to a second process or to the user's own hand: one writer per folder (a second trainer, a resume
while the run still trains, a second ablation), Ctrl-C as one line with exit 130 and a resume after it, a kill in the
middle of a save followed by a resume (no temporary left, no step logged twice), and the checkpoint digest. The tiny
pipeline preset of test_errors.py keeps each trainer to seconds; a second process is a real `python script.py`.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import configurator
import folders
import train_utils as tu
from conftest import ROOT
from test_errors import PRESET, md5s, run


@pytest.fixture
def preset(tmp_path):
    p = tmp_path / "tiny.py"
    p.write_text(PRESET)
    return str(p)


def error_line(rc, err, code=2):
    """The one `error:` line of a refused command (exit `code`, no traceback, the line last)."""
    assert rc == code and "Traceback" not in err, (rc, err[-3000:])
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    return lines[0]


def train_steps(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["event"] == "train"]


def temporaries(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if re.search(r"\.tmp\d*$", f)]


def test_a_held_folder_refuses_every_second_writer(preset, tmp_path):
    """While one process holds a folder, a trainer (new, resumed or --overwrite), sample.py and ablation.py aimed at
    it are refused with one line naming the folder and the holder's pid, and change nothing; the lock file goes
    with the holder."""
    out = str(tmp_path / "siglip")
    assert run("train_siglip", [preset, f"--out_dir={out}"])[0] == 0
    before = md5s(out)
    abl = str(tmp_path / "abl")
    with folders.hold_folder(out), folders.hold_folder(abl):
        held = md5s(out)
        for script, argv in (("train_siglip", [preset, f"--out_dir={out}", "--resume=True", "--max_steps=3"]),
                             ("train_siglip", [preset, f"--out_dir={out}", "--overwrite=True"]),
                             ("sample", ["generate", "--mllm=nowhere", "--captions=a red circle", f"--out_dir={out}"]),
                             ("ablation", ["mllm", preset, f"--ablation_dir={abl}"])):
            line = error_line(*run(script, argv, sub=True)[::2])
            folder = abl if script == "ablation" else out
            held_by = rf"{re.escape(folder)} is being written by another process \(pid {os.getpid()}: "
            assert re.search(held_by, line), line
        # rebuilding the results elsewhere (--collect) only reads ablation_dir: not refused for its lock (this empty
        # folder has no finished run: a table of none)
        rc, _, err = run("ablation", ["mllm", preset, f"--ablation_dir={abl}", "--collect=True",
                                      f"--results={tmp_path / 'r.json'}"], sub=True)
        assert rc == 0 and "being written" not in err, err[-3000:]
        assert json.load(open(tmp_path / "r.json"))["runs"] == []
        assert md5s(out) == held and os.listdir(abl) == [folders.LOCK_FILE]
    assert md5s(out) == before and not os.path.exists(abl)  # the lock file removed, the folder it made too


def test_a_process_holds_a_folder_once(tmp_path):
    """Within one process the lock is re-entrant (ablation.py trains its runs in process); a folder that is a file
    or cannot be written is one line before any work."""
    d = str(tmp_path / "d")
    with folders.hold_folder(d):
        with folders.hold_folder(d):
            assert os.path.isfile(os.path.join(d, folders.LOCK_FILE))
        assert os.path.isfile(os.path.join(d, folders.LOCK_FILE))
    assert not os.path.exists(d)
    (tmp_path / "f").write_text("x")
    with pytest.raises(configurator.UserError, match="is a file: need a folder"):
        with folders.hold_folder(str(tmp_path / "f")):
            pass
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(configurator.UserError, match="cannot write into"):
            with folders.hold_folder(str(ro / "out")):
                pass


def test_resume_while_running_then_ctrl_c_then_resume(preset, tmp_path):
    """A trainer runs: a --resume=True of the same folder is refused naming its pid; Ctrl-C stops it with one line
    (the step reached, the last checkpoint) and exit 130; a resume then continues from that checkpoint and the log
    holds every step once."""
    out = str(tmp_path / "run")
    state = os.path.join(out, "train_state.pt")
    args = [preset, f"--out_dir={out}", "--ckpt_interval=4", "--eval_interval=0"]
    p = subprocess.Popen([sys.executable, "train_siglip.py", *args, "--max_steps=100000"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        t0 = time.time()
        while not os.path.isfile(state) and p.poll() is None and time.time() - t0 < 240:
            time.sleep(0.2)
        assert p.poll() is None and os.path.isfile(state), p.communicate()[1][-3000:]
        line = error_line(*run("train_siglip", [*args, "--max_steps=100000", "--resume=True"], sub=True)[::2])
        assert f"{out} is being written by another process (pid {p.pid}: train_siglip.py" in line
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    line = error_line(p.returncode, err, code=130)
    m = re.fullmatch(r"error: interrupted \(Ctrl-C\) at step (\d+); the last checkpoint is step (\d+) "
                     rf"\({re.escape(state)}\): continue with --resume=True", line)
    assert m, line
    reached, ckpt = int(m.group(1)), int(m.group(2))
    assert ckpt % 4 == 0 and 4 <= ckpt <= reached
    assert torch.load(state, weights_only=True)["step"] == ckpt
    assert not temporaries(out) and not os.path.exists(os.path.join(out, folders.LOCK_FILE))
    assert train_steps(out) == list(range(1, reached + 1))
    rc, text, err = run("train_siglip", [*args, f"--max_steps={reached + 2}", "--resume=True"])
    assert rc == 0, err[-3000:]
    assert f"from step {ckpt}" in text
    assert train_steps(out) == list(range(1, reached + 3))  # steps ckpt+1..reached logged again, kept once


# the trainer, killed (SIGKILL: nothing runs after it) while it writes its second checkpoint
KILLED_IN_SECOND_SAVE = """
import os, signal, sys, torch
import configurator, train_siglip
real, saves = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = dying_save
configurator.run_main(train_siglip.main, sys.argv[1:])
"""


def test_kill_during_a_save_then_resume(preset, tmp_path):
    out = str(tmp_path / "run")
    args = [preset, f"--out_dir={out}", "--max_steps=6", "--ckpt_interval=2", "--eval_interval=0"]
    p = subprocess.run([sys.executable, "-c", KILLED_IN_SECOND_SAVE, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    left = [os.path.basename(f) for f in temporaries(out)]
    assert len(left) == 1 and re.fullmatch(r"\.train_state\.pt\.tmp\d+", left[0]), left  # what the kill leaves
    assert torch.load(os.path.join(out, "train_state.pt"), weights_only=True)["step"] == 2
    assert train_steps(out) == [1, 2, 3, 4]  # step 4 was logged before its checkpoint died
    rc, text, err = run("train_siglip", [*args, "--resume=True"])
    assert rc == 0 and "from step 2" in text, err[-3000:]
    assert not temporaries(out)
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_digest_names_damage_and_old_checkpoints_still_load(tmp_path):
    """save_train_state records a sha256 of the contents; one changed element is refused with one line naming the
    file; a train_state.pt written before digests existed still loads."""
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 0.1
    path = str(tmp_path / "train_state.pt")
    state = {"model": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "step": 5,
             "config": {"lr": 0.1}, "rng": [1, (2, 3), None]}
    tu.save_train_state(state, path)
    st = tu.load_train_state(path, Cfg())
    assert "sha256" not in st and torch.equal(st["model"]["w"], state["model"]["w"])
    saved = torch.load(path, weights_only=True)
    saved["model"]["w"][1, 2] = 1e26
    tu.atomic_save(saved, path)
    with pytest.raises(configurator.UserError, match=rf"{re.escape(path)} is damaged: .*\(step 5\); no earlier"):
        tu.load_train_state(path, Cfg())
    tu.atomic_save(state, path)  # no digest: written before checkpoints carried one
    assert tu.load_train_state(path, Cfg())["step"] == 5


def test_resumed_log_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    path = str(tmp_path / "log.jsonl")
    rows = [dict(event="start", step=0), *[dict(event="train", step=s) for s in range(1, 6)],
            dict(event="eval", step=4)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "train", "st')  # a line a crash cut short
    tu.JsonlLogger(path, resume_step=4).log(event="start", step=4)
    assert [(r["event"], r["step"]) for r in map(json.loads, open(path))] == \
        [("start", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4), ("start", 4)]


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    """hold_folder removes the temporaries of a process that is gone and keeps a live one's (an evaluation writing
    its result beside a model while a trainer starts)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    d = tmp_path / "run"
    (d / "samples").mkdir(parents=True)
    (d / "train_state.pt.shards.00000004.tmp").mkdir()
    gone = [d / f".train_state.pt.tmp{dead}", d / "samples" / f".step_000004.png.tmp{dead}"]
    live = d / f".eval_mllm.json.tmp{os.getpid()}"
    for f in (*gone, live):
        f.write_bytes(b"partial")
    with folders.hold_folder(str(d)):
        pass
    assert not any(f.exists() for f in gone) and live.exists()
    assert not (d / "train_state.pt.shards.00000004.tmp").exists()
