"""to_hf / save_hf round trips, greedy-generation parity with HF ``generate``, and error messages.

Reference: ``transformers.LlamaForCausalLM`` (forward and ``generate(do_sample=False)``) and
``AutoModelForCausalLM.from_pretrained`` on a checkpoint written to a tmp dir (offline).
"""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.hf import from_hf, save_hf, to_hf
from lightning_llm.nn import Transformer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def _ours(scramble, **kwargs) -> Transformer:
    cfg = dict(
        vocab_size=128, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96, norm_eps=1e-5
    )
    cfg.update(kwargs)
    torch.manual_seed(0)
    return scramble(Transformer(TransformerConfig(**cfg)))


def test_round_trip_llama(tiny_llama, ids):
    hf = tiny_llama()
    back = to_hf(from_hf(hf))
    assert isinstance(back, transformers.LlamaForCausalLM) and not back.training
    with torch.no_grad():
        assert _max_diff(back(ids).logits, hf(ids).logits) <= ATOL


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"rope_layout": "interleaved"},  # permuted into HF's rotate_half layout
        {"bias": True, "tie_embeddings": True, "n_kv_head": 1, "padded_vocab_size": 192},
        {"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}},
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
        {"rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}},
    ],
    ids=["plain", "interleaved", "bias-tied-mqa-padded", "dynamic", "yarn", "llama3"],
)
def test_to_hf_of_our_model(scramble, ids, variant):
    model = _ours(scramble, **variant)
    hf = to_hf(model, attn_implementation="eager")
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model(ids)) <= ATOL


def test_save_hf_and_auto_from_pretrained(scramble, ids, tmp_path):
    model = _ours(scramble)
    out = save_hf(model, tmp_path / "ckpt")
    assert (out / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert _max_diff(loaded(ids).logits, model(ids)) <= ATOL
    again = from_hf(out)  # and back through our own loader
    with torch.no_grad():
        assert _max_diff(again(ids), model(ids)) <= ATOL


def test_save_hf_with_tokenizers_tokenizer(scramble, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(127)} | {"<eos>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = save_hf(_ours(scramble), tmp_path, tokenizer=tok, eos_token_id=127)
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded("t3 t5 <eos>")["input_ids"] == [3, 5, 127]
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == 127


def test_greedy_generation_matches_hf(tiny_llama):
    hf = tiny_llama(pad_token_id=0)
    model = from_hf(hf)
    prompt = [5, 17, 99, 3, 42]
    ours = model.generate([prompt], temperature=0, max_new_tokens=8)
    ref = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long), do_sample=False, max_new_tokens=8
    )
    assert torch.equal(ours.sequences, ref)
    # batched prompts of different lengths (left-padded by us; HF gets the same padded ids and mask)
    prompts = [[5, 17, 99, 3, 42], [7, 8], [100, 2, 3]]
    ours = model.generate(prompts, temperature=0, max_new_tokens=8, pad_id=0)
    p = ours.prompt_length
    ref = hf.generate(
        ours.sequences[:, :p], attention_mask=ours.attention_mask[:, :p], do_sample=False, max_new_tokens=8
    )
    assert torch.equal(ours.sequences, ref)
    # stop at EOS: take the 3rd greedy token of row 0 as EOS; both stop that row there and pad it afterwards
    eos = int(ours.sequences[0, p + 2])
    ours_eos = model.generate(prompts, temperature=0, max_new_tokens=8, pad_id=0, eos_id=eos)
    ref_eos = hf.generate(
        ours.sequences[:, :p],
        attention_mask=ours.attention_mask[:, :p],
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=0,
    )
    assert torch.equal(ours_eos.sequences, ref_eos)


# ------------------------------------------------------------------------------------------------------------- errors
def test_unsupported_architecture_error():
    cfg = transformers.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32
    )
    with pytest.raises(ValueError, match=r"OPTForCausalLM.*LlamaForCausalLM.*GPTNeoXForCausalLM.*BloomForCausalLM"):
        from_hf(transformers.OPTForCausalLM(cfg))
    with pytest.raises(ValueError, match="LlamaModel"):  # a base model without the LM head
        from_hf(
            transformers.LlamaModel(
                transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
            )
        )
    with pytest.raises(TypeError, match="hf_model_or_path"):
        from_hf(42)


