"""KV-cache decoding against full recomputation, left-padding invariance, filtering, EOS handling, seeded sampling.

Notation: B batch, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.nn import Transformer, filter_logits, generate, left_pad

POS = ["rope", "alibi", "learned", "sinusoidal"]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19], [3]]


def model_for(pos: str, n_kv_head: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    # a large init_std gives peaked, input-dependent next-token distributions (greedy ties would make tests flaky)
    cfg = TransformerConfig(
        vocab_size=53,
        block_size=48,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        n_embd=32,
        pos_encoding=pos,
        init_std=0.3,
    )
    return Transformer(cfg).eval()


def greedy_by_recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The naive reference: feed the whole unpadded sequence at every step, take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("pos", POS)
def test_cached_greedy_equals_full_recompute(pos: str) -> None:
    model = model_for(pos)
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    no_cache = generate(model, PROMPTS, max_new_tokens=10, temperature=0, use_cache=False)
    assert torch.equal(out.sequences, no_cache.sequences)
    for row, prompt in enumerate(PROMPTS):  # each padded row equals its prompt decoded alone, with no padding
        assert out.responses[row].tolist() == greedy_by_recompute(model, prompt, 10)
    assert out.response_mask.all() and not out.finished.any()
    ids, mask = left_pad(PROMPTS, 0)
    assert torch.equal(out.sequences[:, : out.prompt_length], ids)
    assert torch.equal(out.attention_mask, torch.cat((mask, torch.ones(4, 10, dtype=torch.long)), dim=1))


def test_cached_greedy_mqa_and_mha() -> None:
    for n_kv in (1, 4):
        model = model_for("rope", n_kv_head=n_kv, seed=n_kv)
        out = generate(model, PROMPTS[:2], max_new_tokens=6, temperature=0)
        for row, prompt in enumerate(PROMPTS[:2]):
            assert out.responses[row].tolist() == greedy_by_recompute(model, prompt, 6)


@pytest.mark.parametrize("pos", POS)
def test_left_padding_invariance(pos: str) -> None:
    model = model_for(pos, seed=1)
    torch.manual_seed(5)
    x = torch.randint(1, 53, (1, 9))
    with torch.no_grad():
        alone = model(x)
        for n_pad in (1, 4):
            pads = torch.randint(0, 53, (1, n_pad))  # arbitrary pad ids: they must not leak into real tokens
            padded = torch.cat((pads, x), dim=1)
            mask = torch.cat((torch.zeros(1, n_pad, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)), dim=1)
            logits = model(padded, attention_mask=mask)
            torch.testing.assert_close(logits[:, n_pad:], alone, atol=1e-5, rtol=1e-4)
            assert torch.isfinite(logits).all()


def test_cache_decoding_step_logits_match_full_forward() -> None:
    """Prefill then one-token steps: each step's logits equal the full forward's logits at that position."""
    model = model_for("alibi", seed=2)
    ids = torch.randint(0, 53, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(2, 12)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, 12):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-4)
    assert cache.length == 12


def test_kv_cache_overflow_is_clear() -> None:
    model = model_for("rope")
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="max_length"):
        model(torch.randint(0, 53, (1, 5)), kv_cache=cache)


# ------------------------------------------------------------------------------------------------------ filtering
def test_filter_logits_hand_example() -> None:
    # probabilities 0.5, 0.2, 0.15, 0.1, 0.05, stored in a shuffled order
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = probs.log()[None]
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]  # the two largest: 0.5 and 0.2
    assert kept(filter_logits(logits, top_k=5)) == [0, 1, 2, 3, 4]
    # top_p = 0.6: 0.5 < 0.6, 0.5 + 0.2 = 0.7 >= 0.6 -> keep {0.5, 0.2}
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 3]
    # top_p = 0.75: 0.7 < 0.75, 0.85 >= 0.75 -> keep {0.5, 0.2, 0.15}
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 3, 4]
    # top_p = 0.3: the top token alone already reaches it
    assert kept(filter_logits(logits, top_p=0.3)) == [1]
    # both: top_k=3 then top_p=0.9 of the full distribution's logits -> {0.5, 0.2, 0.15}
    assert kept(filter_logits(logits, top_k=3, top_p=0.9)) == [1, 3, 4]
    # kept logits are unchanged
    out = filter_logits(logits, top_k=2)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


@pytest.mark.parametrize("top_k,top_p", [(5, None), (1, None), (None, 0.9), (None, 0.5), (None, 0.05)])
def test_filter_logits_matches_hf_warpers(top_k, top_p) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(7)
    logits = torch.randn(6, 40) * 3
    warper = TopKLogitsWarper(top_k) if top_k is not None else TopPLogitsWarper(top_p)
    expected = warper(None, logits.clone())
    got = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)])


# ------------------------------------------------------------------------------------------------------ EOS, sampling
def test_eos_stops_rows_and_pads() -> None:
    model = model_for("rope", seed=3)
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0)  # no EOS: the reference continuations
    eos = int(free.responses[0, 2])  # row 0 emits this token at step 2 (perhaps earlier too)
    pad = 52
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos, pad_id=pad)
    n = out.responses.shape[1]
    for row in range(len(PROMPTS)):
        ref = free.responses[row].tolist()
        stop = ref.index(eos) + 1 if eos in ref else len(ref)  # tokens up to and including the first EOS
        expected = ref[:stop] + [pad] * (n - stop)
        assert out.responses[row].tolist() == expected[:n]
        assert out.response_mask[row].tolist() == ([1] * stop + [0] * (n - stop))[:n]
        assert bool(out.finished[row]) == (eos in ref[:n])
        # log-probabilities are 0 where the mask is 0
        assert (out.logprobs[row][out.response_mask[row] == 0] == 0).all()
    assert out.finished[0]
    assert out.attention_mask[:, out.prompt_length :].equal(out.response_mask)


def test_all_rows_finish_early_stops_loop() -> None:
    model = model_for("alibi", seed=4)
    free = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0)
    eos = int(free.responses[0, 1])
    out = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, eos_id=eos)
    stop = free.responses[0].tolist().index(eos) + 1
    assert out.responses.shape[1] == stop and out.finished.all()


def _ends_with(seq: list[int]):
    """A ``stop`` callable: rows whose generated tokens end with ``seq`` (checked only on rows still running)."""
    calls = []

    def stop(responses: torch.Tensor, finished: torch.Tensor) -> list[bool]:
        calls.append(finished.clone())
        return [not done and row[-len(seq) :] == seq for row, done in zip(responses.tolist(), finished.tolist())]

    return stop, calls


@pytest.mark.parametrize("path", ["static", "growing", "recompute"])
def test_stop_callable_stops_rows_at_a_token_sequence(path: str, monkeypatch) -> None:
    """Rows stop right after a two-token stop sequence (kept, then padding), the others run to max_new_tokens: the
    expected outputs are cut from the plain recompute loop's free continuations, row by row."""
    import lightning_llm.nn.generation as generation

    if path == "growing":
        monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)
    model = model_for("rope", seed=3)
    n, pad = 12, 52
    free = [greedy_by_recompute(model, prompt, n) for prompt in PROMPTS]
    seq = free[0][3:5]  # row 0 meets it at step 4 at the latest
    stop, calls = _ends_with(seq)
    out = generate(
        model, PROMPTS, max_new_tokens=n, temperature=0, pad_id=pad, stop=stop, use_cache=path != "recompute"
    )
    ends = []
    for ref in free:
        hit = [j + len(seq) for j in range(n - len(seq) + 1) if ref[j : j + len(seq)] == seq]
        ends.append(hit[0] if hit else n)
    width = out.responses.shape[1]
    assert width == (max(ends) if all(e < n for e in ends) else n)
    for row, (ref, end) in enumerate(zip(free, ends)):
        assert out.responses[row].tolist() == (ref[:end] + [pad] * n)[:width]
        assert out.response_mask[row].tolist() == ([1] * end + [0] * n)[:width]
        assert bool(out.finished[row]) == (end < n)
    assert ends[0] <= 5 and any(e == n for e in ends)  # the test covers a stopped row and a row that runs on
    # the callable sees the rows stopped at earlier steps as finished
    assert not calls[0].any() and calls[ends[0]][0] and len(calls) == width


