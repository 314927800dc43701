"""``EmbeddingProbe``: the health of the input embedding space, logged while training.

For the embedding matrix ``E`` (V x C; found as ``get_input_embeddings()``, ``wte``, or the largest ``nn.Embedding``):

* norm statistics of the rows: ``norm_mean``, ``norm_std``, ``norm_min``, ``norm_max``;
* ``anisotropy`` = mean cosine similarity of ``n_pairs`` random pairs of distinct rows (Ethayarajh 2019): near 0 for
  an isotropic space, near 1 when all vectors share one direction (a common degeneration);
* ``isotropy`` = ``min_u Z(u) / max_u Z(u)`` with ``Z(u) = sum_v exp(u . e_v)`` over the eigenvectors ``u`` of
  ``E^T E`` taken with both signs (Mu & Viswanath 2018, "All-but-the-top"): 1 for a perfectly isotropic space, near 0 for a degenerate one;
* nearest neighbours (cosine) of chosen tokens, logged as text (W&B / TensorBoard / MLflow, and
  ``<log_dir>/embedding_probe.txt``);
* embeddings as knowledge (:mod:`lightning_llm.evaluation.embeddings`), with ``knowledge=True`` and a tokenizer (the
  module's or the datamodule's by default): ``analogy_acc`` (3CosAdd on the embedded or a given analogy set) and
  ``probe_acc`` (cross-validated logistic probe of a token property), each for ``static`` (input embedding) and
  ``contextual`` (final hidden state) representations, beside ``analogy_chance`` and ``probe_chance``.

Notation: V vocabulary rows, C width, P pairs, k neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_llm.callbacks._utils import PeriodicCallback, check_every, log_text, resolve_tokenizer


def find_embedding(module: nn.Module) -> torch.Tensor:
    """The input embedding matrix ``(V, C)`` of ``module``."""
    getter = getattr(module, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        if isinstance(emb, nn.Embedding):
            return emb.weight
    for path in ("wte", "model.wte", "embedding", "model.embedding", "tok_embeddings", "model.tok_embeddings"):
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Embedding):
            return obj.weight
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError(
            f"{type(module).__name__} has no nn.Embedding; pass `embedding_fn=lambda module: weight (V, C)` to "
            "EmbeddingProbe."
        )
    return max(embeddings, key=lambda m: m.num_embeddings).weight


@torch.no_grad()
def embedding_stats(weight: torch.Tensor, n_pairs: int = 10000, seed: int = 0) -> dict[str, float]:
    """Norm statistics, anisotropy (mean random-pair cosine) and isotropy (partition-function ratio) of ``(V, C)``."""
    w = weight.detach().float().cpu()
    if w.dim() != 2 or w.shape[0] < 2:
        raise ValueError(f"`weight` must be a (V, C) matrix with V >= 2, got shape {tuple(weight.shape)}.")
    norms = w.norm(dim=1)  # (V,)
    gen = torch.Generator().manual_seed(seed)
    v = w.shape[0]
    i = torch.randint(0, v, (n_pairs,), generator=gen)  # (P,)
    j = (i + torch.randint(1, v, (n_pairs,), generator=gen)) % v  # (P,) never equal to i
    cos = F.cosine_similarity(w[i], w[j], dim=1)  # (P,)
    w64 = w.double()
    _, eigvecs = torch.linalg.eigh(w64.T @ w64)  # (C, C) columns are eigenvectors
    directions = torch.cat([eigvecs, -eigvecs], dim=1)  # (C, 2C): both signs, so the result is sign-invariant
    log_z = torch.logsumexp(w64 @ directions, dim=0)  # (2C,) log Z(u) per direction
    return {
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()),
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
        "anisotropy": float(cos.mean()),
        "isotropy": float(torch.exp(log_z.min() - log_z.max())),
    }


@torch.no_grad()
def nearest_neighbours(weight: torch.Tensor, ids: Sequence[int], k: int = 5) -> list[list[tuple[int, float]]]:
    """For each id, the ``k`` other rows of highest cosine similarity, as ``(id, cosine)``."""
    w = F.normalize(weight.detach().float().cpu(), dim=1)  # (V, C)
    query = w[torch.as_tensor(list(ids), dtype=torch.long)]  # (n, C)
    sims = query @ w.T  # (n, V)
    sims[torch.arange(len(ids)), torch.as_tensor(list(ids))] = float("-inf")  # exclude the token itself
    top = sims.topk(min(k, w.shape[0] - 1), dim=1)
    return [[(int(i), float(s)) for i, s in zip(idx, val)] for idx, val in zip(top.indices, top.values)]


class EmbeddingProbe(PeriodicCallback):
    """Log embedding-space health every ``every_n_steps`` steps.

    Args:
        every_n_steps: period in training steps.
        tokens: tokens whose nearest neighbours are logged: strings (need ``tokenizer``) or ids.
        tokenizer: encodes string tokens (first id of ``encode(token)``) and decodes neighbours.
        k: neighbours per token.
        n_pairs: random pairs for the anisotropy.
        embedding_fn: ``module -> (V, C)`` weight, for models where the embedding is not found automatically.
        prefix: log-key prefix.
        seed: pair-sampling seed (the same pairs at every step, so the curve is comparable).
        knowledge: also log analogy accuracy and the token-property probe (static and contextual).
        analogies: "embedded" or a word2vec-format file ('a b c d' per line).
        probe_property: the probed token property: starts_word, is_digit, is_alpha or is_upper.
        probe_tokens: vocabulary tokens in the probe (a seeded sample).
        multi_token: "mean" averages a word's token vectors; "error" treats multi-token words as out of vocabulary.
        on_validation_end: also probe after every validation (``every_n_steps`` may then be None).

    Attributes:
        history: ``[(step, stats)]``; ``last_neighbours``: the last neighbour table as text.
    """

    def __init__(
        self,
        every_n_steps: int | None = 500,
        tokens: Sequence[str | int] = (),
        tokenizer: Any = None,
        k: int = 5,
        n_pairs: int = 10000,
        embedding_fn: Callable[[nn.Module], torch.Tensor] | None = None,
        prefix: str = "embedding",
        seed: int = 0,
        knowledge: bool = False,
        analogies: str = "embedded",
        probe_property: str = "starts_word",
        probe_tokens: int = 1000,
        multi_token: str = "mean",
        on_validation_end: bool = False,
    ) -> None:
        from lightning_llm.evaluation.embeddings import PROPERTIES, load_analogies

        check_every("every_n_steps", every_n_steps)
        check_every("probe_tokens", probe_tokens)
        if probe_property not in PROPERTIES:
            raise ValueError(f"`probe_property` must be one of {sorted(PROPERTIES)}, got {probe_property!r}.")
        if multi_token not in ("mean", "error"):
            raise ValueError(f"`multi_token` must be 'mean' or 'error', got {multi_token!r}.")
        self.analogies = None if analogies == "embedded" else load_analogies(analogies)  # a missing file fails here
        self.knowledge, self.probe_property, self.on_val_end = knowledge, probe_property, on_validation_end
        self.probe_tokens, self.multi_token = probe_tokens, multi_token
        self.every_n_steps, self.prefix, self.seed = every_n_steps, prefix, seed
        self.tokens, self.tokenizer, self.k = list(tokens), tokenizer, k
        self.n_pairs = n_pairs
        self.embedding_fn = embedding_fn or find_embedding
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last_neighbours = ""

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = resolve_tokenizer(self.tokenizer, trainer, pl_module, "EmbeddingProbe")
        return self.tokenizer

    def _ids(self) -> list[int]:
        ids = []
        for t in self.tokens:
            if isinstance(t, str):
                enc = self.tokenizer.encode(t)
                if not enc:
                    raise ValueError(f"token {t!r} encodes to no id.")
                ids.append(enc[0])
            else:
                ids.append(int(t))
        return ids

    def _name(self, i: int) -> str:
        if self.tokenizer is None:
            return str(i)
        return repr(self.tokenizer.decode([i]))

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute, log and return the statistics now."""
        weight = self.embedding_fn(pl_module)
        stats = embedding_stats(weight, self.n_pairs, self.seed)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.prefix}/{k}": v for k, v in stats.items()}, step=step)
        if self.knowledge:
            from lightning_llm.evaluation.embeddings import probe_embeddings

            know = probe_embeddings(pl_module, self._tokenizer(trainer, pl_module), weight, self.analogies,
                                    self.probe_property, self.probe_tokens, self.multi_token, self.seed)  # fmt: skip
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.prefix}/{k}": v for k, v in know.items()}, step=step)
            stats = {**stats, **know}
        self.history.append((step, stats))
        if self.tokens:
            if any(isinstance(t, str) for t in self.tokens):
                self._tokenizer(trainer, pl_module)
            ids = self._ids()
            rows = nearest_neighbours(weight, ids, self.k)
            lines = [
                f"{self._name(i)}: " + ", ".join(f"{self._name(j)} ({s:.2f})" for j, s in row)
                for i, row in zip(ids, rows)
            ]
            self.last_neighbours = "\n".join(lines)
            log_text(trainer, f"{self.prefix}/neighbours", self.last_neighbours, step)
        return stats

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_val_end and not trainer.sanity_checking:
            self.run_once(trainer, pl_module)

    def on_due_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe(trainer, pl_module)
