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
# # A HELM-style evaluation report of a small model
#
# Perplexity alone hides a lot. The suite in `lightning_llm.evaluation` reports, for one model: rolling-window
# perplexity and bits per byte, LAMBADA (harness definitions), a multiple-choice task with HELM's calibration metrics,
# robustness (HELM's seeded "mild mix") and fairness (dialect, pronoun and first-name swaps) as worst-case accuracy,
# and efficiency. The same report comes from the command line:
#
# ```
# python -m lightning_llm.evaluation --checkpoint PATH.ckpt --config configs/eval/helm.yaml --out logs/eval
# python -m lightning_llm.evaluation --hf ./hf-model-dir --out logs/eval_hf
# ```
#
# Settings shrink when `LLM_NOTEBOOK_FAST=1`.

# %%
import os
import tempfile
from pathlib import Path

import lightning as L
from IPython.display import Image, Markdown, display

from lightning_llm.config import TransformerConfig
from lightning_llm.data.text import TextDataModule
from lightning_llm.evaluation import evaluate, load_config
from lightning_llm.modules.causal_lm import CausalLM

FAST = os.environ.get("LLM_NOTEBOOK_FAST") == "1"
STEPS = 10 if FAST else 300
OUT = Path(tempfile.mkdtemp(prefix="eval_report_"))

# %% [markdown]
# Train a small RoPE model on the embedded corpus (a few hundred steps on the CPU; a handful in fast mode).

# %%
L.seed_everything(0, verbose=False)
dm = TextDataModule("embedded", vocab_size=512 if FAST else 2048, block_size=64, batch_size=16)
cfg = TransformerConfig(
    vocab_size=dm.vocab_size, block_size=128, n_layer=1 if FAST else 2, n_head=4, n_embd=32 if FAST else 128
)
model = CausalLM(cfg, learning_rate=3e-3, warmup_steps=min(30, STEPS // 3))
L.Trainer(
    max_steps=STEPS,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
).fit(model, datamodule=dm)

# %%
config = load_config("../configs/eval/fast.yaml" if FAST else "../configs/eval/helm.yaml")
report = evaluate(model, dm.tokenizer, config, out_dir=OUT)
display(Markdown((OUT / "report.md").read_text().split("## perplexity")[0]))

# %% [markdown]
# ## Calibration: is the model's confidence worth anything?
# HELM's equal-mass ECE compares the mean confidence and the accuracy in 10 bins of equal size.

# %%
report["parts"]["multiple_choice"]["calibration"]

# %%
display(Image(OUT / "reliability_diagram.png"))

# %% [markdown]
# ## Robustness and fairness: worst case over the original and the perturbed question

# %%
for group in ("robustness", "fairness"):
    part = report["parts"][group]
    print(group, {k: round(v, 3) for k, v in part.items() if isinstance(v, float)})
    for name, res in part["perturbations"].items():
        print(f"  {name:16s} acc {res['acc']:.3f}  changed {res['changed_fraction']:.0%}  e.g. {res['example'][:70]!r}")
display(Image(OUT / "perturbation_accuracy.png"))

# %% [markdown]
# ## Perplexity against context length

# %%
display(Image(OUT / "ppl_vs_context.png"))
