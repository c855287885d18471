"""benchmarks/gpu_check.sh: fails fast without CUDA, and its CPU smoke mode runs the fit with every callback."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(out, *args, **env):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=str(REPO), env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure; this machine has CUDA")
def test_fails_fast_without_cuda(tmp_path):
    proc = _run(tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_usage_errors(tmp_path):
    assert _run(tmp_path, "--bogus").returncode == 2
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_cpu_smoke_runs_every_callback(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "gpu_fit.json").read_text())
    figures = payload["figures"]
    configs = ["plain_mean", "LossReweighting", "LossReweighting_kl_dro", "GroupDRO", "FairErrorBoundScaling",
               "GroupBalancing_upweight", "GroupBalancing_upsample", "ImportanceSampling", "AdaWAC",
               "WeightedSampler_SamplerState"]
    for name in configs:
        assert figures[f"ok_{name}"] == 1.0, payload["failed"]
        assert figures[f"step_ms_{name}"] > 0
    assert payload["failed"] == {} and payload["meta_fit"]["device"] == "cpu"
    assert all(row["steps"] == 4 for row in payload["table"])
    summary = (out / "summary.txt").read_text()
    assert "gpu_fit.ok_GroupDRO = 1.0" in summary
    ops = json.loads((out / "op_count.json").read_text())["figures"]  # the op counts next to the step times
    assert 0 < ops["ops_linupper_sync"] <= 40 and 0 < ops["ops_linupper_nosync"] <= 40
    assert {f"ops_adawac_{mode}" for mode in ("sync", "nosync")} <= set(ops)
    assert "op_count.ops_group_dro_sync = " in summary
