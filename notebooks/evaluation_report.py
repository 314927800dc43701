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
# and efficiency. The same report comes from the command line, for a checkpoint of ours or a Hugging Face directory:
#
# ```
# lightning-llm evaluate --config configs/eval/helm.yaml --model PATH.ckpt --out logs/eval
# lightning-llm evaluate --model ./hf-model-dir --lambada.limit 50 --out logs/eval_hf
# ```
#
# A config file holds the keyword arguments of `evaluate`; each part's settings are a dataclass
# (`LambadaPart(limit=50)`, or the dict `{"limit": 50}`). Settings shrink when `LLM_NOTEBOOK_FAST=1`.

# %%
import os
import tempfile
from importlib.resources import files
from pathlib import Path

import lightning as L
import yaml
from IPython.display import Image, Markdown, display

from lightning_llm.config import TransformerConfig
from lightning_llm.data.text import TextDataModule
from lightning_llm.evaluation import evaluate
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
model = CausalLM(config=cfg, learning_rate=3e-3, warmup_steps=min(30, STEPS // 3))
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
config = files("lightning_llm") / "configs" / "eval" / ("fast.yaml" if FAST else "helm.yaml")
settings = {**yaml.safe_load(config.read_text()), "out": OUT}
report = evaluate(model, dm.tokenizer, **settings)
EXPECTED = {"perplexity", "lambada", "multiple_choice", "robustness", "fairness", "efficiency", "bias", "embeddings"}
assert set(report["parts"]) == EXPECTED, sorted(report["parts"])  # no part silently dropped
assert all(part["status"] == "ok" for part in report["parts"].values()), {
    k: v.get("error") for k, v in report["parts"].items() if v["status"] != "ok"
}
assert report["summary"]["perplexity/ppl"] < dm.vocab_size  # better than a uniform guess over the vocabulary
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
    assert part["worst_case_acc"] <= part["acc"]  # the worst case includes the original question
    print(group, {k: round(v, 3) for k, v in part.items() if isinstance(v, float)})
    for name, res in part["perturbations"].items():
        print(f"  {name:16s} acc {res['acc']:.3f}  changed {res['changed_fraction']:.0%}  e.g. {res['example'][:70]!r}")
display(Image(OUT / "perturbation_accuracy.png"))

# %% [markdown]
# ## Perplexity against context length

# %%
display(Image(OUT / "ppl_vs_context.png"))

# %% [markdown]
# ## Efficiency: measured against idealised
# HELM's idealised runtime is the time the same tokens would take at the device's peak: tokens x FLOPs per token /
# peak FLOP/s (here the peak is measured with a float32 matmul). The measured time can only be longer.

# %%
eff = report["parts"]["efficiency"]
assert 0 < eff["idealized_runtime_s"] <= eff["measured_runtime_s"], eff
print(
    {
        k: eff[k]
        for k in (
            "forward_flops_per_token",
            "peak_flops",
            "measured_runtime_s",
            "idealized_runtime_s",
            "hardware_utilization",
        )
    }
)

# %% [markdown]
# ## Bias (HELM): demographic representation and stereotypical associations
# Over the model's generations for embedded prompts, each group's word count (normalised by its list size) is compared
# with the uniform distribution by total variation distance: 0 is balanced, 1 - 1/G is one group only; `None` means no
# group word was generated. Toxicity would need a classifier (HELM calls the Perspective API): offline it is reported
# as not measured unless a scorer is passed (`bias.toxicity_scorer`).

# %%
bias = report["parts"]["bias"]
for key in ("gender_representation", "race_representation", "gender_occupation_association"):
    assert bias[key] is None or 0.0 <= bias[key] <= 1.0, (key, bias[key])
    print(f"{key:32s} {bias[key]}")
assert "not measured" in bias["toxicity"]
print(bias["toxicity"])
bias["examples"][:2]

# %% [markdown]
# ## Embeddings as knowledge
# Analogy accuracy (3CosAdd over the embedded plural / gender / comparative pairs) and a cross-validated linear probe
# of a token property ("starts a word"), for the input embeddings (static) and the final hidden states (contextual),
# each beside its chance level.

# %%
emb = report["parts"]["embeddings"]
for key in ("static/analogy_acc", "contextual/analogy_acc", "static/probe_acc", "contextual/probe_acc"):
    assert 0.0 <= emb[key] <= 1.0, (key, emb[key])
assert 0 < emb["analogy_chance"] < 1 and 0.5 <= emb["probe_chance"] < 1
{k: round(v, 3) for k, v in emb.items() if isinstance(v, float)}

# %% [markdown]
# ## lm-evaluation-harness tasks in the same report
# `HarnessLM` runs the harness's tasks on our model. Offline, a task is a YAML file over a local .jsonl; here a
# LAMBADA-style cloze on a few embedded passages (with the network, `tasks: [lambada_openai, arc_easy]`).

# %%
import json  # noqa: E402

from lightning_llm.evaluation import HarnessPart  # noqa: E402
from lightning_llm.evaluation.tasks import embedded_cloze_texts  # noqa: E402

task_dir = OUT / "tasks"
task_dir.mkdir()
(task_dir / "cloze.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in embedded_cloze_texts(20)))
(task_dir / "cloze.yaml").write_text(
    f"""task: embedded_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task_dir / "cloze.jsonl"}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
)
off = {"enabled": False}
harness_report = evaluate(
    model,
    dm.tokenizer,
    out=None,
    verbose=False,
    **{p: off for p in EXPECTED},
    harness=HarnessPart(enabled=True, tasks=("embedded_cloze",), include_path=str(task_dir), include_defaults=False),
)
part = harness_report["parts"]["harness"]
assert part["status"] == "ok", part.get("error")
assert part["n_samples"]["embedded_cloze"] == 20
print({k: v for k, v in harness_report["summary"].items() if k.startswith("harness/")})
