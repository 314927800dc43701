"""``load_pretrained``: the one way in, for a Hugging Face directory, a checkpoint of each module, a sharded folder.

References: ``transformers``' own model on the Hugging Face directory (logits), ``AutoTokenizer`` (token ids), and
the module objects that wrote each checkpoint (their own transformer's logits).
"""

from __future__ import annotations

import pytest
import torch

from lightning_llm import load_pretrained
from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.modules import PPO, CausalLM, RewardModel

transformers = pytest.importorskip("transformers")

CFG = TransformerConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
TEXT = "def load(path):\n    return open(path).read()\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT * 20 + "the quick brown fox jumps over the lazy dog\n" * 20], vocab_size=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


def _ids(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(TEXT)])


def _checkpoint(module) -> dict:
    """What Lightning's ``Trainer.save_checkpoint`` stores for a module: weights, hyper-parameters, the module's hook."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    return ckpt


def test_hugging_face_directory_matches_transformers(hf_dir, tokenizer):
    model, tok = load_pretrained(hf_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert tok.encode(TEXT) == transformers.AutoTokenizer.from_pretrained(hf_dir)(TEXT).input_ids
    assert not model.training


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_dtype_is_the_one_asked_for(hf_dir, dtype):
    model, _ = load_pretrained(hf_dir, dtype=dtype)
    expected = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("kind", ["causal_lm", "reward_model", "ppo"])
def test_checkpoint_of_each_module_gives_its_transformer(kind, tokenizer, tmp_path):
    torch.manual_seed(1)
    if kind == "causal_lm":
        module = CausalLM(CFG)
        module.configure_model()
        inner = module.model
    elif kind == "reward_model":
        module = RewardModel(CFG)
        inner = module.backbone
    else:
        module = PPO(config=CFG, reward_functions=[lambda prompts, completions, **kw: [0.0] * len(completions)])
        inner = module.policy
    module.tokenizer = tokenizer
    path = tmp_path / f"{kind}.ckpt"
    torch.save(_checkpoint(module), path)
    model, tok = load_pretrained(path)
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), inner.eval()(ids), atol=0, rtol=0)
    assert tok.encode(TEXT) == tokenizer.encode(TEXT) and tok.special_ids == tokenizer.special_ids


def test_pretrained_accepts_a_checkpoint_of_another_module(tokenizer, tmp_path):
    """A RewardModel / PPO / DPO starts from an SFT checkpoint: `pretrained=` takes any checkpoint of ours."""
    torch.manual_seed(2)
    sft = CausalLM(CFG)
    sft.configure_model()
    sft.tokenizer = tokenizer
    path = tmp_path / "sft.ckpt"
    torch.save(_checkpoint(sft), path)
    reward = RewardModel(pretrained=str(path))
    for name, value in sft.model.state_dict().items():
        torch.testing.assert_close(reward.backbone.state_dict()[name], value, atol=0, rtol=0)
    assert reward.tokenizer is not None and reward.tokenizer.fingerprint == tokenizer.fingerprint


def test_sharded_folder(tokenizer, tmp_path):
    """A torch.distributed.checkpoint folder laid out as Lightning's ModelParallelStrategy writes it."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(3)
    module = CausalLM(CFG)
    module.configure_model()
    module.tokenizer = tokenizer
    ckpt = _checkpoint(module)
    folder = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=folder)
    torch.save(ckpt, folder / "meta.pt")
    model, tok = load_pretrained(folder)
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), module.model.eval()(ids), atol=0, rtol=0)
    assert tok is not None


@pytest.mark.parametrize(
    ("make", "error", "needle"),
    [
        (lambda p: p / "missing", FileNotFoundError, "does not exist"),
        (lambda p: p, ValueError, "neither config.json"),
        (lambda p: _save(p / "x.ckpt", {"state_dict": {"w": torch.zeros(1)}}), ValueError, "no transformer weights"),
        (lambda p: _save(p / "y.ckpt", [1, 2]), ValueError, "not a checkpoint dict"),
    ],
    ids=["missing", "plain-folder", "no-weights", "not-a-dict"],
)
def test_bad_paths_get_clear_errors(tmp_path, make, error, needle):
    with pytest.raises(error, match=needle):
        load_pretrained(make(tmp_path))


def _save(path, obj):
    torch.save(obj, path)
    return path
