"""Embeddings as knowledge: analogy accuracy and a linear probe of a token property, each beside its chance level,
for static (input embedding) and contextual (final hidden state) representations.

* **Analogies** (Mikolov et al. 2013, 3CosAdd): for ``a : b :: c : d`` the prediction is the word ``w`` of the set's
  vocabulary ``W`` (``a``, ``b``, ``c`` excluded) maximising ``cos(w, b - a + c)``; accuracy = share of questions with
  ``w = d``; chance = mean of ``1 / (|W| - 3)`` (a uniform guess among the candidates). A word's static vector is
  the mean of the input-embedding rows of its tokens (``" " + word``); its contextual vector the model's final hidden
  state after reading ``[prefix] + tokens``.
* **Linear probe**: is a token property linearly decodable from its representation? Logistic regression (L2, C=1,
  standardised features, scikit-learn's objective, solved in torch) scored by stratified k-fold cross-validated
  accuracy over a seeded sample of the vocabulary; chance = the majority-class share (always predicting the commonest label). Properties:
  ``starts_word`` (the token's text begins with a space: a word start in byte-level BPE), ``is_digit``, ``is_alpha``,
  ``is_upper``.

Out-of-vocabulary words (encoding to the unknown token, or, with ``multi_token="error"``, to more than one token)
are a clear ``ValueError`` listing them.

Notation: V vocabulary, C width, N probed tokens, Q analogy questions, W analogy vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "EMBEDDED_ANALOGY_PAIRS",
    "PROPERTIES",
    "analogy_accuracy",
    "embedded_analogies",
    "hidden_fn_for",
    "linear_probe",
    "fit_logistic",
    "load_analogies",
    "probe_embeddings",
    "stratified_folds",
    "token_property_labels",
    "word_token_ids",
]

#: relation -> word pairs; every two pairs of one relation make an analogy question (both orders)
EMBEDDED_ANALOGY_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "plural": (("file", "files"), ("list", "lists"), ("value", "values"), ("object", "objects"),
               ("function", "functions"), ("module", "modules"), ("string", "strings"), ("type", "types"),
               ("method", "methods"), ("line", "lines"), ("name", "names"), ("key", "keys"), ("error", "errors"),
               ("item", "items")),
    "gender": (("man", "woman"), ("king", "queen"), ("he", "she"), ("his", "her"), ("boy", "girl"),
               ("father", "mother")),
    "comparative": (("big", "bigger"), ("small", "smaller"), ("long", "longer"), ("fast", "faster"),
                    ("large", "larger"), ("high", "higher")),
}  # fmt: skip

PROPERTIES: dict[str, Callable[[str], bool]] = {
    "starts_word": lambda s: s[:1].isspace(),
    "is_digit": lambda s: s.strip().isdigit(),
    "is_alpha": lambda s: s.strip().isalpha(),
    "is_upper": lambda s: s.strip().isupper(),
}


def embedded_analogies() -> list[tuple[str, str, str, str]]:
    """The embedded analogy questions: ``(a, b, c, d)`` for every ordered pair of distinct pairs of a relation."""
    out = []
    for pairs in EMBEDDED_ANALOGY_PAIRS.values():
        for a, b in pairs:
            for c, d in pairs:
                if a != c:
                    out.append((a, b, c, d))
    return out


def load_analogies(path: str | Path) -> list[tuple[str, str, str, str]]:
    """Analogies from a text file in the word2vec format: ``a b c d`` per line, ``: section`` lines ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"`analogies`={str(path)!r} does not exist; pass a text file with 'a b c d' per line (word2vec's "
            "questions-words.txt format) or 'embedded'."
        )
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith(":"):
            continue
        words = line.split()
        if len(words) != 4:
            raise ValueError(f"{path}:{n}: expected 4 words 'a b c d', got {line!r}.")
        out.append(tuple(w.lower() for w in words))  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"{path} holds no analogy question.")
    return out


def word_token_ids(
    tokenizer: Any, words: Sequence[str], multi_token: Literal["mean", "error"] = "mean"
) -> dict[str, list[int]]:
    """Token ids of each word (as ``" " + word``, a word inside a sentence); raises on out-of-vocabulary words."""
    unk = None
    backend = getattr(tokenizer, "backend", None)
    model = getattr(backend, "model", None)
    unk_token = getattr(model, "unk_token", None)
    if unk_token:
        unk = tokenizer.token_to_id(unk_token)
    out, oov, multi = {}, [], []
    for w in dict.fromkeys(words):
        ids = tokenizer.encode(" " + w)
        if not ids or (unk is not None and unk in ids):
            oov.append(w)
        elif len(ids) > 1 and multi_token == "error":
            multi.append(w)
        out[w] = ids
    if oov or multi:
        raise ValueError(
            "the probe set has out-of-vocabulary words: "
            + (f"{oov[:10]} encode to the unknown token or to nothing" if oov else "")
            + ("; " if oov and multi else "")
            + (f"{multi[:10]} are not single tokens (multi_token='error')" if multi else "")
            + f" ({len(oov) + len(multi)} of {len(out)} words). Fix: drop them from the set, use a tokenizer that "
            "covers them, or set multi_token='mean' to average a word's token vectors."
        )
    return out


