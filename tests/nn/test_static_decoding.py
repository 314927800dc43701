"""The fixed-shape decode step of ``generate``: static KV-cache writes, the three decoding paths against each other
and against Hugging Face, sampling semantics, the early-stop interval, and the compiled step.

References: full recomputation (``use_cache=False``), the growing-cache path (the model's own ``forward`` with
``kv_cache=``), ``transformers.LlamaForCausalLM.generate`` (greedy), and ``torch.multinomial`` /
``torch.log_softmax`` for the sampling semantics documented in :func:`lightning_llm.nn.generation.sample_next`.

Notation: B batch, G key/value heads, S_max cache capacity, D head dim, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

import lightning_llm.nn.generation as generation
from lightning_llm.config import TransformerConfig
from lightning_llm.nn import KVCache, Transformer, generate, sample_next

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19], [3]]


def model_for(pos: str = "rope", n_kv_head: int = 2, seed: int = 0, block_size: int = 48, **kw) -> Transformer:
    torch.manual_seed(seed)
    # a large init_std gives peaked next-token distributions (greedy near-ties would make exact comparisons flaky)
    cfg = TransformerConfig(
        vocab_size=53, block_size=block_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, pos_encoding=pos,
        init_std=0.3, **kw,
    )  # fmt: skip
    return Transformer(cfg).eval()


@pytest.fixture
def growing_cache(monkeypatch):
    """Force the growing-cache path (what sharded models and dynamic-NTK RoPE use)."""
    monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)


# ------------------------------------------------------------------------------------------------------ KVCache.write
def test_kv_cache_write_puts_one_slot_and_returns_the_whole_buffers() -> None:
    cache = KVCache(n_layer=2, batch_size=2, n_kv_head=3, max_length=6, head_dim=4)
    k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    full_k, full_v = cache.write(1, k, v, torch.tensor([4]))
    assert full_k.shape == full_v.shape == (2, 3, 6, 4)  # every slot, whatever has been written
    assert full_k.data_ptr() == cache.k[1].data_ptr()  # the preallocated buffer itself, no copy
    assert torch.equal(cache.k[1][:, :, 4:5], k) and torch.equal(cache.v[1][:, :, 4:5], v)
    others = torch.ones(6, dtype=torch.bool)
    others[4] = False
    assert not cache.k[1][:, :, others].any() and not cache.k[0].any()  # nothing else written
    assert cache.length == 0  # the static path never advances the growing counter


def test_kv_cache_write_casts_to_the_cache_dtype() -> None:
    cache = KVCache(n_layer=1, batch_size=1, n_kv_head=1, max_length=2, head_dim=2, dtype=torch.float32)
    k = torch.tensor([[[[1.5, -2.25]]]], dtype=torch.bfloat16)
    cache.write(0, k, k, torch.tensor([1]))
    assert cache.k[0].dtype == torch.float32 and cache.k[0][0, 0, 1].tolist() == [1.5, -2.25]


# ------------------------------------------------------------------------------------------------------ decoding paths
@pytest.mark.parametrize("pos", ["rope", "alibi", "learned", "sinusoidal"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_static_path_equals_growing_cache_and_recompute(pos: str, n_kv_head: int, monkeypatch) -> None:
    """Left-padded prompts of four lengths: the static step, the growing cache and full recomputation agree on the
    greedy tokens, and their log-probabilities match to float32 rounding."""
    model = model_for(pos, n_kv_head, seed=n_kv_head)
    assert generation.static_decoding_supported(model)
    static = generate(model, PROMPTS, max_new_tokens=9, temperature=0)
    recompute = generate(model, PROMPTS, max_new_tokens=9, temperature=0, use_cache=False)
    monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)
    growing = generate(model, PROMPTS, max_new_tokens=9, temperature=0)
    assert torch.equal(static.sequences, growing.sequences) and torch.equal(static.sequences, recompute.sequences)
    torch.testing.assert_close(static.logprobs, growing.logprobs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(static.logprobs, recompute.logprobs, atol=1e-5, rtol=1e-4)


def test_static_path_sampling_equals_growing_cache_draws(monkeypatch) -> None:
    """Sampling consumes the generator identically on both paths: the same seed draws the same tokens."""
    model = model_for("rope", seed=3)
    kw = dict(max_new_tokens=8, temperature=0.9, eos_id=4, pad_id=0)
    static = generate(model, PROMPTS, generator=torch.Generator().manual_seed(11), **kw)
    monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)
    growing = generate(model, PROMPTS, generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(static.sequences, growing.sequences)
    assert torch.equal(static.response_mask, growing.response_mask)
    torch.testing.assert_close(static.logprobs, growing.logprobs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("static", [True, False])
def test_repeated_prompts_run_the_prefill_once(static: bool, monkeypatch) -> None:
    """Prompts drawn several times (GRPO / RLOO completions) run through the prefill once each: its forward sees the
    2 distinct prompts of 6 rows, and every row decodes exactly as when each prompt runs alone (full recomputation,
    the reference) and as the plain prefill of all 6 rows, greedy and sampled (the same seed, the same draws)."""
    model = model_for("alibi" if static else "rope", seed=21)
    if not static:
        monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    rows = []
    hook = model.wte.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    greedy = generate(model, prompts, max_new_tokens=6, temperature=0)
    hook.remove()
    assert rows[0] == 2 and rows[1:] == [6] * 5  # the prefill of 2 distinct prompts, then 5 steps of every row
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=6, temperature=0, use_cache=False)
        assert torch.equal(greedy.responses[i], alone.responses[0])
        torch.testing.assert_close(greedy.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=1e-4)
    kw = dict(max_new_tokens=6, temperature=1.0, eos_id=4)
    sampled = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(  # the reference: every row through the prefill
        generation,
        "prefill",
        lambda m, ids, mask, cache, **_: m(ids, attention_mask=mask, kv_cache=cache, return_hidden=True)[:, -1],
    )
    plain = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(sampled.sequences, plain.sequences) and torch.equal(sampled.response_mask, plain.response_mask)
    torch.testing.assert_close(sampled.logprobs, plain.logprobs, atol=1e-5, rtol=1e-4)


def _shared_start_prompts(seed: int) -> list[list[int]]:
    """Four prompts that begin with the same 30 tokens (few-shot examples, a system prompt), then 3, 7, 1 and 12
    tokens of their own (left padding 9, 5, 11 and 0 in a batch)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, 53, (30,), generator=g).tolist()
    return [start + torch.randint(1, 53, (n,), generator=g).tolist() for n in (3, 7, 1, 12)]


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned", "sinusoidal"])
def test_a_shared_beginning_runs_through_the_prefill_once(pos: str, monkeypatch) -> None:
    """Prompts that start with the same 30 tokens: the prefill runs those once as one row, then every row from
    column 30 on (the first where the unpadded longest prompt leaves them; 4 x 12 positions instead of 4 x 42); every
    row decodes as full recomputation does, and seeded sampling draws what the plain prefill draws."""
    model = model_for(pos, seed=22, block_size=96)
    prompts = _shared_start_prompts(23)
    shapes = []
    hook = model.wte.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    out = generate(model, prompts, max_new_tokens=6, temperature=0)
    hook.remove()
    assert shapes[:2] == [(1, 30), (4, 12)] and shapes[2:] == [(4, 1)] * 5
    ref = generate(model, prompts, max_new_tokens=6, temperature=0, use_cache=False)
    assert torch.equal(out.sequences, ref.sequences) and out.prompt_length == 42
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-4)
    kw = dict(max_new_tokens=6, temperature=1.0, eos_id=4)
    sampled = generate(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN_TOKENS", 10**9)  # the reference: no sharing
    plain = generate(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(sampled.sequences, plain.sequences)
    torch.testing.assert_close(sampled.logprobs, plain.logprobs, atol=1e-5, rtol=1e-4)


def test_shared_beginnings_when_they_pay_and_the_layout_allows(monkeypatch) -> None:
    """Repeated prompts are first reduced to the distinct ones, which may then share their beginning; rows that do not
    share it run apart (each part into its own cache, joined after); a short shared beginning (below
    SHARED_PREFIX_MIN_TOKENS spared positions), a mask that is not left padding and the growing cache (sharded
    models, dynamic-NTK RoPE: the same number of forward calls on every rank) keep one forward. Every case decodes as
    full recomputation does."""
    model = model_for("rope", seed=24, block_size=96)
    a, b, c, d = _shared_start_prompts(25)

    def prefill_shapes(prompts, **kw) -> list[tuple[int, int]]:
        shapes = []
        hook = model.wte.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
        out = generate(model, prompts, max_new_tokens=2, temperature=0, **kw)
        hook.remove()
        ref = generate(model, prompts, max_new_tokens=2, temperature=0, use_cache=False, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        return shapes[:-1]  # the last shape is the one decoding step

    assert prefill_shapes([a, b, a, d, c, b]) == [(1, 30), (4, 12)]  # 4 distinct prompts, then their shared start
    e, f = (p[::-1] for p in _shared_start_prompts(26)[2:])  # two rows that start otherwise (their 30 shared tokens
    # now end them: nothing shared at the start)
    assert prefill_shapes([a, e, b, c, f, d]) == [(1, 30), (4, 12), (2, 42)]  # the 4 sharing rows apart, then the 2
    assert prefill_shapes([a[25:], b[25:], d[25:]]) == [(3, 17)]  # 5 shared tokens: 3 x 5 - 5 spared, too few
    ids, mask = generation.left_pad([a, b, d], 0)
    mask[0, 20] = 0  # a hole inside a prompt: not left padding
    assert prefill_shapes(ids, prompt_mask=mask) == [(3, 42)]
    monkeypatch.setattr(generation, "static_decoding_supported", lambda model: False)
    assert prefill_shapes([a, b, d]) == [(3, 42)]


def test_dynamic_ntk_rope_takes_the_growing_cache() -> None:
    """Dynamic NTK changes the RoPE base with the sequence length: not a fixed-shape step; still exact."""
    model = model_for("rope", seed=4, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert not generation.static_decoding_supported(model)
    out = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    ref = generate(model, PROMPTS, max_new_tokens=6, temperature=0, use_cache=False)
    assert torch.equal(out.sequences, ref.sequences)


def test_static_greedy_equals_hf_generate() -> None:
    """The decode step against Hugging Face's greedy ``generate`` on the same Llama weights, left padding included."""
    transformers = pytest.importorskip("transformers")
    from lightning_llm.hf import from_hf

    cfg = transformers.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked distributions: no greedy near-ties between the two implementations
        for p in hf.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    ours = from_hf(hf).eval()
    ids, mask = generation.left_pad(PROMPTS, 0)
    out = generate(ours, PROMPTS, max_new_tokens=10, temperature=0, pad_id=0)
    ref = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(out.sequences, ref)


# ------------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_next_is_multinomial_of_the_tempered_softmax(temperature: float) -> None:
    """Without top-k / top-p, a draw is ``torch.multinomial(softmax(logits / T), 1)`` with the same generator, and
    the log-probability is ``log_softmax(logits / T)`` at the token (the definitions in the docstring)."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    token, logprob = sample_next(logits, temperature, generator=torch.Generator().manual_seed(5))
    expected = torch.multinomial((logits / temperature).softmax(-1), 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(token, expected.squeeze(-1))
    ref = torch.log_softmax(logits.double() / temperature, -1).gather(-1, token[:, None]).squeeze(-1)
    torch.testing.assert_close(logprob.double(), ref, atol=1e-6, rtol=1e-6)
    assert logprob.dtype == torch.float32


def test_sample_next_with_filters_draws_only_kept_tokens_and_reports_unfiltered_logprob() -> None:
    logits = torch.randn(200, 30, generator=torch.Generator().manual_seed(1)) * 2
    token, logprob = sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(2))
    assert (logits.topk(3, dim=-1).indices == token[:, None]).any(-1).all()
    ref = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)  # before filtering (PPO's quantity)
    torch.testing.assert_close(logprob, ref)


# ------------------------------------------------------------------------------------------------------ early stop
def test_finished_check_interval_changes_work_not_result(monkeypatch) -> None:
    """Reading the all-finished flag every 3 steps instead of every step: the same (cut) output."""
    model = model_for("rope", seed=5)
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    eos = int(free.responses[0, 1])  # some rows stop early; the others may run on
    every_step = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos, pad_id=52)
    monkeypatch.setattr(generation, "finished_check_interval", lambda device: 3)
    every_third = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos, pad_id=52)
    for field in ("sequences", "attention_mask", "response_mask", "logprobs", "finished"):
        assert torch.equal(getattr(every_step, field), getattr(every_third, field)), field
    # a single prompt whose only row stops at step 2: both cut the output there
    one = generate(model, [PROMPTS[0]], max_new_tokens=12, temperature=0, eos_id=eos)
    stop = free.responses[0].tolist().index(eos) + 1
    assert one.responses.shape[1] == stop and one.finished.all()
    monkeypatch.setattr(generation, "finished_check_interval", lambda device: 1)
    assert generate(model, [PROMPTS[0]], max_new_tokens=12, temperature=0, eos_id=eos).responses.shape[1] == stop


def test_outputs_are_contiguous_and_sized() -> None:
    model = model_for("alibi", seed=6)
    out = generate(model, PROMPTS, max_new_tokens=5, temperature=0.8, generator=torch.Generator().manual_seed(0))
    for t in (out.sequences, out.attention_mask, out.response_mask, out.logprobs):
        assert t.is_contiguous() and t.shape[0] == len(PROMPTS)
    assert out.sequences.shape[1] == out.prompt_length + 5 and out.logprobs.shape == (4, 5)


# ------------------------------------------------------------------------------------------------------ compiled
def _compiled_matches_eager(pos: str, n_kv_head: int) -> None:
    model = model_for(pos, n_kv_head, seed=7)
    eager = generate(model, PROMPTS, max_new_tokens=7, temperature=0)
    compiled = generate(model, PROMPTS, max_new_tokens=7, temperature=0, compile=True)
    assert generation._compile_error is None, generation._compile_error
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=1e-4)
    # another prompt width inside the same capacity bucket reuses the graph and stays exact
    again = generate(model, PROMPTS[:3], max_new_tokens=7, temperature=0, compile=True)
    assert torch.equal(again.sequences, generate(model, PROMPTS[:3], max_new_tokens=7, temperature=0).sequences)


def test_compiled_decode_step_traces_in_one_graph(monkeypatch) -> None:
    """The fast sibling of the Inductor tests: Dynamo traces the step with ``fullgraph=True`` (a graph break would
    raise) and AOTAutograd functionalises its in-place cache writes (backend ``aot_eager``: no C++ build)."""
    monkeypatch.setattr(generation, "_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(generation, "_compiled_steps", {})
    torch._dynamo.reset()
    _compiled_matches_eager("rope", 2)
    torch._dynamo.reset()


def test_compiled_step_is_one_graph_for_every_prompt_width_and_length(monkeypatch) -> None:
    """The cache capacity and the slots read are the compiled step's dynamic sizes: calls with other prompt widths and
    generation lengths (other capacities, other numbers of written slots at every step) reuse the first call's graph
    and give full recomputation's tokens. Before, each capacity compiled a graph of its own (10-30 s with Inductor)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(generation, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(generation, "_compiled_steps", {})
    monkeypatch.setattr(generation, "_compile_error", None)
    torch._dynamo.reset()
    model = model_for("alibi", 2, seed=13)
    cases = ((PROMPTS, 7), ([[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]], 3), ([p * 3 for p in PROMPTS], 12))
    for prompts, n in cases:
        out = generate(model, prompts, max_new_tokens=n, temperature=0, compile=True)
        ref = generate(model, prompts, max_new_tokens=n, temperature=0, use_cache=False)
        assert generation._compile_error is None, generation._compile_error
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("pos,n_kv_head", [("rope", 2), ("alibi", 1), ("learned", 4), ("sinusoidal", 2)])
def test_compiled_decode_step_matches_eager(pos: str, n_kv_head: int, monkeypatch) -> None:
    """``compile=True`` with Inductor (15-30 s of compilation per case on one core): the same greedy tokens."""
    monkeypatch.setattr(generation, "_compiled_steps", {})
    _compiled_matches_eager(pos, n_kv_head)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(generation, "_compiled_steps", {"cpu": broken})
    monkeypatch.setattr(generation, "_compile_error", None)
    model = model_for("rope", seed=8)
    with pytest.warns(RuntimeWarning, match="compile of the decode step failed .*no C\\+\\+ compiler"):
        out = generate(model, PROMPTS, max_new_tokens=4, temperature=0, compile=True)
    assert torch.equal(out.sequences, generate(model, PROMPTS, max_new_tokens=4, temperature=0).sequences)
    assert generation._compile_error is not None  # later calls decode eagerly without trying again


def test_tokens_only_generation_skips_the_logprobs() -> None:
    """``return_logprobs=False`` gives the same tokens and masks (greedy and seeded sampling) and no log-probabilities;
    a non-bool is refused with the fix."""
    model = model_for("rope", seed=14)
    for kw in ({"temperature": 0}, {"temperature": 0.8}):
        full = generate(model, PROMPTS, max_new_tokens=6, eos_id=4, generator=torch.Generator().manual_seed(1), **kw)
        tokens = generate(
            model, PROMPTS, max_new_tokens=6, eos_id=4, generator=torch.Generator().manual_seed(1),
            return_logprobs=False, **kw,
        )  # fmt: skip
        assert tokens.logprobs is None and full.logprobs is not None
        assert torch.equal(tokens.sequences, full.sequences)
        assert torch.equal(tokens.response_mask, full.response_mask) and torch.equal(tokens.finished, full.finished)
    with pytest.raises(TypeError, match=r"`return_logprobs` must be a bool, received 1\. Fix: "):
        generate(model, PROMPTS, max_new_tokens=2, return_logprobs=1)


def test_compile_argument_is_checked() -> None:
    with pytest.raises(TypeError, match=r"`compile` must be a bool, received 'yes'\. Fix: "):
        generate(model_for("rope"), PROMPTS, max_new_tokens=2, compile="yes")


# ------------------------------------------------------------------------------------------------------ weights, cache
def test_linear_weights_are_restored_after_decoding_even_on_error() -> None:
    """Decoding on the CPU swaps each ``nn.Linear`` weight's storage for an input-major copy of the same values; the
    original storage, strides and values are back afterwards, also when a step raises."""
    model = model_for("rope", seed=9)
    before = {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()}
    seen = []
    hook = model.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.stride()))
    generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    hook.remove()
    assert (1, 32) in seen  # the decode steps ran on the input-major layout (q_proj is (32, 32): strides (1, 32))
    for n, p in model.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[n][:2] and torch.equal(p, before[n][2]), n

    def boom(module, args, output):
        if args[0].shape[1] == 1:  # a decode step, after the prefill
            raise RuntimeError("step failed")

    hook = model.blocks[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="step failed"):
        generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    hook.remove()
    for n, p in model.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[n][:2] and torch.equal(p, before[n][2]), n


def test_reused_cache_gives_the_same_tokens() -> None:
    """The CPU cache pool hands the previous call's buffers to the next call of the same shapes, zeroed: outputs
    equal full recomputation whichever prompts came before."""
    model = model_for("alibi", seed=10)
    generation._cache_pool.clear()
    first = generate(model, PROMPTS, max_new_tokens=5, temperature=0.9, generator=torch.Generator().manual_seed(0))
    cache = generation._cache_pool[model][1]
    other = [[7, 8], [9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]  # same batch and width, other padding
    out = generate(model, other, max_new_tokens=5, temperature=0)
    assert generation._cache_pool[model][1] is cache  # reused, not reallocated
    assert torch.equal(
        out.sequences, generate(model, other, max_new_tokens=5, temperature=0, use_cache=False).sequences
    )
    assert first.sequences.shape == out.sequences.shape


def test_eager_steps_read_only_the_written_cache_slots(monkeypatch) -> None:
    """The eager decode step attends over the slots written so far, not the whole preallocated cache: a cache whose
    unwritten slots hold NaN (instead of the zeros a fresh or reused cache holds) still gives the tokens and
    log-probabilities of full recomputation. Reading a NaN slot, even masked, would poison the output (0 x NaN)."""
    model = model_for("alibi", seed=11)
    fresh = generation._static_cache

    def poisoned(model, batch, capacity):
        cache = fresh(model, batch, capacity)
        for t in (*cache.k, *cache.v):
            t.fill_(float("nan"))
        return cache

    monkeypatch.setattr(generation, "_static_cache", poisoned)
    out = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    ref = generate(model, PROMPTS, max_new_tokens=6, temperature=0, use_cache=False)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_tied_output_projection_decodes_from_an_input_major_copy(monkeypatch) -> None:
    """With tied embeddings the projection reads an input-major copy of ``wte.weight`` (same values; the embedding
    itself keeps its row-major storage for the lookups), and the tokens equal full recomputation."""
    model = model_for("rope", seed=12, tie_embeddings=True)
    before = (model.wte.weight.data_ptr(), model.wte.weight.stride())
    strides = []
    logits = Transformer.logits

    def spy(self, hidden, weight=None):
        strides.append((weight if weight is not None else self.output_weight).stride())
        return logits(self, hidden, weight)

    monkeypatch.setattr(Transformer, "logits", spy)
    out = generate(model, PROMPTS, max_new_tokens=4, temperature=0)
    assert strides[0] == (1, 53) and set(strides) == {(1, 53)}  # (V, C) = (53, 32) stored input-major
    assert (model.wte.weight.data_ptr(), model.wte.weight.stride()) == before
    monkeypatch.setattr(Transformer, "logits", logits)
    ref = generate(model, PROMPTS, max_new_tokens=4, temperature=0, use_cache=False)
    assert torch.equal(out.sequences, ref.sequences)
