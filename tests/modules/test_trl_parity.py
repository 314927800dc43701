"""End-to-end parity with TRL 1.16: the token ids its trainers feed the model, and their first-step losses.

Everything here CALLS TRL (``DPOTrainer`` / ``RewardTrainer``: their dataset processing, collators and
``compute_loss`` / ``_compute_loss``), on tiny random ``LlamaForCausalLM`` models saved to ``tmp_path`` with two
tokenizers built locally with ``tokenizers`` (no network):

* ``gpt2``: a GPT-2-style byte-level BPE whose BOS is ``<|endoftext|>`` and that adds no special token itself (pad
  falls back to eos, as for GPT-2);
* ``llama``: a Llama-style tokenizer whose post-processor adds ``<s>`` itself, eos ``</s>``, pad ``<pad>``;
* ``ours``: this project's byte-level BPE (:meth:`Tokenizer.train_bpe`) saved with :meth:`Tokenizer.save`, loaded by
  ``transformers`` on TRL's side (its chat format given to TRL as :data:`DEFAULT_CHAT_TEMPLATE`).

Both carry a ChatML-style chat template (the Llama-style one writes ``{{ bos_token }}``), so conversational examples
go through the tokenizer's own template on both sides. The policy and a separately initialised reference are two
different random models, so the DPO loss is not the trivial ``log 2``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import tokenizers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer  # noqa: E402

from lightning_llm.data.preference import DEFAULT_CHAT_TEMPLATE, PreferenceDataModule  # noqa: E402
from lightning_llm.data.prompts import PromptDataModule  # noqa: E402
from lightning_llm.data.tokenizer import Tokenizer  # noqa: E402
from lightning_llm.modules.dpo import DPO  # noqa: E402
from lightning_llm.modules.reward_model import RewardModel  # noqa: E402
from lightning_llm.rlhf import DPO_LOSS_TYPES, bradley_terry_loss, dpo_loss  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What color is the sky? It is blue. It is green.",
    "Name a fruit. An apple. A rock.",
    "Hello there, how are you? I am fine, thanks. Go away.",
    "The quick brown fox jumps over the lazy dog.",
] * 20

PLAIN = [
    {"prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green.", "margin": 0.5},
    {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A rock, maybe.", "margin": 0.0},
    {"prompt": "Hello there,", "chosen": " how are you?", "rejected": " go away", "margin": 1.5},
]
IMPLICIT = [
    {"chosen": "Name a fruit. An apple.", "rejected": "Name a fruit. A rock."},
    {"chosen": "Hello there, I am fine, thanks.", "rejected": "Hello there, go away."},
]


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CHAT = [
    {
        "prompt": [_msg("user", "What color is the sky?")],
        "chosen": [_msg("assistant", "It is blue.")],
        "rejected": [_msg("assistant", "It is green.")],
    },
    {
        "prompt": [_msg("system", "Be brief."), _msg("user", "Name a fruit.")],
        "chosen": [_msg("assistant", "An apple.")],
        "rejected": [_msg("assistant", "A rock, maybe.")],
    },
]
DATA = {"plain": PLAIN, "implicit": IMPLICIT, "chat": CHAT}


# ------------------------------------------------------------------------------------------------ fixtures
def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>"] if kind == "gpt2" else ["<s>", "</s>", "<pad>"]) + ["<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "gpt2":  # GPT-2: byte-level post-processor, no special token added
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        hf.chat_template = CHATML
    else:  # Llama: the tokenizer prepends its BOS itself
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        hf.chat_template = "{{ bos_token }}" + CHATML
    return hf


def _llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaked outputs: policy and reference log-probs differ visibly
    )
    return LlamaForCausalLM(config).eval()


def _make_dirs(kind: str, root: Path) -> SimpleNamespace:
    """``policy`` and ``ref``: two tiny random Llamas (different seeds) saved with the same tokenizer. ``kind="ours"``
    is this project's byte-level BPE saved by :meth:`Tokenizer.save` (no chat template of its own)."""
    tok = _tokenizer(kind) if kind != "ours" else Tokenizer.train_bpe(CORPUS, vocab_size=300)
    dirs = {}
    for name, seed in (("policy", 0), ("ref", 1)):
        d = root / name
        _llama(len(tok), seed).save_pretrained(d)
        tok.save(d) if kind == "ours" else tok.save_pretrained(d)
        dirs[name] = str(d)
    return SimpleNamespace(kind=kind, root=root, **dirs)