@torch.no_grad()
def analogy_accuracy(vectors: dict[str, torch.Tensor], questions: Sequence[tuple[str, str, str, str]]) -> dict:
    """3CosAdd accuracy with the words of ``vectors`` as the candidates, and its chance level (module docstring).

    Example:
        >>> v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([-1.0, 0.0]),
        ...      "d": torch.tensor([-1.0, 1.0]), "e": torch.tensor([0.0, -1.0])}
        >>> analogy_accuracy(v, [("a", "b", "c", "d")])  # b - a + c = (-1, 1) = d; candidates d, e: chance 1/2
        {'accuracy': 1.0, 'chance': 0.5, 'questions': 1, 'vocabulary': 5}
    """
    if not questions:
        raise ValueError("`questions` is empty: nothing to score.")
    missing = sorted({w for q in questions for w in q if w not in vectors})
    words = sorted(vectors)
    if missing:
        raise ValueError(f"no vector for {missing[:10]}; every analogy word needs one.")
    if len(words) < 4:
        raise ValueError(f"the analogy vocabulary has {len(words)} words; at least 4 are needed.")
    index = {w: i for i, w in enumerate(words)}
    mat = F.normalize(torch.stack([vectors[w].float() for w in words]), dim=1)  # (W, C)
    q = torch.tensor([[index[w] for w in quad] for quad in questions])  # (Q, 4)
    target = F.normalize(mat[q[:, 1]] - mat[q[:, 0]] + mat[q[:, 2]], dim=1)  # (Q, C)
    sims = target @ mat.T  # (Q, W)
    rows = torch.arange(len(questions))
    for col in range(3):
        sims[rows, q[:, col]] = float("-inf")  # a, b, c are not candidates
    correct = (sims.argmax(dim=1) == q[:, 3]).double()
    return {
        "accuracy": float(correct.mean()),
        "chance": 1.0 / (len(words) - 3),
        "questions": len(questions),
        "vocabulary": len(words),
    }


def token_property_labels(tokenizer: Any, ids: Sequence[int], prop: str) -> torch.Tensor:
    """``(N,)`` 0/1 labels of ``prop`` (see :data:`PROPERTIES`) for the tokens ``ids`` (decoded one at a time)."""
    if prop not in PROPERTIES:
        raise ValueError(f"`property` must be one of {sorted(PROPERTIES)}, got {prop!r}.")
    fn = PROPERTIES[prop]
    return torch.tensor([int(fn(tokenizer.decode([int(i)]))) for i in ids])


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint index sets, each class's (seeded, shuffled) members dealt round-robin across them."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    k = 0
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        for i in members[torch.randperm(members.numel(), generator=gen)].tolist():
            parts[k % folds].append(i)
            k += 1
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 500) -> tuple[torch.Tensor, ...]:
    """Binary logistic regression with scikit-learn's objective ``C * sum(log-loss) + ||w||^2 / 2`` (intercept not
    penalised), solved with L-BFGS in float64: ``(w (C,), b ())``."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(features: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of a logistic-regression probe ``features (N, C) -> 0/1 labels (N,)`` (features
    standardised on each training fold; C = 1), and chance (the majority-class share). Plain torch, no scikit-learn
    (the tests compare it with scikit-learn's ``LogisticRegression`` on the same folds).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]] * 2)
        >>> linear_probe(x, torch.tensor([0, 0, 0, 1, 1, 1] * 2), folds=2)  # separable: 1.0; chance 6/12
        {'accuracy': 1.0, 'chance': 0.5, 'n': 12}
    """
    y = labels.long().cpu()
    if y.dim() != 1 or y.numel() != features.shape[0] or (y.numel() and not bool(((y == 0) | (y == 1)).all())):
        raise ValueError(f"`labels` must be N = {features.shape[0]} zeros and ones, got shape {tuple(y.shape)}.")
    counts = torch.bincount(y, minlength=2)
    chance = float(counts.max()) / y.numel()
    if int(counts.min()) < folds:
        return {"accuracy": float("nan"), "chance": chance, "n": y.numel()}  # one class, or too few of one to fold
    x = features.detach().double().cpu()
    hits = 0
    for test in stratified_folds(y, folds, seed):
        train = torch.ones(y.numel(), dtype=torch.bool)
        train[test] = False
        mean, std = x[train].mean(0), x[train].std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        w, b = fit_logistic((x[train] - mean) / std, y[train])
        pred = (((x[test] - mean) / std) @ w + b) > 0
        hits += int((pred.long() == y[test]).sum())
    return {"accuracy": hits / y.numel(), "chance": chance, "n": y.numel()}


