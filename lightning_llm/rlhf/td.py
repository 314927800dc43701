"""Temporal-difference learning, TD(0), as plain functions: the bootstrapped update behind GAE and PPO's critic.

The TD(0) update of a state value (Sutton and Barto, *Reinforcement Learning: An Introduction*, 2nd ed., eq. 6.2)::

    V(s) <- V(s) + alpha * [r + gamma * V(s') - V(s)]          (V(terminal) = 0)

``delta = r + gamma V(s') - V(s)`` is the TD error; ``r + gamma V(s')`` the TD(0) target. A value *network* is
trained on the same target, held fixed (no gradient through ``V(s')``): :func:`td0_targets` builds the targets for a
batch of transitions. GAE with ``lam = 0`` (:func:`~lightning_llm.rlhf.advantages.gae`) gives the same TD errors as
advantages.

The worked example is Sutton and Barto's random walk (Example 6.2): states ``A..E`` between two terminals, start at
``C``, each step left or right with probability 1/2, reward 1 on reaching the right end and 0 elsewhere, no discount.
The true values are ``1/6, 2/6, 3/6, 4/6, 5/6`` (:data:`RANDOM_WALK_TRUE_VALUES`).

Notation: ``V`` a 1-D tensor of state values, ``s`` a state index, ``r`` reward, ``gamma`` discount, ``alpha`` step
size, B a batch of transitions.
"""

from __future__ import annotations

import torch

from lightning_llm.rlhf._validation import check_float, check_range, check_same_shape

__all__ = [
    "RANDOM_WALK_TRUE_VALUES",
    "random_walk_episode",
    "random_walk_td0",
    "td0_error",
    "td0_targets",
    "td0_update_",
]

#: True state values of the 5-state random walk (states A..E).
RANDOM_WALK_TRUE_VALUES = torch.arange(1, 6, dtype=torch.float64) / 6


def td0_error(value: float, reward: float, next_value: float, gamma: float = 1.0, terminal: bool = False) -> float:
    """TD error ``delta = r + gamma * V(s') - V(s)`` (``V(s') = 0`` when ``s'`` is terminal)."""
    return reward + (0.0 if terminal else gamma * next_value) - value


def td0_update_(
    values: torch.Tensor,
    state: int,
    reward: float,
    next_state: int | None,
    alpha: float,
    gamma: float = 1.0,
) -> float:
    """Tabular TD(0) in place: ``V[s] += alpha * (r + gamma * V[s'] - V[s])``; ``next_state=None`` is terminal.

    Args:
        values: 1-D float tensor of state values, updated in place.
        state: index of ``s``.
        reward: reward of the transition ``s -> s'``.
        next_state: index of ``s'``, or ``None`` when the episode ended (``V(terminal) = 0``).
        alpha: step size in (0, 1].
        gamma: discount in [0, 1].

    Returns:
        The TD error ``delta`` (before the update).

    Example:
        >>> v = torch.tensor([0.5, 0.5])
        >>> td0_update_(v, 1, 1.0, None, alpha=0.1)  # 1 + 0 - 0.5
        0.5
        >>> round(float(v[1]), 4)
        0.55
    """
    fn = "td0_update_"
    check_float(fn, "values", values, ndim=1)
    alpha = check_range(fn, "alpha", alpha, 0.0, 1.0, low_inclusive=False)
    gamma = check_range(fn, "gamma", gamma, 0.0, 1.0)
    n = values.shape[0]
    for name, s in (("state", state), ("next_state", next_state)):
        if s is not None and not (isinstance(s, int) and 0 <= s < n):
            raise ValueError(f"{fn}: `{name}` must be an int in [0, {n}) (or None for terminal), got {s!r}.")
    next_value = 0.0 if next_state is None else float(values[next_state])
    delta = td0_error(float(values[state]), float(reward), next_value, gamma, terminal=next_state is None)
    values[state] += alpha * delta
    return delta


def td0_targets(
    rewards: torch.Tensor, next_values: torch.Tensor, dones: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """TD(0) targets ``r + gamma * V(s') * (1 - done)`` for a value network, detached (a fixed regression target).

    Train with ``0.5 * (V(s) - target)^2``; its gradient step is the TD(0) update ``V(s) += alpha * delta``.

    Args:
        rewards: ``(B,)`` (or any shape) rewards.
        next_values: same shape, ``V(s')`` from the value network.
        dones: same shape, bool (or 0/1): True where ``s'`` is terminal.
        gamma: discount in [0, 1].

    Returns:
        Targets of ``rewards``' shape, without gradient.
    """
    fn = "td0_targets"
    check_float(fn, "rewards", rewards)
    check_float(fn, "next_values", next_values)
    check_same_shape(fn, rewards=rewards, next_values=next_values, dones=dones)
    gamma = check_range(fn, "gamma", gamma, 0.0, 1.0)
    with torch.no_grad():
        alive = 1.0 - dones.to(rewards.dtype)
        return rewards + gamma * next_values.detach().to(rewards.dtype) * alive


def random_walk_episode(
    generator: torch.Generator | None = None, num_states: int = 5
) -> list[tuple[int, float, int | None]]:
    """One episode of the random walk as ``(s, r, s')`` transitions (``s' = None`` at either end), from the middle."""
    s = num_states // 2
    steps = []
    while True:
        move = 1 if float(torch.rand((), generator=generator)) < 0.5 else -1
        nxt = s + move
        if nxt < 0:
            steps.append((s, 0.0, None))
            return steps
        if nxt >= num_states:
            steps.append((s, 1.0, None))
            return steps
        steps.append((s, 0.0, nxt))
        s = nxt


def random_walk_td0(
    num_episodes: int = 100, alpha: float = 0.1, init: float = 0.5, seed: int = 0, num_states: int = 5
) -> tuple[torch.Tensor, list[float]]:
    """Tabular TD(0) on the random walk: the final values and the RMS error against the true values per episode.

    Args:
        num_episodes: episodes of experience.
        alpha: step size (Sutton and Barto plot 0.05, 0.1, 0.15; smaller is slower but less noisy).
        init: initial value of every state (0.5 in the book).
        seed: seed of the walk.
        num_states: 5 in the book (true values ``i / (n + 1)``).

    Returns:
        ``(values, rms)``: ``(num_states,)`` float64 values, and the RMS error after each episode.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.full((num_states,), float(init), dtype=torch.float64)
    true = torch.arange(1, num_states + 1, dtype=torch.float64) / (num_states + 1)
    rms = []
    for _ in range(num_episodes):
        for s, r, s_next in random_walk_episode(g, num_states):
            td0_update_(values, s, r, s_next, alpha)
        rms.append(float((values - true).square().mean().sqrt()))
    return values, rms
