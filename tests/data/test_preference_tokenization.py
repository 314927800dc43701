"""Preference / prompt tokenization against ``transformers`` itself: ``tokenizer(text)`` and ``apply_chat_template``.

The end-to-end comparison with TRL's trainers is in ``tests/modules/test_trl_parity.py``; here the pieces:
:func:`encode_text` is ``tokenizer(text)["input_ids"]`` (special tokens as the tokenizer adds them) and
``tokenizer(text, add_special_tokens=False)``, and :class:`ChatTemplate` renders as ``apply_chat_template``.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from lightning_llm.data.preference import (  # noqa: E402
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    encode_text,
    resolve_chat_template,
)
from lightning_llm.data.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["Hello world, how are you?", "The sky is blue.<|endoftext|>", "  two spaces</s>", ""]
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _hf_tokenizer(kind: str, directory) -> str:
    """A GPT-2-style (adds nothing) or Llama-style (adds ``<s>``) byte-level BPE saved with ``save_pretrained``."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials + ["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    if kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT
    hf.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "ours"])
def test_encode_text_is_the_tokenizers_own_call(kind, tmp_path):
    if kind == "ours":
        Tokenizer.train_bpe(TEXTS * 10, vocab_size=300).save(tmp_path)
        path = str(tmp_path)
    else:
        path = _hf_tokenizer(kind, tmp_path)
    hf = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        assert encode_text(ours, text) == hf(text)["input_ids"]
        assert encode_text(ours, text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    with_bos = encode_text(ours, "Hello")[0] == hf.bos_token_id
    assert with_bos == (kind == "llama")  # only the Llama-style tokenizer adds its BOS itself
    with pytest.raises(TypeError, match="text"):
        encode_text(ours, ["a list"])


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_as_apply_chat_template(gen, tmp_path):
    path = _hf_tokenizer("llama", tmp_path)
    hf = AutoTokenizer.from_pretrained(path)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    own = ChatTemplate.from_pretrained(path)
    assert own is not None and own.template == CHAT
    assert own.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    assert expected.startswith("<s><|im_start|>system")  # the bos_token variable was filled in
    # resolution order: explicit template (with the tokenizer's special tokens) > the tokenizer's own > default
    assert resolve_chat_template(None, path).apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    explicit = resolve_chat_template("{{ eos_token }}{{ messages[0]['content'] }}", path)
    assert explicit.apply_chat_template(MESSAGES) == "</s>Be brief."
    assert resolve_chat_template(None, "char").template is None
    # continue_final_message, as transformers handles it
    cont = [*MESSAGES, {"role": "assistant", "content": "Sure"}]
    assert own.apply_chat_template(cont, continue_final_message=True) == hf.apply_chat_template(
        cont, tokenize=False, continue_final_message=True
    )


def test_default_chat_template_equals_its_jinja_form(tmp_path):
    path = _hf_tokenizer("gpt2", tmp_path)
    hf = AutoTokenizer.from_pretrained(path)
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    for gen in (True, False):
        assert ChatTemplate().apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen
        )
    # a directory saved by Tokenizer.save has no template of its own
    Tokenizer.train_bpe(TEXTS * 10, vocab_size=300).save(tmp_path / "ours")
    assert ChatTemplate.from_pretrained(str(tmp_path / "ours")) is None
    with pytest.raises(ValueError, match="empty"):
        ChatTemplate().apply_chat_template([])
    with pytest.raises(TypeError, match="special_tokens"):
        ChatTemplate("x", special_tokens=["<s>"])
