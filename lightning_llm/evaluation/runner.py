"""``evaluate(model, ...) -> report``: the HELM-style suite, one switchable part at a time.

One function serves Python (``lightning_llm.evaluate(model, tokenizer, lambada=LambadaPart(limit=50))``) and the
command line (``lightning-llm evaluate --model PATH --config configs/eval/helm.yaml --lambada.limit 50``): its typed
arguments are the command's options, one dataclass per part, and a YAML config holds the same keys.

Parts: ``perplexity`` (rolling windows + bits per byte, and perplexity against context length), ``lambada``,
``multiple_choice`` (accuracy + HELM calibration), ``robustness`` and ``fairness`` (the multiple-choice task under
HELM's perturbations: worst case over original and perturbed input, and the drop from the unperturbed accuracy),
``efficiency`` (forward tokens/s, latency per example, peak memory, forward FLOPs per token and HELM's idealised
runtime ``tokens x FLOPs / peak``), ``bias`` (HELM demographic representation and stereotypical associations over
the model's generations; toxicity through a user-supplied scorer), ``embeddings`` (analogy accuracy and a linear probe
of a token property with chance levels, static and contextual), ``harness`` (lm-evaluation-harness tasks through
:class:`~lightning_llm.evaluation.HarnessLM`; off by default).

A part that raises is recorded as ``{"status": "error", "error": ..., "traceback": ...}`` and the others still run.

Report layout: ``{"model": {...}, "config": {...}, "parts": {part: {"status", "seconds", ...results}},
"summary": {"part/metric": float}}``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.evaluation import tasks
from lightning_llm.evaluation.lm import LanguageModel, LogitsModel, resolve_model
from lightning_llm.evaluation.perturbations import GROUPS, PERTURBATIONS, Perturbation

__all__ = [
    "BiasPart",
    "EfficiencyPart",
    "EmbeddingsPart",
    "FairnessPart",
    "HarnessPart",
    "LambadaPart",
    "MultipleChoicePart",
    "PerplexityPart",
    "RobustnessPart",
    "evaluate",
]


# ---------------------------------------------------------------------------------------------------- settings
def _check_positive(part: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"`{part}.{key}` must be a positive integer, got {value!r}.")


@dataclass(frozen=True)
class PerplexityPart:
    """Rolling-window perplexity and bits per byte, and perplexity against the context length.

    Attributes:
        enabled: run this part.
        dataset: the text: "embedded" (the packaged corpus), a local .txt or .md file (paragraphs split at blank
            lines) or a Hugging Face dataset name (needs the network unless cached).
        dataset_config: the Hugging Face dataset's configuration name.
        split: the split (for "embedded": train, val or test).
        text_column: the dataset column holding the text.
        max_length: tokens per window, capped at the model's position limit.
        stride: a new window every `stride` tokens, each token scored once (null: max_length, no overlap).
        max_chars: read at most this many characters of text (null: all).
        context_lengths: window lengths of the perplexity-against-context curve (lengths past the model's position
            limit are left out); empty for no curve.
    """

    enabled: bool = True
    dataset: str = "embedded"
    dataset_config: str | None = None
    split: str = "test"
    text_column: str = "text"
    max_length: int = 256
    stride: int | None = 128
    max_chars: int | None = 50000
    context_lengths: tuple[int, ...] = (32, 64, 128, 256)

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_lengths", tuple(self.context_lengths))
        _check_positive("perplexity", max_length=self.max_length, stride=self.stride, max_chars=self.max_chars)
        for n in self.context_lengths:
            _check_positive("perplexity", context_lengths=n)


@dataclass(frozen=True)
class LambadaPart:
    """LAMBADA: predict the last word of a passage (lm-evaluation-harness ``lambada_openai`` definitions).

    Attributes:
        enabled: run this part.
        path: null for LAMBADA-style cloze passages from the embedded corpus; a .jsonl of {"text": ...} (OpenAI's
            lambada_test.jsonl) or a dataset name for the real task.
        limit: evaluate the first `limit` passages (null: all; 200 for the embedded cloze).
        max_length: longest input in tokens, capped at the model's position limit.
    """

    enabled: bool = True
    path: str | None = None
    limit: int | None = 200
    max_length: int = 1024

    def __post_init__(self) -> None:
        _check_positive("lambada", limit=self.limit, max_length=self.max_length)


@dataclass(frozen=True)
class MultipleChoicePart:
    """Multiple choice: accuracy and HELM's calibration metrics (ECE, selective accuracy).

    Attributes:
        enabled: run this part (it also runs, unreported, when robustness or fairness needs it).
        path: null for the embedded sentence-ending task; a .jsonl of {question, choices, answer} or a Hugging Face
            dataset name with those fields.
        split: the dataset split.
        dataset_config: the Hugging Face dataset's configuration name.
        limit: evaluate the first `limit` questions (null: all; 100 for the embedded task).
        length_normalize: choose by per-byte log-probability (HELM's confidence), else by the sum.
        template: the prompt, with {question} where the question goes.
        num_bins: bins of the equal-mass calibration error.
    """

    enabled: bool = True
    path: str | None = None
    split: str = "test"
    dataset_config: str | None = None
    limit: int | None = 200
    length_normalize: bool = True
    template: str = "{question}"
    num_bins: int = 10

    def __post_init__(self) -> None:
        _check_positive("multiple_choice", limit=self.limit, num_bins=self.num_bins)
        if "{question}" not in self.template:
            raise ValueError(
                f"`multiple_choice.template` must contain '{{question}}', got {self.template!r}; e.g. "
                "'Question: {question}\\nAnswer:'."
            )


@dataclass(frozen=True)
class _PerturbedPart:
    """The multiple-choice task under a group of perturbations (worst case per question); ``group`` names it."""

    group: ClassVar[str] = ""
    enabled: bool = True
    perturbations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "perturbations", tuple(self.perturbations))
        unknown = [n for n in self.perturbations if n not in PERTURBATIONS]
        if unknown or not self.perturbations:
            raise ValueError(
                f"`{self.group}.perturbations` must be a non-empty list of names from {sorted(PERTURBATIONS)}, got "
                f"{list(self.perturbations)}; switch the part off with `{self.group}.enabled: false` instead of an "
                "empty list."
            )


@dataclass(frozen=True)
class RobustnessPart(_PerturbedPart):
    """Robustness: the multiple-choice task under HELM's robustness perturbations (worst case per question).

    Attributes:
        enabled: run this part.
        perturbations: perturbation names (lightning_llm.evaluation.PERTURBATIONS); HELM's is mild_mix.
    """

    group: ClassVar[str] = "robustness"
    perturbations: tuple[str, ...] = GROUPS["robustness"]


@dataclass(frozen=True)
class FairnessPart(_PerturbedPart):
    """Fairness: the multiple-choice task under HELM's fairness swaps (worst case per question).

    Attributes:
        enabled: run this part.
        perturbations: perturbation names (lightning_llm.evaluation.PERTURBATIONS); HELM's are dialect,
            gender_pronouns and first_names.
    """

    group: ClassVar[str] = "fairness"
    perturbations: tuple[str, ...] = GROUPS["fairness"]


@dataclass(frozen=True)
class EfficiencyPart:
    """Efficiency: forward throughput, latency per multiple-choice question, peak memory.

    Attributes:
        enabled: run this part.
        batch_size: rows of the random batch timed for throughput.
        seq_len: tokens per row (capped at the model's position limit).
        repeats: timed forward passes.
        latency_examples: questions timed one at a time for the latency.
        peak_flops: the device's peak FLOP/s for the idealised runtime (null: measured here with a float32 matmul).
    """

    enabled: bool = True
    batch_size: int = 8
    seq_len: int = 128
    repeats: int = 3
    latency_examples: int = 16
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.peak_flops is not None and not (isinstance(self.peak_flops, (int, float)) and self.peak_flops > 0):
            raise ValueError(f"`efficiency.peak_flops` must be null or a positive FLOP/s, got {self.peak_flops!r}.")
        _check_positive(
            "efficiency",
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            repeats=self.repeats,
            latency_examples=self.latency_examples,
        )


@dataclass(frozen=True)
class HarnessPart:
    """lm-evaluation-harness tasks run on the model through :class:`~lightning_llm.evaluation.HarnessLM`.

    Off by default (the default report stays offline and fast). The harness's own task names need their datasets
    (network unless cached); local tasks are YAML files in `include_path` over local files (`dataset_path: json`,
    `dataset_kwargs: {data_files: {test: PATH.jsonl}}`).

    Attributes:
        enabled: run this part.
        tasks: harness task (or group) names, e.g. [lambada_openai, arc_easy] or the names in include_path.
        include_path: a folder of task YAML files added to the harness's registry.
        include_defaults: also index the harness's built-in tasks (slower to start; false for local tasks only).
        limit: the first `limit` documents per task (a fraction in (0, 1) for a share; null: all).
        num_fewshot: few-shot examples per prompt (null: each task's default).
        batch_size: rows per forward pass.
        max_gen_toks: new tokens for generation tasks that set none.
        bootstrap_iters: bootstrap resamples for the standard errors (0: none, fastest).
        apply_chat_template: render each prompt as a conversation with the model's chat template (the harness's
            `--apply_chat_template`; for chat / SFT models): the `chat_template` below, else the Hugging Face
            tokenizer's own, else this project's default format (see HarnessLM).
        fewshot_as_multiturn: with `apply_chat_template`, the few-shot examples as earlier turns of the conversation
            (the harness's default) rather than one user message.
        system_instruction: a system message put before each prompt (null: none).
        chat_template: a Jinja chat template to use instead of the tokenizer's own (null: the tokenizer's).
        compile: decode `generate_until` tasks with the compiled step (`HarnessLM(compile=True)`): one compilation
            per batch size (tens of seconds on a CPU) that long generations earn back (256 tokens a request in
            `benchmarks/results/harness_cpu.txt`: 2.07 s against the eager step's 2.48 s).
    """

    enabled: bool = False
    tasks: tuple[str, ...] = ("lambada_openai",)
    include_path: str | None = None
    include_defaults: bool = True
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    max_gen_toks: int = 256
    bootstrap_iters: int = 0
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    chat_template: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(
                f"`harness.tasks` must be a non-empty list of harness task names, got {list(tasks)}; e.g. "
                "[lambada_openai] or the `task:` names of the YAML files in `harness.include_path`."
            )
        _check_positive("harness", batch_size=self.batch_size, max_gen_toks=self.max_gen_toks)
        if self.limit is not None and not (isinstance(self.limit, (int, float)) and self.limit > 0):
            raise ValueError(
                f"`harness.limit` must be null, a positive count or a fraction in (0, 1), got {self.limit!r}."
            )
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise ValueError(f"`harness.num_fewshot` must be null or an int >= 0, got {self.num_fewshot!r}.")
        for name in ("apply_chat_template", "fewshot_as_multiturn", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`harness.{name}` must be true or false, got {getattr(self, name)!r}.")
        for name in ("system_instruction", "chat_template"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"`harness.{name}` must be null or a string, got {getattr(self, name)!r}.")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise FileNotFoundError(
                f"`harness.include_path`={self.include_path!r} is not a folder; pass the folder holding the task "
                "YAML files."
            )


@dataclass(frozen=True)
class BiasPart:
    """HELM bias over the model's generations for embedded prompts (and toxicity when a scorer is given).

    Demographic representation and stereotypical associations (occupations and adjectives) for gender word lists
    and race name lists, each the total variation distance from uniform as HELM defines it (0 = balanced); see
    lightning_llm.evaluation.bias. Toxicity needs a classifier (HELM calls the Perspective API over the network):
    without `toxicity_scorer` the report says it was not measured.

    Attributes:
        enabled: run this part.
        samples_per_prompt: generations per embedded prompt.
        max_new_tokens: tokens per generation.
        temperature: sampling temperature (0: greedy, one distinct generation per prompt).
        toxicity_scorer: import path 'module:function' of a callable list[str] -> list[float] in [0, 1] (in
            Python also the callable); null: toxicity is not measured.
    """

    enabled: bool = True
    samples_per_prompt: int = 2
    max_new_tokens: int = 24
    temperature: float = 1.0
    toxicity_scorer: Any = None

    def __post_init__(self) -> None:
        _check_positive("bias", samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"`bias.temperature` must be a number >= 0 (0: greedy), got {self.temperature!r}.")


@dataclass(frozen=True)
class EmbeddingsPart:
    """Embeddings as knowledge: analogy accuracy and a linear probe of a token property, beside their chance levels,
    for static (input embedding) and contextual (final hidden state) representations.

    Attributes:
        enabled: run this part.
        analogies: "embedded" (plural, gender and comparative pairs) or a word2vec-format file ('a b c d' per line).
        probe_property: the probed token property: starts_word, is_digit, is_alpha or is_upper.
        probe_tokens: vocabulary tokens in the probe (a seeded sample).
        multi_token: "mean" averages a word's token vectors; "error" treats multi-token words as out of vocabulary.
    """

    enabled: bool = True
    analogies: str = "embedded"
    probe_property: str = "starts_word"
    probe_tokens: int = 1000
    multi_token: str = "mean"

    def __post_init__(self) -> None:
        from lightning_llm.evaluation.embeddings import PROPERTIES

        _check_positive("embeddings", probe_tokens=self.probe_tokens)
        if self.probe_property not in PROPERTIES:
            raise ValueError(
                f"`embeddings.probe_property` must be one of {sorted(PROPERTIES)}, got {self.probe_property!r}."
            )
        if self.multi_token not in ("mean", "error"):
            raise ValueError(f"`embeddings.multi_token` must be 'mean' or 'error', got {self.multi_token!r}.")
        if self.analogies != "embedded" and not Path(self.analogies).expanduser().is_file():
            raise FileNotFoundError(
                f"`embeddings.analogies`={self.analogies!r} does not exist; pass 'embedded' or a text file with "
                "'a b c d' per line."
            )


_P = TypeVar("_P")


def _as_part(cls: type[_P], value: Any, name: str) -> _P:
    """A part's settings as ``cls``: the dataclass itself, a mapping of its fields or a jsonargparse Namespace."""
    if isinstance(value, cls):
        return value
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse.Namespace
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {[f'{name}.{k}' for k in unknown]}; valid keys of `{name}`: {sorted(fields)}."
        )
    return cls(**value)


# ---------------------------------------------------------------------------------------------------- parts
def _texts(cfg: PerplexityPart) -> list[str]:
    if cfg.dataset == "embedded":
        return tasks.embedded_texts(cfg.split)
    path = Path(cfg.dataset).expanduser()
    if path.is_file() and path.suffix in (".txt", ".text", ".md"):
        return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    import datasets

    ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
    return [t for t in ds[cfg.text_column] if t and t.strip()]


def _part_perplexity(lm: LanguageModel, tok: Any, cfg: PerplexityPart, batch_size: int) -> dict[str, Any]:
    texts = _texts(cfg)
    max_length = cfg.max_length if lm.max_length is None else min(cfg.max_length, lm.max_length)
    stride = min(cfg.stride or max_length, max_length)
    out = tasks.text_perplexity(lm, tok, texts, max_length, stride, batch_size, cfg.max_chars)
    lengths = [n for n in cfg.context_lengths if lm.max_length is None or n <= lm.max_length]
    if lengths:
        curve = tasks.perplexity_vs_context(lm, tok, texts, lengths, batch_size, cfg.max_chars)
        out["ppl_vs_context"] = {str(k): v for k, v in curve.items()}
    return out


def _lambada_texts(cfg: LambadaPart) -> tuple[list[str], str]:
    if cfg.path is None:
        return tasks.embedded_cloze_texts(cfg.limit or 200), "embedded_cloze"
    from lightning_llm.data.lambada import LambadaDataModule

    dm = LambadaDataModule(path=cfg.path, max_examples=cfg.limit)
    return dm.load_texts(), cfg.path


def _part_lambada(lm: LanguageModel, tok: Any, cfg: LambadaPart, batch_size: int) -> dict[str, Any]:
    texts, source = _lambada_texts(cfg)
    max_length = cfg.max_length if lm.max_length is None else min(cfg.max_length, lm.max_length)
    out = tasks.evaluate_lambada(lm, tok, texts, max_length, batch_size)
    out["source"] = source
    return out


def _mc_examples(cfg: MultipleChoicePart, seed: int) -> tuple[list[tasks.MultipleChoiceExample], str]:
    if cfg.path is None:
        return tasks.embedded_multiple_choice(cfg.limit or 100, seed=seed), "embedded_sentence_endings"
    examples = tasks.load_multiple_choice(cfg.path, cfg.split, cfg.limit, dataset_config=cfg.dataset_config)
    return examples, cfg.path


def _mc(lm: LanguageModel, tok: Any, examples: list, cfg: MultipleChoicePart, batch_size: int) -> dict[str, Any]:
    return tasks.evaluate_multiple_choice(
        lm,
        tok,
        examples,
        length_normalize=cfg.length_normalize,
        batch_size=batch_size,
        max_length=lm.max_length,
        template=cfg.template,
        num_bins=cfg.num_bins,
    )


def _part_perturbed(
    lm: LanguageModel,
    tok: Any,
    names: tuple[str, ...],
    examples: list,
    base: dict[str, Any],
    cfg: MultipleChoicePart,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracy under each perturbation, HELM's worst case over the original and all perturbed inputs, the drop.

    A question a perturbation leaves unchanged (a sentence with no word to misspell, no pronoun to swap), or turns into
    a text already scored for that example, is not run again: its correctness is the one already computed (the
    original's from ``base``), so each distinct (example, question) text costs one forward, shared by the parts.
    ``scored`` in each perturbation's entry counts the examples it actually ran.
    """
    known = {(i, ex.question): c for i, (ex, c) in enumerate(zip(examples, base["correct"]))}
    worst = list(base["correct"])
    per: dict[str, Any] = {}
    for name in names:
        p = Perturbation(name, seed)
        perturbed = [tasks.MultipleChoiceExample(p(ex.question), ex.choices, ex.answer) for ex in examples]
        changed = sum(a.question != b.question for a, b in zip(examples, perturbed))
        todo = [i for i, ex in enumerate(perturbed) if (i, ex.question) not in known]
        if todo:
            res = _mc(lm, tok, [perturbed[i] for i in todo], cfg, batch_size)
            known.update({(i, perturbed[i].question): c for i, c in zip(todo, res["correct"])})
        correct = [known[i, ex.question] for i, ex in enumerate(perturbed)]
        worst = [min(a, b) for a, b in zip(worst, correct)]
        per[name] = {
            "acc": sum(correct) / len(correct),
            "changed_fraction": changed / len(examples),
            "scored": len(todo),
            "example": perturbed[0].question[:200],
        }
    acc = sum(base["correct"]) / len(base["correct"])
    worst_acc = sum(worst) / len(worst)
    return {"acc": acc, "worst_case_acc": worst_acc, "drop": acc - worst_acc, "perturbations": per}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    return {"peak_memory_mb": rss_mb, "memory_kind": "process_peak_rss"}


def _matmul_peak(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Achievable float32 matmul FLOP/s on ``device`` (the best of ``repeats`` ``n x n`` products)."""
    a = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _part_efficiency(lm: LanguageModel, tok: Any, cfg: EfficiencyPart, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    seq_len = cfg.seq_len if lm.max_length is None else min(cfg.seq_len, lm.max_length)
    ids = torch.randint(0, tok.vocab_size, (cfg.batch_size, seq_len), generator=gen)  # (B, T)
    lm.logits(ids[:1, :8])  # warm-up
    t0, n0 = lm.forward_seconds, lm.forward_tokens
    for _ in range(cfg.repeats):
        lm.logits(ids)
    seconds = lm.forward_seconds - t0
    tokens_per_sec = (lm.forward_tokens - n0) / max(seconds, 1e-12)
    examples = tasks.embedded_multiple_choice(cfg.latency_examples, seed=seed)
    latencies = []
    for ex in examples:
        start = time.perf_counter()
        tasks.evaluate_multiple_choice(lm, tok, [ex], batch_size=len(ex.choices), max_length=lm.max_length)
        latencies.append(time.perf_counter() - start)
    out = {
        "tokens_per_sec": tokens_per_sec,
        "batch_size": cfg.batch_size,
        "seq_len": seq_len,
        "latency_ms_per_example": 1000 * sum(latencies) / len(latencies),
        "device": str(lm.device),
        "num_parameters": lm.num_parameters(),
    }
    fpt = lm.flops_per_token(seq_len)
    if fpt is not None:
        fwd = fpt / 3  # training FLOPs are 3x the forward's
        peak, source = (float(cfg.peak_flops), "given") if cfg.peak_flops else (_matmul_peak(lm.device), "measured")
        tokens = cfg.repeats * cfg.batch_size * seq_len
        out["forward_flops_per_token"] = fwd
        out["forward_flops_per_sec"] = tokens_per_sec * fwd
        out["peak_flops"] = peak
        out["peak_flops_source"] = source
        out["measured_runtime_s"] = seconds
        out["idealized_runtime_s"] = tokens * fwd / peak  # HELM's idealised runtime: tokens x FLOPs / peak
        out["hardware_utilization"] = out["idealized_runtime_s"] / max(seconds, 1e-12)
    out.update(_peak_memory(lm.device))
    return out


@torch.no_grad()
def _generate_texts(lm: LanguageModel, tok: Any, prompts: list[str], max_new: int, temperature: float, seed: int):
    """Continuations of ``prompts`` (our KV-cache decoder for our Transformer, full recomputation otherwise)."""
    from lightning_llm.nn.generation import generate, sample_next
    from lightning_llm.nn.transformer import Transformer

    gen = torch.Generator(device=lm.device).manual_seed(seed)
    ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
    if lm.max_length is not None:
        ids = [x[-max(1, lm.max_length - max_new) :] for x in ids]
    if isinstance(lm.module, Transformer):
        out = generate(lm.module, ids, max_new_tokens=max_new, temperature=temperature, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, generator=gen)  # fmt: skip
        return [tok.decode(r[m.bool()].tolist()) for r, m in zip(out.responses, out.response_mask)]
    texts = []
    for x in ids:  # one prompt at a time, no cache: any ids -> logits module
        seq = list(x)
        for _ in range(max_new):
            logits = lm.logits(torch.tensor([seq]))[:, -1]  # (1, V)
            token, _ = sample_next(logits, temperature, None, None, None if lm.device.type != "cpu" else gen)
            seq.append(int(token))
            if seq[-1] == tok.eos_id:
                break
        texts.append(tok.decode(seq[len(x) :]))
    return texts


def _part_bias(lm: LanguageModel, tok: Any, cfg: BiasPart, seed: int) -> dict[str, Any]:
    from lightning_llm.evaluation import bias

    n = 1 if cfg.temperature == 0 else cfg.samples_per_prompt
    prompts = [p for p in bias.BIAS_PROMPTS for _ in range(n)]
    index = [i for i in range(len(bias.BIAS_PROMPTS)) for _ in range(n)]
    texts = _generate_texts(lm, tok, prompts, cfg.max_new_tokens, float(cfg.temperature), seed)
    out: dict[str, Any] = {}
    for demo, groups in (("gender", bias.GENDER_WORDS), ("race", bias.RACE_NAMES)):
        rep = bias.demographic_representation(texts, groups)
        out[f"{demo}_representation"] = rep["bias"]
        out[f"{demo}_mentions"] = rep["counts"]
        for target, words in (("occupation", bias.OCCUPATIONS), ("adjective", bias.ADJECTIVES)):
            assoc = bias.stereotypical_associations(texts, groups, words)
            out[f"{demo}_{target}_association"] = assoc["bias"]
            out[f"{demo}_{target}_targets_defined"] = assoc["n_targets"]
    if cfg.toxicity_scorer is None:
        out["toxicity"] = (
            "not measured: HELM scores toxicity with the Perspective API (network); set bias.toxicity_scorer to a "
            "local classifier 'module:function' (list[str] -> scores in [0, 1])"
        )
    else:
        scores = list(bias.resolve_scorer(cfg.toxicity_scorer)(list(texts)))
        out["toxicity"] = bias.toxicity_metrics(scores, index)
    out["n_generations"] = len(texts)
    out["definition"] = (
        "TV distance from uniform of size-normalised group word counts (HELM): representation over all "
        "generations, associations per target word (co-occurrence within a generation) averaged; 0 = balanced, "
        "None = no group word generated"
    )
    out["examples"] = [{"prompt": p, "generation": t} for p, t in list(zip(prompts, texts))[:: max(1, n)][:5]]
    return out


def _part_embeddings(lm: LanguageModel, tok: Any, cfg: EmbeddingsPart, seed: int) -> dict[str, Any]:
    from lightning_llm.callbacks.embedding_probe import find_embedding
    from lightning_llm.evaluation.embeddings import load_analogies, probe_embeddings

    analogies = None if cfg.analogies == "embedded" else load_analogies(cfg.analogies)
    weight = find_embedding(lm.module)
    out: dict[str, Any] = probe_embeddings(
        lm.module, tok, weight, analogies, cfg.probe_property, cfg.probe_tokens, cfg.multi_token, seed
    )
    out["definition"] = (
        "analogy: 3CosAdd over the set's words (chance 1/(|W|-3)); probe: 5-fold logistic regression on "
        f"'{cfg.probe_property}' (chance: majority share); static = input embeddings, contextual = final hidden state"
    )
    return out


def _jsonable(value: Any) -> Any:
    """Numbers as floats (numpy scalars included), containers recursively, anything else as its string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _part_harness(lm: LanguageModel, tok: Any, cfg: HarnessPart, seed: int) -> dict[str, Any]:
    """``tok``: the loaded tokenizer (HarnessLM reads a chat template from its ``source`` directory)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lightning_llm.evaluation.harness import HarnessLM

    manager = TaskManager(include_path=cfg.include_path, include_defaults=cfg.include_defaults)
    known = set(manager.all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise ValueError(
            f"`harness.tasks` {unknown} are not harness tasks"
            + (f" nor defined in include_path={cfg.include_path!r}" if cfg.include_path else "")
            + "; check the names (`lm_eval ls tasks`) or the `task:` keys of your YAML files."
        )
    model = HarnessLM(
        lm,
        tokenizer=tok,
        batch_size=cfg.batch_size,
        max_gen_toks=cfg.max_gen_toks,
        seed=seed,
        chat_template=cfg.chat_template,
        compile=cfg.compile,
    )
    chat = {}
    if cfg.apply_chat_template:  # passed only when on: older harness versions refuse multi-turn few-shot without it
        chat = {
            "apply_chat_template": True,
            "fewshot_as_multiturn": cfg.fewshot_as_multiturn,
            "system_instruction": cfg.system_instruction,
        }
    res = lm_eval.simple_evaluate(
        model=model,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        **chat,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=cfg.bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    res = _from_rank_zero(res)  # lm-eval returns the results only where LOCAL_RANK is 0 (None elsewhere)
    return {
        "results": _jsonable(res["results"]),
        "versions": _jsonable(res.get("versions", {})),
        "n_shot": _jsonable(res.get("n-shot", {})),
        "n_samples": {k: int(v.get("effective", v.get("original", 0))) for k, v in res.get("n-samples", {}).items()},
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "chat_template": model.chat_template(True) if cfg.apply_chat_template else None,
    }


def _from_rank_zero(value: Any) -> Any:
    """``value`` of rank 0 on every rank when a multi-process ``torch.distributed`` group is initialised (under
    ``torchrun``, HarnessLM shards the harness's requests across the ranks; every rank then writes the same report)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------------- runner
def _run(parts: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    try:
        result = fn()
        parts[name] = {"status": "ok", **result}
        log(f"[evaluate] {name}: ok ({time.perf_counter() - start:.1f}s)")
    except Exception as err:  # noqa: BLE001 - a failed part is reported, never fatal
        parts[name] = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        log(f"[evaluate] {name}: FAILED {type(err).__name__}: {err}")
    parts[name]["seconds"] = time.perf_counter() - start


def _summary(parts: dict[str, Any]) -> dict[str, float]:
    keys = {
        "perplexity": ("ppl", "bits_per_byte"),
        "lambada": ("acc", "ppl"),
        "multiple_choice": ("acc", "acc_norm"),
        "robustness": ("worst_case_acc", "drop"),
        "fairness": ("worst_case_acc", "drop"),
        "efficiency": (
            "tokens_per_sec",
            "latency_ms_per_example",
            "peak_memory_mb",
            "forward_flops_per_token",
            "idealized_runtime_s",
            "hardware_utilization",
        ),
        "bias": (
            "gender_representation",
            "race_representation",
            "gender_occupation_association",
            "gender_adjective_association",
        ),
        "embeddings": (
            "static/analogy_acc",
            "contextual/analogy_acc",
            "analogy_chance",
            "static/probe_acc",
            "contextual/probe_acc",
            "probe_chance",
        ),
    }
    out: dict[str, float] = {}
    harness = parts.get("harness", {})
    if harness.get("status") == "ok":
        for task, metrics in harness["results"].items():
            for key, value in metrics.items():
                if isinstance(value, float) and "stderr" not in key:
                    out[f"harness/{task}/{key.split(',')[0]}"] = value
    for part, names in keys.items():
        res = parts.get(part, {})
        if res.get("status") != "ok":
            continue
        for key in names:
            if res.get(key) is not None:
                out[f"{part}/{key}"] = float(res[key])
        if part == "multiple_choice":
            for key in ("ece_10_bin", "ece_1_bin", "selective_acc@10"):
                out[f"multiple_choice/{key}"] = float(res["calibration"][key])
    return out


def evaluate(
    model: str | os.PathLike | LogitsModel,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    out: str | os.PathLike | None = "logs/eval",
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    perplexity: PerplexityPart = PerplexityPart(),
    lambada: LambadaPart = LambadaPart(),
    multiple_choice: MultipleChoicePart = MultipleChoicePart(),
    robustness: RobustnessPart = RobustnessPart(),
    fairness: FairnessPart = FairnessPart(),
    efficiency: EfficiencyPart = EfficiencyPart(),
    bias: BiasPart = BiasPart(),
    embeddings: EmbeddingsPart = EmbeddingsPart(),
    harness: HarnessPart = HarnessPart(),
    plots: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the HELM-style evaluation suite on one model and return the report.

    Every part is switched on by default and runs on embedded data (no network). In Python, a part's settings may
    also be given as a dict of its fields (``lambada={"limit": 50}``), so a YAML config loads as keyword arguments.

    Args:
        model: a Hugging Face causal-LM directory, a .ckpt of any lightning_llm module or a sharded checkpoint
            folder (all read by lightning_llm.load_pretrained); in Python also a module (our Transformer, a
            LightningModule holding one, a Hugging Face causal LM) or a LanguageModel.
        tokenizer: a tokenizer directory or Hugging Face name (in Python also a lightning_llm Tokenizer); default:
            the one stored with the model.
        out: directory for report.json, report.md and the PNG plots; null writes nothing.
        device: cpu, cuda, cuda:1...; default: CUDA when available.
        dtype: parameter dtype (bfloat16, float16, float32); default: as stored.
        seed: seeds the embedded tasks, the perturbations and the efficiency batch.
        batch_size: rows per forward pass in the scoring parts.
        perplexity: settings of the perplexity part.
        lambada: settings of the LAMBADA part.
        multiple_choice: settings of the multiple-choice part.
        robustness: settings of the robustness part.
        fairness: settings of the fairness part.
        efficiency: settings of the efficiency part.
        bias: settings of the bias part (HELM demographic representation, stereotypical associations, toxicity hook).
        embeddings: settings of the embeddings-as-knowledge part (analogies, token-property probe).
        harness: settings of the lm-evaluation-harness part (off by default).
        plots: write the PNG plots into `out`.
        verbose: print one line per part and the summary.

    Returns:
        The report: ``{"model", "config", "parts", "summary", "environment"}`` (and ``"files"`` when ``out`` is
        set); ``report["parts"][name]["status"]`` is ``"ok"`` or ``"error"``.
    """
    parts_cfg = {
        "perplexity": _as_part(PerplexityPart, perplexity, "perplexity"),
        "lambada": _as_part(LambadaPart, lambada, "lambada"),
        "multiple_choice": _as_part(MultipleChoicePart, multiple_choice, "multiple_choice"),
        "robustness": _as_part(RobustnessPart, robustness, "robustness"),
        "fairness": _as_part(FairnessPart, fairness, "fairness"),
        "efficiency": _as_part(EfficiencyPart, efficiency, "efficiency"),
        "bias": _as_part(BiasPart, bias, "bias"),
        "embeddings": _as_part(EmbeddingsPart, embeddings, "embeddings"),
        "harness": _as_part(HarnessPart, harness, "harness"),
    }
    _check_positive("evaluate", batch_size=batch_size)
    log = print if verbose else (lambda _msg: None)
    if device is None and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # under torchrun: one GPU per rank
    lm, tokenizer = resolve_model(model, tokenizer, device, dtype)
    if tokenizer is None:
        raise ValueError(
            "`tokenizer` is required: the model carries none. Pass the tokenizer it was trained with (a directory "
            "saved by Tokenizer.save, a Hugging Face tokenizer directory or name, or a Tokenizer object)."
        )
    torch.manual_seed(seed)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    ppl_cfg, lam_cfg, mc_cfg, eff_cfg = (
        parts_cfg[k] for k in ("perplexity", "lambada", "multiple_choice", "efficiency")
    )
    parts: dict[str, Any] = {}
    if ppl_cfg.enabled:
        _run(parts, "perplexity", lambda: _part_perplexity(lm, tokenizer, ppl_cfg, batch_size), log)
    if lam_cfg.enabled:
        _run(parts, "lambada", lambda: _part_lambada(lm, tokenizer, lam_cfg, batch_size), log)
    groups = {g: parts_cfg[g] for g in ("robustness", "fairness") if parts_cfg[g].enabled}
    need_mc = mc_cfg.enabled or bool(groups)
    examples: list = []
    if need_mc:

        def run_mc() -> dict[str, Any]:
            items, source = _mc_examples(mc_cfg, seed)
            examples.extend(items)
            return {**_mc(lm, tokenizer, examples, mc_cfg, batch_size), "source": source}

        _run(parts, "multiple_choice", run_mc, log)
    base = parts.get("multiple_choice", {})
    for group, group_cfg in groups.items():
        if base.get("status") != "ok":
            parts[group] = {"status": "error", "error": "skipped: the multiple-choice part failed", "seconds": 0.0}
            continue
        names = group_cfg.perturbations
        _run(
            parts,
            group,
            lambda n=names: _part_perturbed(lm, tokenizer, n, examples, base, mc_cfg, seed, batch_size),
            log,
        )
    if need_mc and not mc_cfg.enabled:
        parts.pop("multiple_choice", None)
    if eff_cfg.enabled:
        _run(parts, "efficiency", lambda: _part_efficiency(lm, tokenizer, eff_cfg, seed), log)
    if parts_cfg["bias"].enabled:
        _run(parts, "bias", lambda: _part_bias(lm, tokenizer, parts_cfg["bias"], seed), log)
    if parts_cfg["embeddings"].enabled:
        _run(parts, "embeddings", lambda: _part_embeddings(lm, tokenizer, parts_cfg["embeddings"], seed), log)
    if parts_cfg["harness"].enabled:
        _run(parts, "harness", lambda: _part_harness(lm, tokenizer, parts_cfg["harness"], seed), log)
    report = {
        "model": {
            "name": lm.name,
            "kind": lm.kind,
            "num_parameters": lm.num_parameters(),
            "max_length": lm.max_length,
            "device": str(lm.device),
            "tokenizer_vocab_size": tokenizer.vocab_size,
        },
        "config": {
            "seed": seed,
            "batch_size": batch_size,
            "dtype": next((str(p.dtype).removeprefix("torch.") for p in lm.module.parameters()), None),
            **{name: _jsonable(dataclasses.asdict(cfg)) for name, cfg in parts_cfg.items()},
            "plots": plots,
        },
        "parts": parts,
        "summary": _summary(parts),
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if not _is_rank_zero():  # every rank computed the same report (harness requests sharded); rank 0 writes it
        return report
    if out is not None:
        from lightning_llm.evaluation.report import write_report

        paths = write_report(report, out, plots=plots)
        report["files"] = {k: str(v) for k, v in paths.items()}
        log(f"[evaluate] report written to {Path(out) / 'report.md'}")
    if verbose:
        width = max((len(k) for k in report["summary"]), default=0)
        for key, value in report["summary"].items():
            print(f"{key:<{width}}  {value:.4g}")
    return report
