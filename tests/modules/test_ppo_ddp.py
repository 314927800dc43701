"""PPO under DDP: 2 CPU processes (gloo); the many backward passes of a PPO iteration stay synchronised."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning as L
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules.ppo import PPO

    out = sys.argv[1]
    dm = PromptDataModule(num_train=32, num_val=8, batch_size=8)
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16)
    m = PPO(config=cfg, reward_functions=[TargetCharReward("a", 6)], max_new_tokens=6, ppo_epochs=2, num_minibatches=2,
            gradient_accumulation_steps=2, adaptive_kl=True, kl_target=0.01, kl_horizon=10.0,
            log_completions_every_n_steps=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(m, datamodule=dm)
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.save({"params": flat, "kl": m.kl_ctl.value, "rollouts": m.rollouts_done}, f"{out}/rank{trainer.global_rank}.pt")
    from lightning_llm._dist import destroy_process_group
    destroy_process_group()  # the Trainer's gloo group, left to interpreter finalization, can abort the process
    """
)


@pytest.mark.distributed
@pytest.mark.slow
def test_ppo_ddp_two_processes_stay_in_sync(tmp_path):
    import torch

    script = tmp_path / "ddp_ppo.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # each rank sampled different prompts, yet the weights and the KL coefficient are identical (synced gradients,
    # KL averaged over ranks before the controller update)
    torch.testing.assert_close(r0["params"], r1["params"])
    assert r0["kl"] == r1["kl"] and r0["rollouts"] == r1["rollouts"] == 2