@pytest.fixture(scope="module", params=["gpt2", "llama", "ours"])
def hf_dirs(request, tmp_path_factory) -> SimpleNamespace:
    return _make_dirs(request.param, tmp_path_factory.mktemp(f"hf-{request.param}"))


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> SimpleNamespace:
    return _make_dirs("llama", tmp_path_factory.mktemp("hf-llama-only"))


def _hf_tokenizer(dirs: SimpleNamespace):
    """The tokenizer TRL gets: the directory's, loaded by ``transformers``; for our BPE, with our default chat
    format written as Jinja (it has no template of its own, and TRL needs one for conversations)."""
    tok = AutoTokenizer.from_pretrained(dirs.policy)
    if dirs.kind == "ours":
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _ours(hf_dirs: SimpleNamespace, data: str, tmp_path: Path, **kwargs) -> tuple[PreferenceDataModule, dict]:
    """Our data module on the same rows (train = val = the whole file, in order) and one batch of all of them."""
    path = _jsonl(tmp_path / f"{data}.jsonl", DATA[data])
    dm = PreferenceDataModule(dataset=path, val_dataset=path, tokenizer=hf_dirs.policy, batch_size=8, **kwargs)
    ds = dm.dataset("train")
    return dm, dm.collate_fn([ds[i] for i in range(len(ds))])


def _trl_rows(data: str, keep_margin: bool) -> Dataset:
    rows = [{k: v for k, v in r.items() if keep_margin or k != "margin"} for r in DATA[data]]
    return Dataset.from_list(rows)


def _args(cls, tmp_path: Path, **kwargs):
    return cls(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=8,
        dataset_num_proc=None,
        **kwargs,
    )


def _dpo_trainer(hf_dirs: SimpleNamespace, data: str, tmp_path: Path, **config) -> tuple[DPOTrainer, dict]:
    trainer = DPOTrainer(
        model=hf_dirs.policy,
        ref_model=AutoModelForCausalLM.from_pretrained(hf_dirs.ref, dtype=torch.float32),
        args=_args(DPOConfig, tmp_path, **config),
        train_dataset=_trl_rows(data, keep_margin=False),
        processing_class=_hf_tokenizer(hf_dirs),
    )
    ds = trainer.train_dataset
    return trainer, trainer.data_collator([ds[i] for i in range(len(ds))])


def _cat(batch: dict, key: str) -> torch.Tensor:
    return torch.cat((batch[f"chosen_{key}"], batch[f"rejected_{key}"]))  # (2B, L)


