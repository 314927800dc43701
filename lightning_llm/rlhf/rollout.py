"""The experience of one rollout as a dataclass (plain torch): what PPO-style methods sample, score and train on."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # Python >= 3.11
    from typing import Self

__all__ = ["GroupRollout", "Rollout", "select_rows"]


class _Rows:
    """What the rollout dataclasses share: rows of ``sequences`` ``(B, P + N)``, prompts of ``prompt_length`` P."""

    @property
    def responses(self) -> torch.Tensor:
        """``(B, N)`` the generated tokens."""
        return self.sequences[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: torch.Tensor) -> Self:
        """Rows ``idx`` of every per-row field."""
        return select_rows(self, idx)


@dataclass
class Rollout(_Rows):
    """One batch of experience (all tensors are detached).

    Attributes:
        sequences: ``(B, P + N)`` left-padded prompts then responses; ``attention_mask`` the same shape.
        prompt_length: P. ``response_mask``: ``(B, N)`` bool, True on generated tokens up to and including EOS.
        logprobs, ref_logprobs, values: ``(B, N)`` under the sampling policy, the reference, the value model.
        scores: ``(B,)`` sequence scores (after the missing-EOS penalty). ``rewards``, ``kl``: ``(B, N)`` from
        :func:`kl_penalized_rewards`. ``advantages`` (whitened), ``returns``: ``(B, N)`` from :func:`gae`.
        raw_scores: ``(B,)`` before the penalty. ``finished``: ``(B,)`` True where EOS was emitted.
        prompts, completions: the texts (when a tokenizer is known).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    finished: torch.Tensor
    entropy: torch.Tensor
    prompts: list[str]
    completions: list[str]


def select_rows(rollout, idx: torch.Tensor):
    """A copy of a rollout dataclass with rows ``idx`` of every per-row field (tensors with a batch axis, lists);
    scalars and ``None`` are kept."""
    out = {}
    for f in fields(rollout):
        v = getattr(rollout, f.name)
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            out[f.name] = v[idx.to(v.device)]
        elif isinstance(v, list):
            out[f.name] = [v[i] for i in idx.tolist()]
        else:
            out[f.name] = v
    return type(rollout)(**out)


@dataclass
class GroupRollout(_Rows):
    """One generation batch of a critic-free method (GRPO, RLOO): ``G`` completions of each prompt, detached.

    Rows are laid out in consecutive groups (TRL's ``repeat_interleave`` order): rows ``[0, G)`` answer prompt 0.

    Attributes:
        sequences: ``(B * G, P + N)`` left-padded prompts then completions; ``attention_mask`` the same shape.
        prompt_length: P. ``completion_mask``: ``(B * G, N)`` bool, True on generated tokens up to and including EOS.
        loss_mask: ``completion_mask`` with truncated completions' rows cleared when ``mask_truncated_completions``.
        old_logprobs: ``(B * G, N)`` under the sampling policy, or ``None`` (then the loss uses ``logp.detach()``).
        ref_logprobs: ``(B * G, N)`` under the reference, or ``None`` (``beta == 0``).
        rewards: ``(B * G,)`` weighted sum of the reward functions (and the reward model).
        rewards_per_function: ``(B * G, F)`` each reward function's values (and the reward model's last).
        advantages: ``(B * G,)``.
        finished: ``(B * G,)`` True where EOS was emitted (else the completion was truncated).
        prompts, completions: the texts.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    rewards: torch.Tensor
    rewards_per_function: torch.Tensor
    advantages: torch.Tensor
    finished: torch.Tensor
    prompts: list[str]
    completions: list[str]

    @property
    def completions_ids(self) -> torch.Tensor:
        return self.responses
