"""from_hf parity: our Transformer's logits equal Hugging Face's (float32, max abs diff <= 1e-4).

Reference: the ``transformers`` implementations themselves (eager attention where available), on tiny random
configs built here. Weights are re-drawn with std 0.2 (see conftest) so that the checks have power: each RoPE
scaling test also shows that ignoring the scaling would move the logits by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.hf import config_from_hf, from_hf
from lightning_llm.nn import Transformer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return (ours.float() - ref.float()).abs().max().item()


def _parity(hf, ids, **kwargs) -> Transformer:
    model = from_hf(hf, **kwargs)
    with torch.no_grad():
        diff = _max_diff(model(ids), hf(ids).logits)
    assert diff <= ATOL, diff
    return model


# ------------------------------------------------------------------------------------------------------------- Llama
def test_llama_gqa_parity(tiny_llama, ids):
    hf = tiny_llama()
    model = _parity(hf, ids)
    cfg = model.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (4, 2, 16)
    assert cfg.pos_encoding == "rope" and cfg.rope_layout == "half" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    assert model.lm_head is not None and not cfg.bias
    # the copies share no storage with the HF model
    assert model.wte.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()


def test_llama_eager_backend_and_tied_bias_variant(tiny_llama, ids):
    # tied embeddings; attention biases but no MLP biases -> bias=True with zero MLP biases (exact)
    hf = tiny_llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=False, num_key_value_heads=1)
    model = _parity(hf, ids, attention_backend="eager")
    assert model.lm_head is None and model.config.tie_embeddings and model.config.n_kv_head == 1
    assert model.config.attention_backend == "eager"
    assert torch.count_nonzero(model.blocks[0].mlp.up_proj.bias) == 0


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        # dynamic: the sequence (24) is longer than max_position_embeddings (16), so the NTK base actually grows
        {"rope_type": "dynamic", "factor": 2.0},
        # HF's dynamic NTK ignores a stray original_max_position_embeddings (it grows past max_position_embeddings)
        {"rope_type": "dynamic", "factor": 3.0, "original_max_position_embeddings": 8},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ],
    ids=["linear", "dynamic", "dynamic-stray-original", "yarn", "llama3"],
)
def test_llama_rope_scaling_parity(tiny_llama, ids, scaling):
    max_pos = 16 if scaling["rope_type"] == "dynamic" else 32  # yarn: factor * original = 32 (no HF warning)
    hf = tiny_llama(rope_scaling=dict(scaling), max_position_embeddings=max_pos)
    model = _parity(hf, ids)
    assert model.config.rope_scaling["type"] == scaling["rope_type"]
    # power check: the same weights without scaling give clearly different logits
    plain = tiny_llama(max_position_embeddings=max_pos)
    plain.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert _max_diff(plain(ids).logits, hf(ids).logits) > 100 * ATOL


def test_llama_left_padded_batch(tiny_llama):
    hf = tiny_llama()
    model = from_hf(hf)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert _max_diff(ours[real], ref[real]) <= ATOL


def test_from_hf_local_path_and_dtype(tiny_llama, ids, tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)  # the real loading path: AutoModelForCausalLM.from_pretrained on a local dir
    model = from_hf(tmp_path)
    with torch.no_grad():
        assert _max_diff(model(ids), hf(ids).logits) <= ATOL
    model64 = from_hf(hf, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model64.parameters())
    assert not model64.training  # mirrors the HF model's eval mode


# ------------------------------------------------------------------------------------------------------------- NeoX
@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_parity(scramble, ids, parallel):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.25,  # 4.x spelling; 5.x moves it to rope_parameters['partial_rotary_factor']
        rotary_emb_base=10000,
        use_parallel_residual=parallel,
        attention_bias=parallel,  # also exercise attention_bias=False -> zero biases
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    model = _parity(scramble(transformers.GPTNeoXForCausalLM(cfg)), ids)
    c = model.config
    assert c.partial_rotary_factor == 0.25 and c.rope_dim == 4 and c.parallel_residual is parallel
    assert c.norm == "layernorm" and c.gelu_approximate == "none" and c.bias


# ------------------------------------------------------------------------------------------------------------- BLOOM
def test_bloom_parity_non_power_of_two_heads_left_padded(scramble):
    # 6 heads: slopes are the 4-head sequence followed by every other slope of the 8-head one (interleaved order)
    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=48, n_layer=2, n_head=6, layer_norm_epsilon=1e-5)
    hf = scramble(transformers.BloomForCausalLM(cfg))
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(4))
    model = _parity(hf, ids)
    assert model.config.pos_encoding == "alibi" and model.emb_norm is not None and model.lm_head is None
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert _max_diff(ours[real], ref[real]) <= ATOL


# ------------------------------------------------------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("scale_variant", [False, True])
def test_gpt2_parity(scramble, ids, scale_variant):
    kwargs = dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True) if scale_variant else {}
    cfg = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, attn_implementation="eager", **kwargs
    )
    model = _parity(scramble(transformers.GPT2LMHeadModel(cfg), std=0.1), ids)
    c = model.config
    assert c.pos_encoding == "learned" and c.block_size == 32 and c.gelu_approximate == "tanh" and c.tie_embeddings


# ------------------------------------------------------------------------------------------------------------- config
class _Config4x:
    """A transformers-4.x-style Llama config (rope_theta + rope_scaling with the old 'type' key), as a plain object."""

    model_type = "llama"
    vocab_size, hidden_size, intermediate_size = 100, 64, 96
    num_hidden_layers, num_attention_heads, num_key_value_heads = 2, 4, 2
    head_dim = None
    max_position_embeddings = 128
    rms_norm_eps = 1e-6
    hidden_act = "silu"
    rope_theta = 500000.0
    rope_scaling = {"type": "linear", "factor": 4.0}
    tie_word_embeddings = False


class _NeoX4x:
    model_type = "gpt_neox"
    vocab_size, hidden_size, intermediate_size = 100, 64, 256
    num_hidden_layers, num_attention_heads = 2, 4
    max_position_embeddings = 64
    rotary_pct, rotary_emb_base = 0.5, 1000
    rope_scaling = None
    layer_norm_eps = 1e-5
    hidden_act = "gelu_new"
    use_parallel_residual = False
    tie_word_embeddings = False


def test_config_from_transformers_4x_spellings():
    cfg = config_from_hf(_Config4x())
    assert isinstance(cfg, TransformerConfig)
    assert cfg.rope_base == 500000.0 and cfg.rope_scaling == {"type": "linear", "factor": 4.0}
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps, cfg.block_size) == (4, 2, 16, 1e-6, 128)
    neox = config_from_hf(_NeoX4x())
    assert neox.partial_rotary_factor == 0.5 and neox.rope_base == 1000.0 and neox.gelu_approximate == "tanh"
    assert not neox.parallel_residual and neox.rope_scaling is None


def test_config_from_transformers_5x_rope_parameters():
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": 16.0},
        rope_theta=1234.0,
    )
    cfg = config_from_hf(hf_cfg, block_size=256)
    assert cfg.rope_base == 1234.0 and cfg.block_size == 256
    # yarn's original length defaults to max_position_embeddings, as in HF's standardize_rope_params
    assert cfg.rope_scaling == {
        "type": "yarn",
        "factor": 2.0,
        "beta_fast": 16.0,
        "original_max_position_embeddings": 64,
    }