# ------------------------------------------------------------------------------------------------ DPO
@pytest.mark.parametrize("data", ["plain", "implicit", "chat"])
def test_dpo_token_ids_and_first_loss_equal_trl(hf_dirs, data, tmp_path):
    trainer, trl_batch = _dpo_trainer(hf_dirs, data, tmp_path)
    _, batch = _ours(hf_dirs, data, tmp_path)
    # the ids, masks and completion masks TRL's collator feeds its model ([chosen; rejected], right padded)
    assert _cat(batch, "input_ids").tolist() == trl_batch["input_ids"].tolist()
    assert _cat(batch, "attention_mask").tolist() == trl_batch["attention_mask"].tolist()
    assert _cat(batch, "loss_mask").tolist() == trl_batch["completion_mask"].tolist()
    tok = _hf_tokenizer(hf_dirs)
    first = batch["chosen_input_ids"][0].tolist()
    if hf_dirs.kind == "llama":  # the tokenizer's (or the template's) BOS, once
        assert first[0] == tok.bos_token_id and first[1] != tok.bos_token_id
    else:  # GPT-2-style: no BOS prepended
        assert first[0] != tok.bos_token_id
    if data != "chat":  # eos closes every standard completion
        for row, mask in zip(_cat(batch, "input_ids"), _cat(batch, "attention_mask")):
            assert row[mask.bool()][-1].item() == tok.eos_token_id

    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
    dpo = DPO(pretrained=hf_dirs.policy, ref_model=hf_dirs.ref)
    with torch.no_grad():
        ours = dpo._step(batch, "train")[0].item()
    assert abs(trl_loss - math.log(2)) > 1e-3  # policy != reference: not the trivial value
    assert ours == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": ["ipo"]},
        {"loss_type": ["sigmoid_norm"], "f_divergence_type": "js_divergence"},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        {"loss_type": ["robust"], "label_smoothing": 0.1},
    ],
    ids=lambda c: "+".join(c["loss_type"]),
)
def test_dpo_loss_types_end_to_end_equal_trl(llama_dirs, config, tmp_path):
    trainer, trl_batch = _dpo_trainer(llama_dirs, "plain", tmp_path, **config)
    _, batch = _ours(llama_dirs, "plain", tmp_path)
    dpo = DPO(pretrained=llama_dirs.policy, ref_model=llama_dirs.ref, **config)
    with torch.no_grad():
        ours = dpo._step(batch, "train")[0].item()
    assert ours == pytest.approx(trainer.compute_loss(trainer.model, trl_batch).item(), rel=1e-6, abs=1e-6)


def test_dpo_default_reference_is_initial_policy(hf_dirs, tmp_path):
    """No ``ref_model``: TRL loads a second copy of the policy, we freeze a copy; both give log 2 at step 0."""
    trainer = DPOTrainer(
        model=hf_dirs.policy,
        args=_args(DPOConfig, tmp_path),
        train_dataset=_trl_rows("plain", keep_margin=False),
        processing_class=_hf_tokenizer(hf_dirs),
    )
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PLAIN))])
    _, batch = _ours(hf_dirs, "plain", tmp_path)
    with torch.no_grad():
        ours = DPO(pretrained=hf_dirs.policy)._step(batch, "train")[0].item()
    assert ours == pytest.approx(trainer.compute_loss(trainer.model, trl_batch).item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ reward model
def _reward_pair(hf_dirs: SimpleNamespace, data: str, tmp_path: Path):
    hf_model = AutoModelForSequenceClassification.from_pretrained(hf_dirs.policy, num_labels=1, dtype=torch.float32)
    trainer = RewardTrainer(
        model=hf_model,
        args=_args(RewardConfig, tmp_path),
        train_dataset=_trl_rows(data, keep_margin=True),
        processing_class=_hf_tokenizer(hf_dirs),
    )
    ds = trainer.train_dataset
    trl_batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    rm = RewardModel(pretrained=hf_dirs.policy).eval()
    with torch.no_grad():  # the same score head in both
        rm.head.proj.weight.copy_(trainer.model.score.weight)
        rm.head.proj.bias.zero_()
    return trainer, trl_batch, rm


@pytest.mark.parametrize("data", ["plain", "implicit", "chat"])
def test_reward_token_ids_and_first_loss_equal_trl(hf_dirs, data, tmp_path):
    trainer, trl_batch, rm = _reward_pair(hf_dirs, data, tmp_path)
    _, batch = _ours(hf_dirs, data, tmp_path, truncation_mode="filter")
    assert _cat(batch, "input_ids").tolist() == trl_batch["input_ids"].tolist()
    assert _cat(batch, "attention_mask").tolist() == trl_batch["attention_mask"].tolist()
    if "margin" in trl_batch:
        torch.testing.assert_close(batch["margin"], trl_batch["margin"])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
        rc, rr = rm.pair_scores(batch)
        ours, _ = bradley_terry_loss(rc, rr, margin=batch.get("margin"))
    assert ours.item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)