def test_stop_callable_and_eos_together() -> None:
    """EOS and the stop callable both end rows; a tensor answer works as a list does; all rows stopped: cut."""
    model = model_for("alibi", seed=4)
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    ref = free.responses[1].tolist()
    end = next(j for j in range(2, 10) if ref[j] not in ref[:j]) + 1  # row 1 ends at its first new token after 2
    eos = ref[end - 1]
    first = free.responses[:, 0]

    def stop_after_one(responses: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(PROMPTS)) != 1  # every row but row 1, at the first step

    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos, pad_id=52, stop=stop_after_one)
    assert out.finished.all() and out.responses.shape[1] == end
    assert out.responses[:, 0].equal(first)
    assert out.response_mask.sum(1).tolist() == [1, end, 1, 1]
    assert out.responses[1].tolist() == ref[:end]


def test_an_error_mid_decoding_restores_the_model() -> None:
    """A ``stop`` that raises at the third step: the error propagates, the model is back in training mode with its
    own weight storage (the CPU decode swaps in input-major copies), and the next call decodes as before."""
    import lightning_llm.nn.generation as generation

    model = model_for("rope", seed=6).train()
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    expected = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert model.training

    def fails_at_step_3(responses: torch.Tensor, finished: torch.Tensor) -> list[bool]:
        if responses.shape[1] == 3:
            raise KeyError("stop failed")
        return [False] * len(PROMPTS)

    with pytest.raises(KeyError, match="stop failed"):
        generate(model, PROMPTS, max_new_tokens=6, temperature=0, stop=fails_at_step_3)
    assert model.training
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    assert model in generation._cache_pool  # the preallocated cache went back to the pool
    again = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    assert torch.equal(again.sequences, expected.sequences)


