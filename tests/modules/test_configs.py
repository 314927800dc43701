"""Every shipped RLHF config parses and runs through the real CLI (`python -m lightning_llm fit`) with fast_dev_run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "rlhf").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_rlhf_config_fast_dev_run(config, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lightning_llm",
        "fit",
        "--config",
        str(config),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fit metrics written" in proc.stdout
    assert list(tmp_path.rglob("fit_metrics.json"))


def test_all_quickstarts_present():
    assert {p.stem for p in CONFIGS} >= {"reward_quickstart", "ppo_quickstart", "dpo_quickstart"}