def test_prompt_ids_equal_trl_online_trainers(hf_dirs, tmp_path):
    """GRPO / RLOO tokenization: ``tokenizer(text)`` for text prompts, ``apply_chat_template(add_generation_prompt=True,
    tokenize=True)`` for conversations (the calls TRL's ``GRPOTrainer._tokenize_prompts`` makes)."""
    tok = _hf_tokenizer(hf_dirs)
    texts = ["What color is the sky?", "Hello there,"]
    chats = [row["prompt"] for row in CHAT]
    dm = PromptDataModule(prompts=texts + chats, tokenizer=hf_dirs.policy, val_fraction=0.0, batch_size=8)
    ours = next(iter(dm.predict_dataloader()))["prompt_ids"]
    expected = tok(text=texts)["input_ids"] + list(
        tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    assert ours == [list(x) for x in expected]


# ------------------------------------------------------------------------------------------------ the loss family
def _fake_model(per_token_logps: torch.Tensor):
    """Stands in for TRL's fused-LM-head forward: returns the given per-token log-probs ``(2B, T - 1)``, 0 where the
    label is ignored (the prompt and padding), as the fused head does."""

    def forward(**kwargs):
        log_probs = per_token_logps * (kwargs["labels"][:, 1:] != -100)
        z = torch.zeros_like(per_token_logps)
        return SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool())

    return forward


LOSS_CONFIGS = [{"loss_type": [t]} for t in DPO_LOSS_TYPES if t not in ("exo_pair", "robust", "aot", "aot_unpaired")]
LOSS_CONFIGS += [
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "label_smoothing": 0.2},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired"], "label_smoothing": 0.0},
    {"loss_type": ["discopop"], "discopop_tau": 0.3, "beta": 0.5},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["hinge", "ipo"], "loss_weights": [0.3, 2.0], "beta": 0.05},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    {"loss_type": ["ipo", "sft"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["hinge", "sigmoid_norm"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["discopop", "exo_pair"], "f_divergence_type": "js_divergence", "label_smoothing": 0.01},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny model + tokenizer directory for constructing ``DPOTrainer`` (its model is never run there)."""
    d = tmp_path_factory.mktemp("tiny")
    tok = _tokenizer("gpt2")
    _llama(len(tok), 0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def dpo_inputs() -> dict:
    """Per-token log-probs for 5 pairs with different prompt / completion lengths (TRL's batch layout)."""
    g = torch.Generator().manual_seed(0)
    b, t = 5, 12
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        completion[i, start:end] = 1
    per_token = -torch.rand(2 * b, t - 1, generator=g) * 3  # (2B, T - 1), float32 (TRL's f-divergence needs it)
    ref_sums = (per_token * completion[:, 1:]).sum(1) + 2 * torch.randn(2 * b, generator=g)  # log-ratios ~ N(0, 4)
    return {"completion_mask": completion, "per_token": per_token, "ref": ref_sums}


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: "+".join(c["loss_type"]) + str(len(c)))
def test_dpo_loss_family_equals_trl_compute_loss(config, dpo_inputs, tiny_dir, tmp_path):
    """Each loss type (and combination, and f-divergence) against TRL's own ``DPOTrainer._compute_loss``, fed the
    same per-token log-probs and reference log-probs; values and gradients."""
    trainer = DPOTrainer(
        model=tiny_dir,
        args=_args(DPOConfig, tmp_path, **config),
        train_dataset=Dataset.from_list(PLAIN[:1]),
        processing_class=AutoTokenizer.from_pretrained(tiny_dir),
    )
    trainer.precompute_ref_logps = True  # take the reference log-probs from the batch, as after precomputing them
    mask, ref = dpo_inputs["completion_mask"], dpo_inputs["ref"]
    b = mask.shape[0] // 2
    trl_logps = dpo_inputs["per_token"].clone().requires_grad_()
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    trl_loss = trainer._compute_loss(_fake_model(trl_logps), inputs, return_outputs=False)
    trl_loss.backward()

    our_logps = dpo_inputs["per_token"].clone().requires_grad_()
    sums = (our_logps * mask[:, 1:]).sum(1)  # (2B,) log-probs summed over the completion
    lengths = mask.sum(1)  # (2B,) TRL's completion_mask counts
    kwargs = {k: v for k, v in config.items() if k != "loss_type"}
    ours, cr, rr = dpo_loss(
        sums[:b],
        sums[b:],
        ref[:b],
        ref[b:],
        loss_type=config["loss_type"],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        **kwargs,
    )
    ours.backward()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-5, atol=1e-7)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-6)
    assert rr.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], rel=1e-6)