def test_greedy_logprobs_match_forward() -> None:
    model = model_for("learned", seed=5)
    out = generate(model, PROMPTS[:2], max_new_tokens=5, temperature=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=out.attention_mask).float()
    p = out.prompt_length
    logp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, out.responses[..., None]).squeeze(-1)  # (B, N)
    torch.testing.assert_close(out.logprobs, logp, atol=1e-5, rtol=1e-4)


def test_seeded_sampling_reproducible_and_logprobs() -> None:
    model = model_for("rope", seed=6)
    kwargs = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(123), **kwargs)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(123), **kwargs)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(321), **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    # logprobs: log-softmax of logits / temperature (before filtering), from a full forward of the final sequences
    with torch.no_grad():
        logits = model(a.sequences, attention_mask=a.attention_mask).float() / 0.8
    p = a.prompt_length
    logp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, a.responses[..., None]).squeeze(-1)
    torch.testing.assert_close(a.logprobs, logp, atol=1e-5, rtol=1e-4)
    # every sampled token survived top-k: it is among the 20 largest logits at its step
    topk = logits[:, p - 1 : -1].topk(20, dim=-1).indices
    assert (topk == a.responses[..., None]).any(-1).all()


def test_generation_under_bf16_autocast() -> None:
    """A float32 model under bf16 autocast: the float32 cache is read back in the query's dtype."""
    model = model_for("rope", seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, max_new_tokens=4, temperature=0)
    assert out.sequences.shape == (4, 7 + 4)


def test_generate_bad_input() -> None:
    model = model_for("learned")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, PROMPTS, max_new_tokens=45)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[1, 2], []])


# ------------------------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(top_p=0.0), "top_p"),  # used to sample from the full distribution silently
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=True), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
    ],
)
def test_generate_rejects_bad_sampling_settings(kwargs: dict, name: str) -> None:
    model = model_for("rope")
    with pytest.raises(ValueError, match=rf"`{name}` must be .*received .*Fix: "):
        generate(model, PROMPTS, **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs,name", [(dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")])
def test_filter_logits_rejects_bad_settings(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"`{name}` must be"):
        filter_logits(torch.zeros(1, 5), **kwargs)


def test_sampling_settings_that_mean_off() -> None:
    """``top_k`` 0/None and ``top_p`` 1/None leave the logits untouched; the boundaries are accepted."""
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(top_k=0), dict(top_k=None), dict(top_p=1.0), dict(top_p=None), dict(top_k=11)):
        assert torch.equal(filter_logits(logits, **kwargs), logits)
    model = model_for("rope")
    a = generate(
        model,
        PROMPTS,
        max_new_tokens=3,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    b = generate(model, PROMPTS, max_new_tokens=3, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize(
    "prompts",
    [torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), []],
)
def test_empty_prompt_is_a_clear_error(prompts) -> None:
    """An empty ``(B, 0)`` tensor used to die in a reshape inside the model."""
    with pytest.raises(ValueError, match=r"`prompts` must be a non-empty .*received .*Fix: "):
        generate(model_for("rope"), prompts, max_new_tokens=2)


def test_prompt_mask_shape_checked() -> None:
    ids, _ = left_pad(PROMPTS, 0)
    with pytest.raises(ValueError, match="`prompt_mask` must have the shape"):
        generate(model_for("rope"), ids, max_new_tokens=2, prompt_mask=torch.ones(4, 3, dtype=torch.long))
