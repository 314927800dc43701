"""LAMBADA data: the harness's split, encoding, ordering and scoring positions, and padding invariance.

The reference below is a transcription of lm-evaluation-harness's ``lambada_openai`` task and its HFLM
loglikelihood path (``TemplateLM.loglikelihood`` / ``_encode_pair``, ``HFLM.tok_encode`` with no special tokens,
``_loglikelihood_tokens`` with its ``Collator`` sort, right padding with zeros and ``_select_cont_toks``), run on a
GPT-2-like byte-level tokenizer trained here and a tiny random ``transformers.GPT2LMHeadModel``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lightning_llm.data.lambada import LambadaDataModule, lambada_split, read_lambada_jsonl
from lightning_llm.data.text import IGNORE_INDEX
from lightning_llm.data.tokenizer import EOS_TOKEN

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "lambada_test.jsonl"
MAX_LENGTH = 48

PASSAGES = [
    "The cat sat on the mat and looked at the dog",
    "He said  goodbye",  # double space: the context ends with a space, which moves onto the continuation
    "Alone",  # no space: empty context, scored after the prefix token
    "She whispered \u201chello\u201d",
    "The last word spans\nlines",  # a target containing a newline (7 such passages in the real file)
    " ".join(f"word{i % 17}" for i in range(80)) + " finale",  # longer than MAX_LENGTH: left-truncated
    "Short one two",
    "Short one six",  # same length as the previous one: ties are ordered by the token tuple
    "Return the value of the named attribute of object",
]


# --------------------------------------------------------------------------------------------- harness reference
class HarnessReference:
    """lm-evaluation-harness's HFLM loglikelihood path for a causal LM, transcribed."""

    def __init__(self, tokenizer, model=None, max_length: int = MAX_LENGTH, batch_size: int = 3):
        self.tokenizer, self.model, self.max_length, self.batch_size = tokenizer, model, max_length, batch_size

    def tok_encode(self, string: str) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    def _encode_pair(self, context: str, continuation: str):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole_enc = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        return context_enc, whole_enc[len(context_enc) :]

    def requests(self, texts: list[str]):
        out = []
        for text in texts:
            context = " ".join(text.split(" ")[:-1])  # doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
            continuation = " " + text.split(" ")[-1]  # doc_to_target: "{{' '+text.split(' ')[-1]}}"
            if context == "":
                context_enc, continuation_enc = [self.prefix_token_id], self.tok_encode(continuation)
            else:
                context_enc, continuation_enc = self._encode_pair(context, continuation)
            out.append(((context, continuation), context_enc, continuation_enc))
        return out

    def order(self, reqs) -> list[int]:
        return sorted(range(len(reqs)), key=lambda i: (-len(reqs[i][1] + reqs[i][2]), tuple(reqs[i][1] + reqs[i][2])))

    @torch.no_grad()
    def loglikelihood(self, texts: list[str]) -> list[tuple[float, bool]]:
        reqs = self.requests(texts)
        order = self.order(reqs)
        results: list = [None] * len(reqs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inps, padding_len_inp = [], None
            for i in chunk:
                _, context_enc, continuation_enc = reqs[i]
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1], dtype=torch.long)
                padding_len_inp = max(padding_len_inp or 0, inp.shape[0])
                inps.append(inp)
            batched = torch.stack([torch.cat([x, x.new_zeros(padding_len_inp - x.shape[0])]) for x in inps])
            multi_logits = torch.log_softmax(self.model(batched).logits.double(), dim=-1)
            for i, logits, inp in zip(chunk, multi_logits, inps):
                cont_toks = reqs[i][2]
                inplen, contlen = inp.shape[0], len(cont_toks)
                ctx_len = inplen + (logits.shape[0] - padding_len_inp)
                logits = logits[ctx_len - contlen : ctx_len]  # _select_cont_toks
                greedy = logits.argmax(dim=-1)
                cont = torch.tensor(cont_toks, dtype=torch.long)
                results[i] = (float(logits.gather(1, cont[:, None]).sum()), bool((greedy == cont).all()))
        return results


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_dir(small_bpe, tmp_path_factory) -> str:
    """A GPT-2-like Hugging Face tokenizer directory (byte-level BPE, <|endoftext|> as bos = eos)."""
    directory = tmp_path_factory.mktemp("gpt2_like")
    hf = PreTrainedTokenizerFast(tokenizer_object=small_bpe.backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN)
    hf.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lambada") / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in PASSAGES) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_gpt2(small_bpe) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=small_bpe.vocab_size, n_positions=MAX_LENGTH, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


# ------------------------------------------------------------------------------------------------------ tests
def test_split_matches_task_definition():
    for text in PASSAGES:
        context, target = lambada_split(text)
        assert context == " ".join(text.split(" ")[:-1]) and target == " " + text.split(" ")[-1]
        assert context + target == text or context == ""


def test_encoding_matches_harness(hf_dir, jsonl):
    dm = LambadaDataModule(jsonl, tokenizer=hf_dir, max_length=MAX_LENGTH)
    ref = HarnessReference(AutoTokenizer.from_pretrained(hf_dir))
    reqs = ref.requests(PASSAGES)
    assert len(dm.examples) == len(PASSAGES)
    for ex, ((context, continuation), context_enc, continuation_enc), text in zip(dm.examples, reqs, PASSAGES):
        assert ex["text"] == text and ex["context"] + ex["continuation"] == context + continuation
        assert ex["target"] == continuation
        assert ex["context_ids"] == context_enc and ex["target_ids"] == continuation_enc
        assert ex["input_ids"] == (context_enc + continuation_enc)[-(MAX_LENGTH + 1) :][:-1]
    assert dm.examples[2]["context_ids"] == [dm.tokenizer.eos_id]  # "Alone": prefix token (bos = eos here)
    assert dm.examples[1]["continuation"] == "  goodbye"  # the trailing context space moved onto the target
    assert len(dm.examples[5]["input_ids"]) == MAX_LENGTH  # truncated from the left