def test_unsupported_options_errors(tiny_llama):
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 32,
    }
    hf = tiny_llama(rope_scaling=longrope)
    with pytest.raises(ValueError, match="longrope.*'linear', 'dynamic', 'yarn', 'llama3'"):
        from_hf(hf)
    bloom = transformers.BloomConfig(
        vocab_size=64, hidden_size=32, n_layer=1, n_head=2, apply_residual_connection_post_layernorm=True
    )
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        from_hf(transformers.BloomForCausalLM(bloom))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pos_encoding": "sinusoidal"}, "pos_encoding='sinusoidal'"),
        ({"norm": "layernorm", "mlp": "swiglu"}, "llama: norm='layernorm'.*gpt_neox:.*mlp='swiglu'"),
        ({"pos_encoding": "alibi"}, "bloom:.*embedding_norm=False"),
        ({"parallel_residual": True, "n_kv_head": 1}, "gpt_neox: n_kv_head=1"),
    ],
)
def test_to_hf_rejects_unrepresentable_configs(kwargs, match):
    model = Transformer(TransformerConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, **kwargs))
    with pytest.raises(ValueError, match=f"matches no architecture Hugging Face can load.*{match}"):
        to_hf(model)
    with pytest.raises(TypeError, match="lightning_llm.nn.Transformer"):
        to_hf(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ GPT-NeoX, BLOOM, GPT-2 out
_SHAPES = {
    "neox-parallel-partial": dict(
        norm="layernorm",
        mlp="gelu",
        bias=True,
        parallel_residual=True,
        partial_rotary_factor=0.25,
        intermediate_size=128,
    ),
    "neox-seq-interleaved-nobias": dict(
        norm="layernorm",
        mlp="gelu",
        gelu_approximate="tanh",
        rope_layout="interleaved",
        partial_rotary_factor=0.5,
        tie_embeddings=True,
        intermediate_size=128,
    ),
    "bloom": dict(
        pos_encoding="alibi",
        norm="layernorm",
        mlp="gelu",
        gelu_approximate="tanh",
        bias=True,
        embedding_norm=True,
        tie_embeddings=True,
        intermediate_size=256,
    ),
    "bloom-6-heads-untied": dict(
        pos_encoding="alibi",
        norm="layernorm",
        mlp="gelu",
        gelu_approximate="tanh",
        bias=True,
        embedding_norm=True,
        n_head=6,
        n_embd=48,
        intermediate_size=192,
    ),
    "gpt2": dict(
        pos_encoding="learned",
        norm="layernorm",
        mlp="gelu",
        gelu_approximate="tanh",
        bias=True,
        tie_embeddings=True,
        intermediate_size=256,
    ),
    "gpt2-exact-gelu-untied": dict(
        pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, intermediate_size=100
    ),
}
_CLASSES = {"neox": "GPTNeoXForCausalLM", "bloom": "BloomForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("shape", list(_SHAPES))
def test_export_neox_bloom_gpt2(scramble, ids, tmp_path, shape):
    from lightning_llm.data.synthetic import char_tokenizer

    model = _ours(scramble, n_kv_head=None, **_SHAPES[shape])
    hf = to_hf(model, attn_implementation="eager").eval()
    assert type(hf).__name__ == _CLASSES[shape.split("-")[0]]
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model(ids)) <= ATOL
    back = from_hf(hf)
    if "nobias" not in shape and "interleaved" not in shape:  # canonical shapes: the round trip is exact
        assert back.config == model.config
        ours, theirs = model.state_dict(), back.state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert _max_diff(back(ids), model(ids)) <= ATOL
    tok = char_tokenizer(chars="abcdefgh ")
    out = save_hf(model, tmp_path / shape, tokenizer=tok)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert _max_diff(loaded(ids).logits, model(ids)) <= ATOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True)
    assert text == "user: abc\nassistant: "  # our default template travels with the tokenizer


def test_round_trip_of_llama_shapes_is_exact(scramble):
    model = _ours(scramble, bias=True, tie_embeddings=True)
    back = from_hf(to_hf(model))
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_transformers_gives_install_hint(monkeypatch):
    model = Transformer(TransformerConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install lightning-llm\[hf\]"):
        to_hf(model)
