"""Every callback inside a LightningModule this package never saw: ``lightning.pytorch.demos.LightningTransformer``
on WikiText2-like data written locally (no download)."""

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer, WikiText2
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_llm.callbacks import (
    CalibrationMonitor,
    EmbeddingProbe,
    EvalSubsetMonitor,
    GenerationSamples,
    LambadaMonitor,
    LLMThroughputMonitor,
    LossSpikeGuard,
    PerplexityMonitor,
)

TEXT = "\n".join(
    f"the {a} {b} sat on the {c} mat and the {b} ran to the {a} door ."
    for a in ("red", "blue", "old", "big")
    for b in ("cat", "dog", "fox")
    for c in ("green", "small", "warm")
)


class WordTokenizer:
    """Whitespace tokenizer over the WikiText2 dictionary (what a user of the demo would write)."""

    def __init__(self, dictionary) -> None:
        self.d = dictionary
        self.eos_id = self.pad_id = dictionary.word2idx["<eos>"]
        self.bos_id = None

    def encode(self, text):
        return [self.d.word2idx[w] for w in text.split() if w in self.d.word2idx]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return " ".join(self.d.idx2word[i] for i in ids)


class DemoLM(LightningTransformer):
    def __init__(self, vocab_size: int) -> None:
        L.LightningModule.__init__(self)
        from lightning.pytorch.demos.transformer import Transformer

        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", torch.nn.functional.nll_loss(self(inputs, target), target.view(-1)))

    def prepare_data(self):  # the demo downloads WikiText2 here; our data is written locally and passed to fit()
        pass


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    d = tmp_path_factory.mktemp("wikitext")
    (d / "wikitext-2.txt").write_text(TEXT + "\n")
    return WikiText2(data_dir=d, block_size=8, download=False)


def demo_forward(module, ids):  # the demo model needs a decoder input; feed the ids
    return module.model(ids, ids).view(*ids.shape, -1)


def test_all_callbacks_in_demo_transformer(wikitext, tmp_path, make_trainer):
    tok = WordTokenizer(wikitext.dictionary)
    loader = DataLoader(wikitext, batch_size=4)
    val = DataLoader(wikitext, batch_size=4)
    subset = [next(iter(DataLoader(wikitext, batch_size=2)))]
    cbs = {
        "subset": EvalSubsetMonitor({"cats": subset}, every_n_steps=2),
        "ppl": PerplexityMonitor(),
        "cal": CalibrationMonitor(num_bins=5),
        "tp": LLMThroughputMonitor(
            n_layer=2, n_head=2, head_dim=8, peak_flops=1e12, log_every_n_steps=2, window_size=2
        ),
        "emb": EmbeddingProbe(every_n_steps=2, tokens=["cat", "dog"], tokenizer=tok, k=2, n_pairs=100),
        "guard": LossSpikeGuard(),
        "gen": GenerationSamples(["the red cat"], tok, every_n_steps=3, max_new_tokens=3, forward_fn=demo_forward),
        "lambada": LambadaMonitor(
            ["the red cat sat on the green mat", "the big dog ran to the old door"],
            tok,
            every_n_steps=3,
            forward_fn=demo_forward,
        ),
    }
    logger = CSVLogger(tmp_path, name="demo")
    trainer = make_trainer(
        list(cbs.values()),
        steps=6,
        val_check_interval=3,
        limit_val_batches=2,
        logger=logger,
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    model = DemoLM(len(wikitext.dictionary))
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val)
    with open(logger.log_dir + "/metrics.csv") as f:
        keys = set(next(csv.reader(f)))
    for key in (
        "subset/cats/ppl",
        "val/ppl_monitor",
        "calibration/ece",
        "calibration/ece_10_bin",
        "throughput/tokens_per_sec",
        "throughput/mfu",
        "embedding/anisotropy",
        "embedding/isotropy",
        "lambada/acc",
        "lambada/ppl",
    ):
        assert key in keys, key
    assert cbs["gen"].samples and cbs["gen"].samples[-1][0] == 6
    assert "cat" in cbs["emb"].last_neighbours
    assert cbs["cal"].last_figure_path.endswith(".png")
    assert not cbs["guard"].events
    # the demo's log-probs are valid logits: the monitor's perplexity is exp(mean NLL) of the val batches
    assert math.isfinite(cbs["ppl"].last["ppl"]) and cbs["ppl"].last["ppl"] > 1


def test_periodic_callbacks_run_once_per_step_under_gradient_accumulation(wikitext, make_trainer):
    """With ``accumulate_grad_batches=2`` Lightning calls ``on_train_batch_end`` twice per optimizer step; each
    periodic callback must still run once per due step. 8 micro-batches -> optimizer steps 1..4; every 2 steps -> the
    runs are at steps 2 and 4 (EvalSubsetMonitor and GenerationSamples also run at the end of training, step 4: the
    same step, so not again). PerplexityMonitor and LambadaMonitor used to run twice per due step."""
    tok = WordTokenizer(wikitext.dictionary)
    loader = DataLoader(wikitext, batch_size=4)
    subset = [next(iter(DataLoader(wikitext, batch_size=2)))]
    ppl = PerplexityMonitor(dataloader=subset, every_n_steps=2, on_validation=False)
    ppl_steps: list[int] = []
    ppl_run = ppl.on_due_step
    ppl.on_due_step = lambda trainer, module: (ppl_steps.append(trainer.global_step), ppl_run(trainer, module))
    cbs = {
        "subset": EvalSubsetMonitor({"cats": subset}, every_n_steps=2),
        "emb": EmbeddingProbe(every_n_steps=2, tokens=["cat", "dog"], tokenizer=tok, k=2, n_pairs=100),
        "gen": GenerationSamples(["the red cat"], tok, every_n_steps=2, max_new_tokens=2, forward_fn=demo_forward),
        "lambada": LambadaMonitor(["the red cat sat on the green mat"], tok, every_n_steps=2, forward_fn=demo_forward),
    }
    trainer = make_trainer([ppl, *cbs.values()], steps=4, accumulate_grad_batches=2, limit_train_batches=8)
    trainer.fit(DemoLM(len(wikitext.dictionary)), train_dataloaders=loader)
    assert trainer.global_step == 4
    assert ppl_steps == [2, 4]
    assert [step for step, _ in cbs["subset"].history] == [2, 4]
    assert [step for step, _ in cbs["emb"].history] == [2, 4]
    assert [step for step, _ in cbs["gen"].samples] == [2, 4]
    assert [step for step, _ in cbs["lambada"].history] == [2, 4]
