"""The Fabric example script trains the character LM with LossReweighting and resumes exactly."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch

from tests.helpers import REPO, ddp_env

SCRIPT = REPO / "examples" / "fabric_char_lm.py"
ARGS = ["--chars", "6000", "--seq-len", "16", "--batch-size", "8", "--d-model", "16", "--save-every", "3"]


def _load():
    spec = importlib.util.spec_from_file_location("fabric_char_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_logs_and_resumes_exactly(tmp_path):
    example = _load()
    full = example.main([*ARGS, "--steps", "8", "--out", str(tmp_path / "full")])
    assert full["steps"] == 8 and 0 < full["reweight/ess_frac"] <= 1
    example.main([*ARGS, "--steps", "3", "--out", str(tmp_path / "part")])  # checkpoint at step 3
    resumed = example.main([*ARGS, "--steps", "8", "--out", str(tmp_path / "part"),
                            "--resume", str(tmp_path / "part" / "last.ckpt")])
    assert resumed["steps"] == 8
    a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert a["sampler"]["position"] == b["sampler"]["position"] and a["sampler"]["epoch"] == b["sampler"]["epoch"]
    for name, col in a["reweight"]["table"]["columns"].items():
        torch.testing.assert_close(b["reweight"]["table"]["columns"][name], col, equal_nan=True, msg=name)
    assert any((tmp_path / "full" / "tb").rglob("events.out.tfevents.*"))


def test_example_runs_on_two_processes(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--steps", "4", "--devices", "2",
                           "--out", str(tmp_path)], cwd=tmp_path, env=ddp_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps=4" in proc.stdout and "reweight/ess=" in proc.stdout