def hidden_fn_for(module: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``ids (B, T) -> final hidden states (B, T, C)`` for our Transformer (``return_hidden``) or a Hugging Face
    model (``output_hidden_states``), found inside a LightningModule; None for other modules."""
    from lightning_llm.evaluation.lm import _network
    from lightning_llm.nn.transformer import Transformer

    net = _network(module)
    if isinstance(net, Transformer):
        return lambda ids: net(ids, return_hidden=True)
    if hasattr(getattr(net, "config", None), "model_type"):
        return lambda ids: net(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return None


@torch.no_grad()
def _contextual(hidden_fn: Callable, rows: list[list[int]], device: torch.device, batch: int = 64) -> torch.Tensor:
    """Final hidden state at the last token of each row (right-padded batches): ``(N, C)``."""
    out = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T) right-padded: causal, pads never read
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        h = hidden_fn(ids.to(device))  # (B, T, C)
        last = torch.tensor([len(r) - 1 for r in chunk], device=h.device)
        out.append(h[torch.arange(len(chunk), device=h.device), last].float().cpu())  # (B, C)
    return torch.cat(out)


@torch.no_grad()
def probe_embeddings(
    module: Any,
    tokenizer: Any,
    weight: torch.Tensor,
    analogies: Sequence[tuple[str, str, str, str]] | None = None,
    prop: str = "starts_word",
    max_tokens: int = 2000,
    multi_token: Literal["mean", "error"] = "mean",
    seed: int = 0,
) -> dict[str, float]:
    """Analogy accuracy and the token-property probe, with chance levels, for static and contextual representations.

    Args:
        module: the model (a LightningModule holding our Transformer, the Transformer, a Hugging Face model); the
            contextual numbers are left out when no hidden states can be read from it.
        tokenizer: the model's tokenizer.
        weight: the input embedding matrix ``(V, C)``.
        analogies: questions; default :func:`embedded_analogies`.
        prop: the token property of the linear probe (:data:`PROPERTIES`).
        max_tokens: vocabulary tokens probed (a seeded sample).
        multi_token: "mean" averages a word's token vectors; "error" makes multi-token words out of vocabulary.
        seed: the sample and the cross-validation folds.

    Returns:
        ``{"static/analogy_acc", "analogy_chance", "static/probe_acc", "probe_chance", "contextual/..."}``.
    """
    questions = list(analogies) if analogies is not None else embedded_analogies()
    words = sorted({w for q in questions for w in q})
    word_ids = word_token_ids(tokenizer, words, multi_token)
    w = weight.detach().float().cpu()  # (V, C)
    prefix = getattr(tokenizer, "bos_id", None)
    prefix = tokenizer.eos_id if prefix is None else prefix
    hidden_fn = hidden_fn_for(module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    out: dict[str, float] = {}
    static = {x: w[ids].mean(dim=0) for x, ids in word_ids.items()}
    res = analogy_accuracy(static, questions)
    out["static/analogy_acc"], out["analogy_chance"] = res["accuracy"], res["chance"]
    gen = torch.Generator().manual_seed(seed)
    v = min(w.shape[0], tokenizer.vocab_size)
    ids = torch.randperm(v, generator=gen)[: min(max_tokens, v)].tolist()
    labels = token_property_labels(tokenizer, ids, prop)
    res = linear_probe(w[ids], labels, seed=seed)
    out["static/probe_acc"], out["probe_chance"] = res["accuracy"], res["chance"]
    if hidden_fn is not None:
        was = module.training
        module.eval()
        try:
            vecs = _contextual(hidden_fn, [[prefix, *word_ids[x]] for x in words], device)
            out["contextual/analogy_acc"] = analogy_accuracy(dict(zip(words, vecs)), questions)["accuracy"]
            feats = _contextual(hidden_fn, [[prefix, i] for i in ids], device)
            out["contextual/probe_acc"] = linear_probe(feats, labels, seed=seed)["accuracy"]
        finally:
            module.train(was)
    return out