def test_trl_supports_exactly_our_loss_types():
    """The list of TRL 1.16's loss types is the one in its own error message; ours is the same set."""
    import inspect
    import re

    source = inspect.getsource(DPOTrainer._compute_loss)
    listed = re.search(r"Should be one of \[(.*?)\]", source, re.S).group(1)
    trl_types = set(re.findall(r"'(\w+)'", listed))
    assert trl_types == set(DPO_LOSS_TYPES)


def test_dpo_reference_with_another_tokenizer_is_refused(llama_dirs, tmp_path):
    gpt2 = _make_dirs("gpt2", tmp_path)
    assert len(AutoTokenizer.from_pretrained(gpt2.ref)) == len(AutoTokenizer.from_pretrained(llama_dirs.policy))
    with pytest.raises(ValueError, match="different tokenizer than the policy"):  # same size, other tokens
        DPO(pretrained=llama_dirs.policy, ref_model=gpt2.ref)


# ------------------------------------------------------------------------------------------------ SFT
SFT_DATA = {
    "text": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hello there, how are you?"}],
    "prompt_completion": [
        {"prompt": "What color is the sky?", "completion": " It is blue."},
        {"prompt": "Name a fruit.", "completion": " An apple, maybe."},
    ],
    "chat": [
        {"messages": [_msg("user", "What color is the sky?"), _msg("assistant", "It is blue.")]},
        {"messages": [_msg("system", "Be brief."), _msg("user", "Name a fruit."), _msg("assistant", "An apple.")]},
    ],
}


@pytest.mark.parametrize("data", list(SFT_DATA))
def test_sft_token_ids_and_first_loss_equal_trl(hf_dirs, data, tmp_path):
    """TRL's ``SFTTrainer`` end to end (its dataset preparation, collator and ``compute_loss``) against our
    ``SFTDataModule`` + ``SFT`` on the same model and rows: same ids, same scored tokens, same first-step loss."""
    from trl import SFTConfig, SFTTrainer

    from lightning_llm.data.sft import SFTDataModule
    from lightning_llm.modules.sft import SFT

    trainer = SFTTrainer(
        model=hf_dirs.policy,
        args=_args(SFTConfig, tmp_path, max_length=64),
        train_dataset=Dataset.from_list(SFT_DATA[data]),
        processing_class=_hf_tokenizer(hf_dirs),
    )
    ds = trainer.train_dataset
    trl_batch = trainer.data_collator([ds[i] for i in range(len(ds))])

    path = _jsonl(tmp_path / f"sft_{data}.jsonl", SFT_DATA[data])
    template = DEFAULT_CHAT_TEMPLATE if hf_dirs.kind == "ours" else None
    dm = SFTDataModule(
        dataset=path, val_dataset=path, tokenizer=hf_dirs.policy, chat_template=template, max_length=64, batch_size=8
    )
    ours_ds = dm.dataset("train")
    batch = dm.collate_fn([ours_ds[i] for i in range(len(ours_ds))])
    assert batch["input_ids"].tolist() == trl_batch["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == trl_batch["attention_mask"].tolist()
    # transformers' labels[t] is token t (-100: not scored); our targets[t] is the next token, labels[t + 1]
    assert batch["targets"][:, :-1].tolist() == trl_batch["labels"][:, 1:].tolist()

    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
        ours = SFT(pretrained=hf_dirs.policy).loss(batch).item()
    assert ours == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)
