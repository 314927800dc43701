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
# # Plugging lightning_llm's callbacks and metrics into your own Lightning project
#
# Your project has its own LightningModule and data; lightning_llm never saw them. Here the "existing project" is
# Lightning's own demo transformer (`lightning.pytorch.demos`) trained on WikiText2-style data written locally. The
# callbacks need one thing: how to get logits from a batch. The default reads `(inputs, targets)` tuples and dict
# batches; anything else takes a one-line `batch_fn(module, batch) -> (logits, targets)` or
# `forward_fn(module, input_ids) -> logits`.

# %%
import csv
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.demos import LightningTransformer, WikiText2
from lightning.pytorch.demos.transformer import Transformer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_llm.callbacks import (
    CalibrationMonitor,
    EmbeddingProbe,
    EvalSubsetMonitor,
    GenerationSamples,
    LLMThroughputMonitor,
    LossSpikeGuard,
    PerplexityMonitor,
)
from lightning_llm.evaluation.tasks import embedded_texts
from lightning_llm.metrics import HELMCalibration, Perplexity

FAST = os.environ.get("LLM_NOTEBOOK_FAST") == "1"
STEPS = 8 if FAST else 200
ROOT = Path(tempfile.mkdtemp(prefix="callbacks_demo_"))

# %% [markdown]
# ## The existing project: a module and word-level data (no download)

# %%
text = "\n".join(embedded_texts("train")[: 15 if FAST else 400])
(ROOT / "data").mkdir()
(ROOT / "data" / "wikitext-2.txt").write_text(text)
data = WikiText2(data_dir=ROOT / "data", block_size=32, download=False)
n_val = max(8, len(data) // 20)
train_set, val_set = torch.utils.data.random_split(data, [len(data) - n_val, n_val], torch.Generator().manual_seed(0))


class MyTransformer(LightningTransformer):
    """The user's module (Lightning's demo, sized down); nothing here knows about lightning_llm."""

    def __init__(self, vocab_size: int) -> None:
        L.LightningModule.__init__(self)
        self.model = Transformer(vocab_size=vocab_size, ninp=64, nhead=2, nhid=64, nlayers=1, dropout=0.0)

    def prepare_data(self) -> None:  # the demo would download WikiText2 here
        pass

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", torch.nn.functional.nll_loss(self(inputs, target), target.view(-1)))


class WordTokenizer:
    """The project's own tokenizer: the WikiText2 dictionary."""

    def __init__(self, dictionary) -> None:
        self.d, self.eos_id = dictionary, dictionary.word2idx["<eos>"]

    def encode(self, text):
        return [self.d.word2idx[w] for w in text.split() if w in self.d.word2idx]

    def decode(self, ids):
        return " ".join(self.d.idx2word[i] for i in ids)


tok = WordTokenizer(data.dictionary)
print(f"{len(data.dictionary)} words, {len(train_set)} training blocks")


# %% [markdown]
# ## The callbacks
# The demo's `forward(inputs, target)` returns flattened log-probabilities `(B*T, V)`: the default `batch_fn` calls
# `module(inputs, targets)` when `module(inputs)` fails and reshapes to `(B, T, V)`. Generation builds its own inputs,
# so it gets a `forward_fn`.


# %%
def demo_forward(module, ids):
    return module.model(ids, ids).view(*ids.shape, -1)


key_subset = [next(iter(DataLoader(val_set, batch_size=8)))]
callbacks = [
    EvalSubsetMonitor({"key_subset": key_subset}, every_n_steps=max(2, STEPS // 4)),
    PerplexityMonitor(),
    CalibrationMonitor(num_bins=10),
    LLMThroughputMonitor(n_layer=2, n_head=2, head_dim=32, peak_flops=1e12, log_every_n_steps=5, window_size=5),
    EmbeddingProbe(every_n_steps=max(2, STEPS // 2), tokens=["the", "function", "class"], tokenizer=tok, k=5),
    LossSpikeGuard(action="skip"),
    GenerationSamples(
        ["the function returns"], tok, every_n_steps=max(2, STEPS // 2), max_new_tokens=8, forward_fn=demo_forward
    ),
]
logger = CSVLogger(ROOT, name="my_project")
trainer = L.Trainer(
    max_steps=STEPS,
    val_check_interval=max(2, STEPS // 2),
    limit_val_batches=4,
    logger=logger,
    callbacks=callbacks,
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=1,
    num_sanity_val_steps=0,
)
module = MyTransformer(len(data.dictionary))
with torch.random.fork_rng():
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(train_set, batch_size=16, shuffle=True), DataLoader(val_set, batch_size=16))

# %% [markdown]
# ## What was logged

# %%
with open(Path(logger.log_dir) / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
keys = sorted({k for r in rows for k, v in r.items() if v})
print("\n".join(k for k in keys if "/" in k))
# the point of this notebook: every callback logged from a module it never saw
expected = {"subset/key_subset/loss", "val/ppl_monitor", "calibration/ece", "calibration/ece_10_bin",
            "throughput/tokens_per_sec", "throughput/mfu", "embedding/anisotropy", "embedding/isotropy"}  # fmt: skip
assert expected <= set(keys), sorted(expected - set(keys))

# %%
print("embedding neighbours:\n" + callbacks[4].last_neighbours)
print("\nsample:", callbacks[6].samples[-1][1])
print("\nreliability diagram:", callbacks[2].last_figure_path)

# %% [markdown]
# ## The metrics, directly in your own steps
# `Perplexity` keeps float64 sums and syncs across processes; `HELMCalibration` reproduces HELM's numbers. Use them in
# your `validation_step` like any torchmetrics metric.

# %%
ppl, cal = Perplexity(), HELMCalibration()
with torch.no_grad():
    for inputs, target in DataLoader(val_set, batch_size=16):
        logp = module(inputs, target).view(*inputs.shape, -1)  # log-probs are valid logits
        ppl.update(logp, target)
        conf, pred = logp.exp().max(-1)
        cal.update(conf.flatten(), (pred == target).flatten())
print(f"perplexity {float(ppl.compute()):.1f}")
if len(DataLoader(val_set, batch_size=16)) <= 4:  # the monitor saw the same batches (limit_val_batches=4)
    assert abs(float(ppl.compute()) - callbacks[1].last["ppl"]) < 1e-3 * callbacks[1].last["ppl"]
{k: round(float(v), 4) for k, v in cal.compute().items()}
