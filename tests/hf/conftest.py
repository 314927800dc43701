"""Shared helpers for the Hugging Face interop tests (tiny random models, built offline in the tests)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _scramble(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so the comparison has power.

    The default init (std 0.02) makes attention nearly uniform and logits tiny, so a wrong RoPE scaling or a swapped
    q/k row would hide below 1e-4. With std 0.2 the logits have std ~1.5 and attention is sharp. Norm weights become
    1 + N(0, 0.2) and their biases N(0, 0.2) so that they matter too.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            is_norm = p.dim() == 1 and ("norm" in name or ".ln_" in name or "ln_f" in name)
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


@pytest.fixture
def scramble():
    return _scramble


@pytest.fixture
def ids():
    """A ``(2, 24)`` batch of random token ids."""
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_llama(scramble):
    """Build a tiny random ``LlamaForCausalLM`` (2 layers, width 64, 4 query / 2 kv heads) in eval mode."""

    def build(**kwargs):
        cfg = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            attn_implementation="eager",
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        cfg.update(kwargs)
        return scramble(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)))

    return build
