"""Embedded synthetic RLHF tasks: generated deterministically in code (no files, no network).

The "letters" world, shared by the reward-model, DPO and PPO quickstarts:

* a prompt is 3-6 random letters from ``a..h`` followed by ``">"`` (e.g. ``"cbfg>"``);
* a completion is a string of letters; its **score** is the number of target letters (``"a"``) it contains;
* a preference pair is two completions of the same length whose scores differ by at least ``min_gap``; the chosen
  one has more target letters, and ``margin = (score_chosen - score_rejected) / length``;
* the PPO reward :class:`TargetCharReward` is the fraction of the completion budget filled with the target letter,
  so its maximum is exactly 1.0 (``length`` target letters), which makes "how much of the gap to the maximum was
  closed" measurable;
* the verifiable task of GRPO / RLOO (:class:`LetterShiftReward`): answer the letter ``shift`` places after the
  prompt's last letter (cyclic in ``a..h``, so ``"cbfg>"`` -> ``"h"`` for shift 1), checked exactly: reward 1.0 for
  the exact answer, partial credit for the matching positions, 0 for anything else.

The tokenizer is character level (:func:`char_tokenizer`), built with Hugging Face ``tokenizers`` from a FIXED
character set, so two data modules (preference data for the reward model, prompts for PPO) build identical
tokenizers and a reward-model checkpoint is compatible with a PPO policy by construction.

Notation: L completion length (characters = tokens), k number of target letters in a completion.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lightning_llm.data.tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "SYNTHETIC_ALPHABET",
    "SYNTHETIC_CHARS",
    "LetterShiftReward",
    "TargetCharReward",
    "UNK_TOKEN",
    "char_tokenizer",
    "letter_shift_answer",
    "synthetic_preference_examples",
    "synthetic_prompts",
]

#: Letters used by the synthetic tasks.
SYNTHETIC_ALPHABET = "abcdefgh"
#: Every character the synthetic tasks produce (letters, the prompt separator ``">"`` and a space for chat text).
SYNTHETIC_CHARS = SYNTHETIC_ALPHABET + "> \n:"
UNK_TOKEN = "<unk>"


def char_tokenizer(texts: Iterable[str] | None = None, chars: str | None = None) -> Tokenizer:
    """A character-level tokenizer: ``<|endoftext|>`` (id 0, eos and pad), ``<unk>`` (id 1), then one id per character.

    Args:
        texts: build the character set from these texts (sorted set of their characters), unioned with ``chars``.
        chars: an explicit character set; default :data:`SYNTHETIC_CHARS` when ``texts`` is ``None``.

    Returns:
        A :class:`~lightning_llm.data.tokenizer.Tokenizer` whose ``decode`` concatenates characters. The vocabulary
        depends only on the character set, so the same set always gives the same ids.
    """
    charset = set(chars if chars is not None else ("" if texts is not None else SYNTHETIC_CHARS))
    if texts is not None:
        if isinstance(texts, str):
            raise TypeError(
                "char_tokenizer: `texts` must be an iterable of strings, got a single str; wrap it: [text]."
            )
        for text in texts:
            charset.update(text)
    if not charset:
        raise ValueError("char_tokenizer: empty character set; pass non-empty `texts` or `chars`.")
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    for c in sorted(charset):
        vocab[c] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS_TOKEN, UNK_TOKEN])
    return Tokenizer(tok, eos_id=0, name=f"char-{len(vocab)}")


def _check_positive(fn: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive integer, got {value!r}.")
    return value


def _random_prompt(rng: random.Random) -> str:
    n = rng.randint(3, 6)
    return "".join(rng.choice(SYNTHETIC_ALPHABET) for _ in range(n)) + ">"


def _completion_with(rng: random.Random, k: int, length: int, target: str) -> str:
    others = [c for c in SYNTHETIC_ALPHABET if c != target]
    letters = [target] * k + [rng.choice(others) for _ in range(length - k)]
    rng.shuffle(letters)
    return "".join(letters)


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of the letters world (``"cbfg>"``), deterministic in ``seed``."""
    _check_positive("synthetic_prompts", "n", n)
    rng = random.Random(f"prompts-{seed}")
    return [_random_prompt(rng) for _ in range(n)]


