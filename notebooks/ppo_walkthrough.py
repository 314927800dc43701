# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # PPO walkthrough: reward and KL curves
#
# `lightning_llm.modules.ppo.PPO` runs RLHF-PPO as the "N implementation details" work defines it: rollouts with a KV
# cache, a reward function (or reward model), per-token KL penalty against a frozen reference, GAE, clipped policy and
# value losses. The task is the embedded synthetic "letters" world: the reward is the fraction of an 8-token
# completion made of the letter `a` (maximum 1.0). A random policy scores about 1/14; PPO should climb, while the KL
# to the reference grows, the price paid for moving away from it.
#
# Settings shrink when `LLM_NOTEBOOK_FAST=1`.

# %%
import csv
import os
import tempfile
from pathlib import Path

import lightning as L
from IPython.display import display
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure

from lightning_llm.config import TransformerConfig
from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.synthetic import TargetCharReward
from lightning_llm.modules.ppo import PPO
from lightning_llm.rlhf import RANDOM_WALK_TRUE_VALUES, random_walk_td0

FAST = os.environ.get("LLM_NOTEBOOK_FAST") == "1"
ROOT = Path(tempfile.mkdtemp(prefix="ppo_walkthrough_"))
N_TRAIN, BATCH = (96, 16) if FAST else (1280, 64)

# %%
L.seed_everything(0, verbose=False)
dm = PromptDataModule(dataset="synthetic", num_train=N_TRAIN, num_val=16, batch_size=BATCH)
policy = PPO(
    config=TransformerConfig(
        vocab_size=dm.vocab_size, block_size=32, n_layer=1 if FAST else 2, n_head=4, n_embd=32 if FAST else 64
    ),
    reward_functions=[TargetCharReward("a", 8)],
    max_new_tokens=8,
    ppo_epochs=2 if FAST else 4,
    num_minibatches=2,
    kl_coef=0.02,
    learning_rate=3e-3,
    log_completions_every_n_steps=1000,
)
logger = CSVLogger(ROOT, name="ppo")
trainer = L.Trainer(
    max_epochs=1,
    accelerator="cpu",
    logger=logger,
    log_every_n_steps=1,
    limit_val_batches=1,
    num_sanity_val_steps=0,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(policy, datamodule=dm)

# %%
with open(Path(logger.log_dir) / "metrics.csv") as f:
    rows = [r for r in csv.DictReader(f) if r.get("train/reward_mean")]
steps = [int(r["step"]) for r in rows]
series = {k: [float(r[k]) for r in rows] for k in ("train/reward_mean", "train/kl", "train/entropy")}
print(
    f"{len(rows)} PPO iterations; reward {series['train/reward_mean'][0]:.3f} -> {series['train/reward_mean'][-1]:.3f},"
    f" KL {series['train/kl'][0]:.3f} -> {series['train/kl'][-1]:.3f} nats/sequence"
)

# %%
fig = Figure(figsize=(9, 3))
axes = fig.subplots(1, 3)
for ax, (key, values) in zip(axes, series.items()):
    ax.plot(steps, values, marker=".")
    ax.set_title(key)
    ax.set_xlabel("step")
fig.tight_layout()
display(fig)

# %% [markdown]
# ## The bootstrapped update underneath: TD(0) on Sutton and Barto's random walk
#
# GAE (`lightning_llm.rlhf.gae`) and the value loss are built on temporal-difference learning. Its simplest form,
# TD(0), moves the value of a state towards the reward plus the discounted value of the next state:
#
# $$V(s) \leftarrow V(s) + \alpha\,[\,r + \gamma V(s') - V(s)\,]$$
#
# `lightning_llm.rlhf.td0_update_` is that update for a table of values, `td0_targets` the same target for a value
# network (`r + gamma V(s')`, held fixed), which is GAE's return with `lam = 0`. The classic check (Sutton and Barto,
# Example 6.2): five states A..E in a row, start in C, step left or right with probability 1/2, reward 1 only on
# leaving E to the right. The true values are 1/6, 2/6, ..., 5/6, and TD(0) from 0.5 everywhere converges to them.

# %%
EPISODES = 200 if FAST else 500
curves = {alpha: random_walk_td0(num_episodes=EPISODES, alpha=alpha, seed=0) for alpha in (0.15, 0.1, 0.05)}
values, rms = curves[0.05]
print("state  true   TD(0) after", EPISODES, "episodes (alpha 0.05)")
for name, true, v in zip("ABCDE", RANDOM_WALK_TRUE_VALUES.tolist(), values.tolist()):
    print(f"  {name}    {true:.3f}  {v:.3f}")
late = sum(rms[-50:]) / 50
print(f"RMS error: {rms[0]:.3f} after the first episode -> {late:.3f} (mean of the last 50)")
assert late < 0.06 and (values[1:] > values[:-1]).all(), "TD(0) should converge to the true values"

fig = Figure(figsize=(5, 3))
ax = fig.subplots()
for alpha, (_, err) in curves.items():
    ax.plot(err, label=f"alpha = {alpha}")
ax.set_xlabel("episode")
ax.set_ylabel("RMS error vs true values")
ax.legend()
fig.tight_layout()
display(fig)
