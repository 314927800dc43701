"""HELM perturbations: hand-derived examples, determinism, and the misspelling rate against its binomial law."""

import math
import random

import pytest

from lightning_llm.evaluation.perturbations import (
    MISSPELLINGS,
    PERTURBATIONS,
    Perturbation,
    extra_spaces,
    first_names,
    misspellings,
)


def test_hand_examples():
    assert Perturbation("lowercase")("The Cat") == "the cat"
    assert Perturbation("contractions")("It is what it is, do not worry") == "It's what it's, don't worry"
    assert Perturbation("gender_pronouns")("He gave his book to him. HE did it himself.") == (
        "She gave her book to her. SHE did it herself."
    )
    assert Perturbation("dialect")("I am going to call my brother about this") == "I am gonna call my brotha about dis"


def test_mild_mix_order_and_determinism():
    text = "This Function Does Not return the Value because THE string is NOT available"
    p = Perturbation("mild_mix", seed=0)
    out = p(text)
    assert out == p(text) == Perturbation("mild_mix", seed=0)(text)  # same seed, same text -> same output
    assert out == out.lower()  # lowercased first
    assert "doesn't" in out  # contraction after lowercasing ("does not")
    assert "  " in out or out.split() != text.lower().split()  # something else changed too
    outs = {Perturbation("mild_mix", seed=s)(text) for s in range(20)}
    assert len(outs) > 1  # the seed matters


def test_extra_spaces_between_one_and_three():
    import re

    out = extra_spaces(" ".join("abcdefghijklmnopqrstuvwxyz"), random.Random(0))
    gaps = [len(g) for g in re.findall(r" +", out)]
    assert out.replace(" ", "") == "abcdefghijklmnopqrstuvwxyz" and len(gaps) == 25
    assert set(gaps) == {1, 2, 3}  # HELM SpacePerturbation(max_spaces=3): randint(1, 3) per gap


def test_misspelling_rate_is_binomial():
    # 2000 eligible words, p = 0.1: the count of replaced words is Binomial(2000, 0.1) -> mean 200, sd ~13.4
    words = ["because"] * 2000
    out = misspellings(" ".join(words), random.Random(1), prob=0.1).split(" ")
    changed = sum(w != "because" for w in out)
    assert abs(changed - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9)
    assert all(w in ("because", *MISSPELLINGS["because"]) for w in out)
    assert misspellings("Because", random.Random(0), prob=1.0) in ("Becuase", "Becasue")  # case kept


def test_first_names_keep_gender_and_consistency():
    out = first_names("Emily met Greg. Emily smiled.", random.Random(0))
    a, b, c = out.replace(".", "").split()[0], out.split()[2].rstrip("."), out.split()[3]
    from lightning_llm.evaluation.perturbations import FIRST_NAMES

    assert a in FIRST_NAMES["black_american"]["female"] and b in FIRST_NAMES["black_american"]["male"]
    assert c == a  # the same name maps to the same replacement within a text


def test_registry_errors():
    assert set(PERTURBATIONS) >= {"mild_mix", "dialect", "gender_pronouns", "first_names"}
    with pytest.raises(ValueError, match="Unknown perturbation"):
        Perturbation("shout")
    with pytest.raises(TypeError):
        Perturbation("lowercase")(3)
