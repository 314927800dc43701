"""Each callback's numbers against an independent reference (torchmetrics, uncertainty-calibration, scikit-learn,
our KV-cache generator, naive loops, hand-derived formulas)."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_llm.callbacks import (
    CalibrationMonitor,
    EmbeddingProbe,
    EvalSubsetMonitor,
    GenerationSamples,
    LambadaMonitor,
    LLMThroughputMonitor,
    LossSpikeGuard,
    PerplexityMonitor,
    embedding_stats,
    nearest_neighbours,
    palm_flops_per_token,
    subset_metrics,
)

V, T = 37, 12


class TinyLM(L.LightningModule):
    """A foreign decoder: forward(ids) -> logits; dict batches with input_ids / targets."""

    def __init__(self, nan_at: int | None = None, spike_at: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, V)
        self.nan_at, self.spike_at = nan_at, spike_at

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.cumsum(self.mix(h), dim=1) / torch.arange(1, ids.shape[1] + 1)[:, None]  # causal mixing
        return self.head(h)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        if batch_idx == self.spike_at:
            loss = loss * 1000
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(n=4, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (b, T + 1), generator=g)
        out.append({"input_ids": seq[:, :-1], "targets": seq[:, 1:]})
    return out


def loader(data):
    return torch.utils.data.DataLoader(data, batch_size=None)  # yields the prebuilt batches unchanged


# ------------------------------------------------------------------------------------------------ eval monitors
def test_subset_metrics_match_torchmetrics():
    from torchmetrics.text import Perplexity as TMPerplexity

    torch.manual_seed(0)
    model, data = TinyLM(), batches()
    ref = TMPerplexity()
    hits = count = 0
    with torch.no_grad():
        for b in data:
            logits = model(b["input_ids"])
            ref.update(logits, b["targets"])
            hits += int((logits.argmax(-1) == b["targets"]).sum())
            count += b["targets"].numel()
    out = subset_metrics(model, data)
    assert out["ppl"] == pytest.approx(float(ref.compute()), rel=1e-5)
    assert out["acc"] == pytest.approx(hits / count)


def test_eval_subset_and_perplexity_monitor_in_training(make_trainer):
    from torchmetrics.text import Perplexity as TMPerplexity

    data = batches(4)
    sub = EvalSubsetMonitor({"a": data[:1], "b": data[1:2]}, every_n_steps=2)
    ppl = PerplexityMonitor(bytes_fn=lambda b: 2 * b["targets"].numel())
    model = TinyLM()
    make_trainer([sub, ppl], steps=4, limit_val_batches=2, val_check_interval=4).fit(model, loader(data), loader(data))
    assert [s for s, _ in sub.history] == [2, 4]
    ref = TMPerplexity()
    with torch.no_grad():
        for b in data[:2]:
            ref.update(model(b["input_ids"]), b["targets"])
    assert ppl.last["ppl"] == pytest.approx(float(ref.compute()), rel=1e-5)
    # bits per byte = ln(ppl) * tokens / (ln 2 * bytes), with bytes = 2 per token here
    assert ppl.last["bits_per_byte"] == pytest.approx(math.log(ppl.last["ppl"]) / (2 * math.log(2)), rel=1e-5)
    assert sub.history[-1][1]["a"]["ppl"] == pytest.approx(subset_metrics(model, data[:1])["ppl"], rel=1e-5)


def test_calibration_monitor_matches_references(make_trainer):
    import calibration as cal
    from torchmetrics.functional.classification import binary_calibration_error

    data = batches(2)
    mon = CalibrationMonitor(num_bins=10)
    model = TinyLM()
    make_trainer([mon], steps=1, limit_val_batches=2, val_check_interval=1).fit(model, loader(data), loader(data))
    with torch.no_grad():
        probs = torch.cat([model(b["input_ids"]).softmax(-1).flatten(0, 1) for b in data])
    tgt = torch.cat([b["targets"].flatten() for b in data])
    conf, pred = probs.max(-1)
    correct = (pred == tgt).long()
    assert mon.last["ece"] == pytest.approx(float(binary_calibration_error(conf, correct, n_bins=10)), abs=1e-6)
    assert mon.last["ece_10_bin"] == pytest.approx(
        cal.get_ece_em(conf.double().numpy(), correct.numpy(), num_bins=10), abs=1e-6
    )
    assert mon.last_figure_path.endswith(".png")


def test_lambada_monitor_matches_naive_loop(make_trainer):
    class CharTok:  # one id per lowercase letter / space; eos = pad = 0
        eos_id = pad_id = 0
        bos_id = None

        def encode(self, text):
            return [1 + (ord(c) - 97) % 30 if c != " " else 31 for c in text]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    texts = ["the cat sat on a mat", "a dog ran far", "we go"]
    mon = LambadaMonitor(texts, CharTok(), every_n_steps=1, batch_size=2)
    model = TinyLM()
    res = mon.evaluate(make_trainer([mon], steps=1), model)
    tok = CharTok()
    correct, logprob = [], []
    with torch.no_grad():
        for text in texts:  # naive: one unpadded forward per passage
            ctx, tgt = " ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1]
            ids = tok.encode(ctx + tgt)
            n = len(tok.encode(tgt))
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)[-n:]
            t = torch.tensor(ids[-n:])
            logprob.append(float(logp.gather(1, t[:, None]).sum()))
            correct.append(bool((logp.argmax(-1) == t).all()))
    assert res["acc"] == pytest.approx(sum(correct) / 3)
    assert res["ppl"] == pytest.approx(math.exp(-sum(logprob) / 3), rel=1e-5)


# ------------------------------------------------------------------------------------------------ throughput
def test_flops_from_config_and_hand_formula():
    from lightning_llm.config import TransformerConfig

    cfg = TransformerConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, mlp="gelu")
    mon = LLMThroughputMonitor(config=cfg)
    # hand count (no bias, layernorm off -> rmsnorm weights C): per block attn 4*C*C, mlp 2*C*4C, 2 norms C
    n = 2 * (4 * 16 * 16 + 2 * 16 * 64 + 2 * 16) + 16 + 64 * 16  # + final norm + untied lm head
    assert mon.flops_per_token(nn.Linear(1, 1), 16) == 6 * n + 12 * 2 * 2 * 8 * 16
    assert palm_flops_per_token(n, 2, 2, 8, 16) == 6 * n + 12 * 2 * 2 * 8 * 16


def test_measured_flops_match_formula_for_linear_model():
    # a model of one (V x C) embedding and a C -> V head: training FLOPs/token = 6 * (C * V) (no attention)
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V, bias=False)

        def forward(self, ids):
            return self.head(self.emb(ids))

    mon = LLMThroughputMonitor(flops_per_token="measure")
    b = batches(1)[0]
    assert mon.flops_per_token(Head(), T, b) == pytest.approx(6 * 8 * V)


def test_throughput_logs_mfu(make_trainer):
    mon = LLMThroughputMonitor(flops_per_token=1e6, peak_flops=1e9, log_every_n_steps=2, window_size=2)
    make_trainer([mon], steps=4).fit(TinyLM(), loader(batches(4)))
    m = mon.last
    assert m["throughput/mfu"] == pytest.approx(m["throughput/flops_per_sec"] / 1e9)
    assert m["throughput/flops_per_sec"] == pytest.approx(m["throughput/tokens_per_sec"] * 1e6)


# ------------------------------------------------------------------------------------------------ embeddings
def test_embedding_stats_references():
    from sklearn.neighbors import NearestNeighbors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g)
    stats = embedding_stats(w, n_pairs=500)
    norms = w.norm(dim=1)
    assert stats["norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-6)
    assert stats["norm_max"] == pytest.approx(float(norms.max()), rel=1e-6)
    assert abs(stats["anisotropy"]) < 0.1  # random Gaussian directions: mean cosine ~ 0
    same = torch.ones(10, 4) * torch.arange(1, 11)[:, None]  # every row points the same way
    s2 = embedding_stats(same, n_pairs=100)
    assert s2["anisotropy"] == pytest.approx(1.0, abs=1e-6)
    # rows k * (1, 1, 1, 1), k = 1..10 (norm 2k): Z(+u) = sum_k e^{2k}, Z(-u) = sum_k e^{-2k}, Z(orthogonal) = 10
    hand = sum(math.exp(-2 * k) for k in range(1, 11)) / sum(math.exp(2 * k) for k in range(1, 11))
    assert s2["isotropy"] == pytest.approx(hand, rel=1e-6)
    nn_ref = NearestNeighbors(n_neighbors=4, metric="cosine").fit(w.numpy())
    _, idx = nn_ref.kneighbors(w[[3, 7]].numpy())
    ours = nearest_neighbours(w, [3, 7], k=3)
    assert [[i for i, _ in row] for row in ours] == [list(r[1:]) for r in idx]


def test_embedding_probe_logs_neighbours(tmp_path, make_trainer):
    probe = EmbeddingProbe(every_n_steps=2, tokens=[1, 2], k=2, n_pairs=50)
    make_trainer([probe], steps=2).fit(TinyLM(), loader(batches(2)))
    assert probe.history[0][0] == 2 and len(probe.last_neighbours.splitlines()) == 2
    assert (tmp_path / "embedding_neighbours.txt").is_file()


# ------------------------------------------------------------------------------------------------ loss spikes
def test_guard_skips_nan_update_and_reports_step(make_trainer):
    guard = LossSpikeGuard(action="skip")
    model = TinyLM(nan_at=2)
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    make_trainer([guard, Snap()], steps=4).fit(model, loader(batches(4)))
    assert len(guard.events) == 1
    ev = guard.events[0]
    assert (ev.kind, ev.batch_idx, ev.step, ev.action) == ("nonfinite", 2, 2, "skip")
    assert "What to try" in ev.message() and "batch index 2" in ev.message()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # the NaN step moved nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_detects_spike_and_stops(make_trainer):
    guard = LossSpikeGuard(action="stop", warmup=3, window=5)
    t = make_trainer([guard], steps=8)
    t.fit(TinyLM(spike_at=5), loader(batches(8)))
    assert [e.kind for e in guard.events] == ["spike"] and guard.events[0].batch_idx == 5
    assert t.global_step == 6 < 8  # stopped after the spiking step (whose update was dropped)


def test_guard_raise_and_validation():
    with pytest.raises(ValueError, match="action"):
        LossSpikeGuard(action="explode")
    guard = LossSpikeGuard(threshold=2.0, warmup=2, window=3, mode="any")
    for v in (1.0, 1.1, 0.9):
        guard._accept(v)
    assert guard.check(5.0)[0] == "spike" and guard.check(1.05)[0] is None
    assert guard.check(float("inf"))[0] == "nonfinite"


# ------------------------------------------------------------------------------------------------ generation
def test_generation_samples_match_kv_cache_generate(tmp_path):
    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn import Transformer, generate

    class IdTok:
        eos_id = None

        def encode(self, text):
            return [int(x) for x in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    net = Transformer(TransformerConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16))

    class Wrap(TinyLM):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids):
            return self.net(ids)

    cb = GenerationSamples(["1 2 3", "4 5"], IdTok(), every_n_steps=100, max_new_tokens=5)
    pairs = cb.generate(Wrap())
    for prompt, completion in pairs:
        ref = generate(net, [IdTok().encode(prompt)], max_new_tokens=5, temperature=0.0)
        assert completion == " ".join(map(str, ref.responses[0].tolist()))
    with pytest.raises(ValueError, match="prompts"):
        GenerationSamples("one prompt", IdTok())
