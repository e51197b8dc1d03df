"""The training job and the ``pymaml`` command line: outputs, exact resumption, learning."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pymaml import cli
from pymaml.training import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "omniglot"))


def _cfg(tmp_path, name, **kw):
    base = dict(task="sinusoid", out=str(tmp_path / name), iterations=6, meta_batch=5, eval_every=3, eval_tasks=5,
                test_tasks=5, checkpoint_every=3, progress=False, plots=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, algorithm):
    train(_cfg(tmp_path, "full", algorithm=algorithm))
    train(_cfg(tmp_path, "parts", algorithm=algorithm, iterations=3))
    train(_cfg(tmp_path, "parts", algorithm=algorithm, iterations=6, resume=True))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["meta"]["algorithm"].items():
        assert torch.equal(v, b["meta"]["algorithm"][k]), k
    assert a["history"]["query_loss"] == b["history"]["query_loss"]


def test_cli_sinusoid_writes_summary_plots_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "sinusoid", "--iterations", "400", "--eval-every", "200", "--eval-tasks", "50",
                   "--test-tasks", "50", "--inner-lr", "0.01", "--outer-lr", "0.01", "--out", str(out),
                   "--no-progress", "--threads", "1", "--engine", "unrolled"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kernels/backend:" in text and "| 1 |" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations"] == 400 and s["engine"] == "unrolled" and s["backend"] and s["memory_format"] == "preserve"
    assert (out / "curves.png").stat().st_size > 1000 and (out / "fits.png").stat().st_size > 1000
    losses = s["config"] and json.loads((out / "summary.json").read_text())["last_eval"]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    q = ck["history"]["query_loss"]
    start, end = sum(q[:20]) / 20, sum(q[-50:]) / 50
    assert end < 0.6 * start, (start, end)  # learning: well below where it started
    assert losses["mean"] < 2.5
    rc = cli.main(["evaluate", str(out / "checkpoint.pt"), "--tasks", "50", "--steps", "1"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "iteration 400" in line and "mse after 1 step(s) on 50 tasks" in line
    assert f"{s['test']['1_steps']['mean']:.4f}" in line  # same task stream as the run's final test


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "sinusoid", "--algorithm", "nope"])
    rc = cli.main(["train", "sinusoid", "--resume", "--out", str(tmp_path / "none"), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "pymaml", "train", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--algorithm" in r.stdout and "omniglot" in r.stdout


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "images_evaluation.zip")),
                    reason=f"Omniglot archives not found in {DATA}")
def test_omniglot_job_runs_and_reports(tmp_path):
    s = train(_cfg(tmp_path, "omni", task="omniglot", data=DATA, iterations=4, meta_batch=4, eval_every=2,
                   eval_tasks=4, test_tasks=8, algorithm="fomaml"))
    assert s["metric"] == "accuracy" and set(s["test"]) == {"1_steps", "3_steps"}
    assert s["memory_format"] == "channels_last"  # the conv net runs channels-last on the CPU
    assert 0.0 <= s["test"]["3_steps"]["mean"] <= 1.0


def test_checkpoints_are_atomic_and_only_the_last_ones_are_kept(tmp_path, monkeypatch):
    from pymaml import checkpoint as ckpt
    for it in (10, 20, 30, 40):
        ckpt.save(str(tmp_path), {"iteration": it, "w": torch.full((3,), float(it))}, it, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000030.pt", "checkpoint-00000040.pt", "checkpoint.pt"]
    assert ckpt.load(str(tmp_path / "checkpoint.pt"))["iteration"] == 40

    def torn(obj, f):  # a write that dies half-way
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(str(tmp_path), {"iteration": 50}, 50, keep=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000030.pt", "checkpoint-00000040.pt", "checkpoint.pt"]
    assert torch.equal(ckpt.load(str(tmp_path / "checkpoint.pt"))["w"], torch.full((3,), 40.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(str(tmp_path / "nothing.pt"))


def test_cli_choices_and_the_old_omniglotnet_path():
    from pymaml.functional import ENGINES, HVP_METHODS
    from pymaml.functional.layout import MEMORY_FORMATS
    from pymaml.models import OmniglotNet
    from pymaml.training import OmniglotNet as Old
    assert Old is OmniglotNet
    actions = {a.dest: a for a in cli._parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert actions["engine"].choices == ["auto", *ENGINES]
    assert actions["hvp"].choices == ["auto", *HVP_METHODS]
    assert list(actions["memory_format"].choices) == list(MEMORY_FORMATS)


def test_resume_rejects_truncated_foreign_and_mismatched_checkpoints(tmp_path):
    train(_cfg(tmp_path, "run", iterations=3))
    path = tmp_path / "run" / "checkpoint.pt"
    good = path.read_bytes()
    # a checkpoint written by another algorithm
    with pytest.raises(ValueError, match=r"written by a run with algorithm='maml', but this run has algorithm='fomaml'"):
        train(_cfg(tmp_path, "run", iterations=6, resume=True, algorithm="fomaml"))
    # truncated mid-write (what a non-atomic writer would leave)
    os.unlink(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        train(_cfg(tmp_path, "run", iterations=6, resume=True))
    # a file torch can read that pymaml did not write
    os.unlink(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="is not a pymaml training checkpoint"):
        train(_cfg(tmp_path, "run", iterations=6, resume=True))
