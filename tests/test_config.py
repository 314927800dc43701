"""TransformerConfig: bad input gets errors that name the argument and the fix; parameter counts match real models."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.nn import Transformer


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32), **kw})


# ------------------------------------------------------------------------------------------------------ bad input
def test_heads_must_divide_width() -> None:
    with pytest.raises(ValueError, match=r"n_head \(5\) must divide n_embd \(32\)") as err:
        tiny(n_head=5)
    assert "head_dim" in str(err.value)  # the fix: a divisor, or an explicit head_dim
    assert tiny(n_head=5, head_dim=8).head_dim == 8  # an explicit head_dim lifts the constraint


def test_kv_heads_must_divide_heads() -> None:
    with pytest.raises(ValueError, match=r"n_kv_head \(3\) must divide n_head \(4\)") as err:
        tiny(n_kv_head=3)
    assert "multi-query" in str(err.value)
    for ok in (1, 2, 4):
        assert tiny(n_kv_head=ok).n_kv_head == ok


def test_odd_rotary_dimension() -> None:
    # head_dim 8 * 0.375 = 3 rotated dims: odd, cannot be split into pairs
    with pytest.raises(ValueError, match="rotary dimension") as err:
        tiny(partial_rotary_factor=0.375)
    assert "partial_rotary_factor" in str(err.value) and "head_dim" in str(err.value)
    with pytest.raises(ValueError, match="rotary dimension"):
        tiny(n_head=1, n_embd=7, head_dim=7)
    tiny(pos_encoding="alibi", partial_rotary_factor=0.375)  # irrelevant without rope


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_embd=32.0), "n_embd"),
        (dict(block_size=True), "block_size"),
        (dict(pos_encoding="xpos"), "pos_encoding"),
        (dict(rope_layout="gptj"), "rope_layout"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(attention_backend="flash"), "attention_backend"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(dropout=1.0), "dropout"),
        (dict(padded_vocab_size=16), "padded_vocab_size"),
        (dict(rope_scaling={"type": "ntk"}), "rope_scaling"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor"),
    ],
)
def test_invalid_fields_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        tiny(**kwargs)


def test_sequence_longer_than_learned_table() -> None:
    model = Transformer(tiny(pos_encoding="learned"))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size=16") as err:
        model(torch.zeros(1, 17, dtype=torch.long))
    assert "learned position" in str(err.value)


def test_token_ids_outside_vocabulary() -> None:
    model = Transformer(tiny())
    for bad in (32, -1):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=32\)") as err:
            model(ids)
        assert "tokenizer" in str(err.value)
    # ids in the padded part of the table are still outside the real vocabulary
    with pytest.raises(ValueError, match="vocab_size=32"):
        Transformer(tiny(padded_vocab_size=64))(torch.tensor([[40]]))


def test_unknown_config_key() -> None:
    with pytest.raises(ValueError, match=r"Unknown TransformerConfig key\(s\) \['n_heads'\]") as err:
        TransformerConfig.from_dict({"n_heads": 4, "n_embd": 32})
    assert "n_head" in str(err.value)  # the valid keys are listed
    with pytest.raises(TypeError):
        TransformerConfig(n_heads=4)  # the dataclass constructor refuses it too


def test_round_trip_through_dict() -> None:
    cfg = tiny(n_kv_head=2, rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8})
    again = TransformerConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.rope_scaling["type"] == "yarn" and "rope_type" not in again.rope_scaling
    assert tiny(rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_derived_fields() -> None:
    cfg = tiny()
    assert (cfg.head_dim, cfg.n_kv_head, cfg.padded_vocab_size, cfg.rope_dim) == (8, 4, 32, 8)
    assert tiny(mlp="gelu").intermediate_size == 128  # 4 * C
    # SwiGLU: 8/3 * C rounded up to a multiple of 64 (Llama): 8 * 96 / 3 = 256
    assert tiny(n_embd=96).intermediate_size == 256
    assert tiny(n_embd=100, n_head=5).intermediate_size == 320  # int(266.7) = 266 -> 320


# ------------------------------------------------------------------------------------------------------ counting
VARIANTS = list(
    itertools.product(
        [False, True],  # tie_embeddings
        [False, True],  # bias
        ["swiglu", "gelu"],
        ["rmsnorm", "layernorm"],
    )
)


@pytest.mark.parametrize("tie,bias,mlp,norm", VARIANTS)
def test_num_parameters_matches_built_model(tie: bool, bias: bool, mlp: str, norm: str) -> None:
    cfg = TransformerConfig(
        vocab_size=37,
        padded_vocab_size=40,
        block_size=12,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=16,
        tie_embeddings=tie,
        bias=bias,
        mlp=mlp,
        norm=norm,
        pos_encoding="learned",
    )
    with torch.device("meta"):  # counting needs no memory
        model = Transformer(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert cfg.num_parameters(non_embedding=False) == real
    assert model.num_parameters() == real
    tables = model.wte.weight.numel() + model.wpe.weight.numel()
    assert cfg.num_parameters(non_embedding=True) == real - tables


@pytest.mark.parametrize(
    "extra",
    [
        dict(lm_head_bias=True),
        dict(embedding_norm=True, norm="layernorm", bias=True, mlp="gelu"),  # BLOOM-like
        dict(parallel_residual=True),  # GPT-NeoX-like
        dict(parallel_residual=True, shared_attention_norm=True),  # GPT-J-like
        dict(head_dim=12, n_kv_head=1, intermediate_size=50),
    ],
)
def test_num_parameters_other_layouts(extra: dict) -> None:
    cfg = tiny(n_layer=3, **extra)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.num_parameters(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_formula() -> None:
    """6 N + 12 L H Q T with N counting the (tied) output projection (REFERENCES.md)."""
    cfg = tiny(n_layer=2, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the shared table is counted once, as the output head
    assert cfg.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16


@pytest.mark.parametrize(
    "bad, field, received",
    [
        ({"n_head": 5}, "n_head", "5"),
        ({"n_embd": 0}, "n_embd", "0"),
        ({"vocab_size": "32"}, "vocab_size", "'32'"),
        ({"n_kv_head": 3}, "n_kv_head", "3"),
        ({"pos_encoding": "rotary"}, "pos_encoding", "'rotary'"),
        ({"norm": "batchnorm"}, "norm", "'batchnorm'"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor", "0.0"),
        ({"pos_encoding": "sinusoidal", "n_embd": 15, "n_head": 5}, "n_embd", "15"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling", "0.5"),
        ({"dropout": 1.0}, "dropout", "1.0"),
        ({"padded_vocab_size": 16}, "padded_vocab_size", "16"),
    ],
)
def test_every_config_error_is_one_line_naming_field_value_and_fix(bad, field, received) -> None:
    """The CLI prints only the message's line: it must carry the field, the received value and what to do."""
    with pytest.raises(ValueError) as err:
        tiny(**bad)
    message = str(err.value)
    assert "\n" not in message
    assert f"TransformerConfig.{field}" in message
    assert received in message
    assert ";" in message or " or " in message  # a remedy follows the diagnosis