def synthetic_preference_examples(
    n: int, seed: int = 0, length: int = 8, min_gap: int = 2, target: str = "a"
) -> list[dict[str, object]]:
    """``n`` preference pairs in TRL's format ``{"prompt", "chosen", "rejected", "margin"}``, deterministic in ``seed``.

    The chosen completion contains ``k_c`` target letters, the rejected one ``k_r``, with ``k_c - k_r >= min_gap``;
    ``margin = (k_c - k_r) / length``.

    Args:
        n: number of pairs.
        seed: generator seed (use different seeds for train and validation).
        length: completion length L.
        min_gap: smallest score difference between chosen and rejected, in [1, L].
        target: the preferred letter.
    """
    fn = "synthetic_preference_examples"
    _check_positive(fn, "n", n)
    _check_positive(fn, "length", length)
    _check_positive(fn, "min_gap", min_gap)
    if min_gap > length:
        raise ValueError(f"{fn}: `min_gap` ({min_gap}) must be <= `length` ({length}).")
    if target not in SYNTHETIC_ALPHABET:
        raise ValueError(f"{fn}: `target` must be one of {list(SYNTHETIC_ALPHABET)}, got {target!r}.")
    rng = random.Random(f"preference-{seed}-{length}-{min_gap}-{target}")
    out = []
    for _ in range(n):
        k_r = rng.randint(0, length - min_gap)
        k_c = rng.randint(k_r + min_gap, length)
        out.append(
            {
                "prompt": _random_prompt(rng),
                "chosen": _completion_with(rng, k_c, length, target),
                "rejected": _completion_with(rng, k_r, length, target),
                "margin": (k_c - k_r) / length,
            }
        )
    return out


class TargetCharReward:
    """Reward function (TRL signature): the fraction of a completion budget filled with a target character.

    ``reward = min(count(target in completion), length) / length``, in ``[0, 1]``; the maximum 1.0 is reached by a
    completion with ``length`` target characters. Usable as ``PPO(reward_functions=[TargetCharReward("a", 8)])``.

    Args:
        target: the rewarded character.
        length: the completion budget (set it to the PPO ``max_new_tokens`` for a character tokenizer).
    """

    def __init__(self, target: str = "a", length: int = 8) -> None:
        if not isinstance(target, str) or len(target) != 1:
            raise ValueError(f"TargetCharReward: `target` must be a single character, got {target!r}.")
        self.target = target
        self.length = _check_positive("TargetCharReward", "length", length)
        self.__name__ = f"target_char_{target}"

    @property
    def max_reward(self) -> float:
        return 1.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: object) -> list[float]:
        return [min(c.count(self.target), self.length) / self.length for c in completions]

    def __repr__(self) -> str:
        return f"TargetCharReward(target={self.target!r}, length={self.length})"


def letter_shift_answer(prompt: str, shift: int = 1, num_letters: int = 1) -> str:
    """The exact answer of the letter-shift task: each of the prompt's last ``num_letters`` letters moved ``shift``
    places along ``a..h`` (cyclic). ``"cbfg>"`` -> ``"h"`` (shift 1), ``"gh"`` (shift 1, two letters)."""
    letters = [c for c in prompt if c in SYNTHETIC_ALPHABET]
    if not letters:
        raise ValueError(
            f"letter_shift_answer: the prompt {prompt!r} has no letter from {SYNTHETIC_ALPHABET!r}; use prompts of "
            "the letters task (synthetic_prompts)."
        )
    n = len(SYNTHETIC_ALPHABET)
    return "".join(SYNTHETIC_ALPHABET[(SYNTHETIC_ALPHABET.index(c) + shift) % n] for c in letters[-num_letters:])


class LetterShiftReward:
    """Verifiable reward (TRL signature) of the letter-shift task, with an exact checker.

    ``reward = #{i : completion[i] == answer[i]} / max(len(answer), len(completion))`` with ``answer =``
    :func:`letter_shift_answer` of the prompt: exactly 1.0 for the exact answer and nothing else (EOS ends the
    completion; special tokens are not part of the text), partial credit for a right prefix with extra characters,
    0.0 for a wrong first letter. A uniformly random policy over the 14-token character vocabulary scores about
    ``1/14 * P(EOS next)`` (~0.01-0.05); the maximum is 1.0.

    Args:
        shift: how many letters to move along ``a..h`` (0: copy the last letter).
        num_letters: how many of the prompt's last letters to answer.
    """

    def __init__(self, shift: int = 1, num_letters: int = 1) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise ValueError(f"LetterShiftReward: `shift` must be an int, got {shift!r}.")
        self.shift = shift
        self.num_letters = _check_positive("LetterShiftReward", "num_letters", num_letters)
        self.__name__ = "letter_shift"

    @property
    def max_reward(self) -> float:
        return 1.0

    def answer(self, prompt: str) -> str:
        return letter_shift_answer(prompt, self.shift, self.num_letters)

    def score(self, prompt: str, completion: str) -> float:
        answer = self.answer(prompt)
        hits = sum(a == c for a, c in zip(answer, completion))
        return hits / max(len(answer), len(completion))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: object) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"LetterShiftReward: got {len(prompts)} prompts for {len(completions)} completions; pass one prompt "
                "per completion (repeat each prompt G times)."
            )
        return [self.score(p, c) for p, c in zip(prompts, completions)]

    def __repr__(self) -> str:
        return f"LetterShiftReward(shift={self.shift}, num_letters={self.num_letters})"