def test_batches_order_targets_and_scores_match_harness(hf_dir, jsonl, tiny_gpt2):
    """Our right-padded batches (with an attention mask), scored at the positions where targets != -100, give the
    harness's summed log-probability and greedy flag for every passage, in the harness's order; and each example
    scored alone, unpadded, gives the same numbers (right padding changes no log-probability)."""
    dm = LambadaDataModule(jsonl, tokenizer=hf_dir, batch_size=3, max_length=MAX_LENGTH)
    dm.setup("test")
    ref = HarnessReference(AutoTokenizer.from_pretrained(hf_dir), tiny_gpt2, batch_size=3)
    expected = ref.loglikelihood(PASSAGES)
    order, got = [], {}
    padded_somewhere = False
    with torch.no_grad():
        for batch in dm.test_dataloader():
            assert set(batch) == {"input_ids", "targets", "attention_mask", "index"}
            b, t = batch["input_ids"].shape
            assert batch["targets"].shape == batch["attention_mask"].shape == (b, t) and batch["index"].shape == (b,)
            padded_somewhere |= bool((batch["attention_mask"] == 0).any())
            logp = torch.log_softmax(
                tiny_gpt2(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double(), dim=-1
            )
            mask = batch["targets"] != IGNORE_INDEX
            safe = batch["targets"].clamp_min(0)
            token_logp = logp.gather(-1, safe[..., None])[..., 0] * mask  # (B, T)
            correct = (logp.argmax(-1) == safe) | ~mask
            for row, index in enumerate(batch["index"].tolist()):
                order.append(index)
                ex = dm.examples[index]
                assert mask[row].sum() == len(ex["target_ids"])
                assert batch["targets"][row][mask[row]].tolist() == ex["target_ids"]
                n = int(batch["attention_mask"][row].sum())
                assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
                got[index] = (float(token_logp[row].sum()), bool(correct[row].all()))
                # Alone and unpadded:
                alone = torch.log_softmax(tiny_gpt2(torch.tensor([ex["input_ids"]])).logits.double(), dim=-1)[0]
                k = len(ex["target_ids"])
                alone_sum = float(alone[n - k : n].gather(1, torch.tensor(ex["target_ids"])[:, None]).sum())
                assert got[index][0] == pytest.approx(alone_sum, abs=1e-5)
    assert padded_somewhere
    assert order == ref.order(ref.requests(PASSAGES))
    for i, (ll, greedy) in enumerate(expected):
        assert got[i][0] == pytest.approx(ll, abs=1e-5)
        assert got[i][1] == greedy


def test_max_examples_and_tokenizer_object(small_bpe, jsonl):
    dm = LambadaDataModule(jsonl, tokenizer=small_bpe, max_examples=4)
    assert [ex["index"] for ex in dm.examples] == [0, 1, 2, 3]
    assert dm.examples[2]["context_ids"] == [small_bpe.eos_id]  # no bos: the harness falls back to eos


def test_errors(tmp_path, jsonl):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LambadaDataModule(str(tmp_path / "missing.jsonl"), tokenizer="x").load_texts()
    with pytest.raises(ValueError, match="no tokenizer"):
        _ = LambadaDataModule(jsonl).examples
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 .*'text'"):
        read_lambada_jsonl(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        read_lambada_jsonl(bad)
    for kwargs in ({"batch_size": 0}, {"max_length": 0}, {"max_examples": 0}):
        with pytest.raises(ValueError):
            LambadaDataModule(jsonl, **kwargs)


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared LAMBADA file is not on this machine")
def test_shared_lambada_file(hf_dir):
    # The checksum lm-evaluation-harness records for OpenAI's lambada_test.jsonl.
    assert hashlib.sha256(SHARED.read_bytes()).hexdigest() == (
        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"
    )
    assert len(read_lambada_jsonl(SHARED)) == 5153
    dm = LambadaDataModule(str(SHARED), tokenizer=hf_dir, max_examples=50)
    texts = [json.loads(line)["text"] for line in SHARED.read_text(encoding="utf-8").splitlines()[:50]]
    reqs = HarnessReference(AutoTokenizer.from_pretrained(hf_dir)).requests(texts)
    assert [(ex["context_ids"], ex["target_ids"]) for ex in dm.examples] == [(r[1], r[2]) for r in reqs]
    assert [ex["target"] for ex in dm.examples] == [r[0][1] for r in reqs]


def test_hub_path_goes_through_load_dataset(monkeypatch, small_bpe):
    """The default path is loaded as `datasets.load_dataset("EleutherAI/lambada_openai", "default", split="test")`,
    the harness's dataset_path / dataset_name / test_split (faked here: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": PASSAGES[:3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = LambadaDataModule(tokenizer=small_bpe)
    assert [ex["text"] for ex in dm.examples] == PASSAGES[:3]
    assert calls == [("EleutherAI/lambada_openai", "default", "test")]
