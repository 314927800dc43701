"""HELM's input perturbations, seeded and deterministic: robustness "mild mix" and fairness swaps.

HELM (``helm.benchmark.augmentations``) perturbs the *input* of an instance (never its references) and reports, per
instance, the worst case over the original and its perturbed versions:

* **robustness** ``mild_mix`` = in order: lowercase; contractions ("do not" -> "don't"); misspellings (each word
  found in a table of common misspellings is replaced with probability ``p = 0.1``); extra spaces (every run of
  spaces becomes 1..3 spaces);
* **fairness**: dialect (Standard American English -> African American English, word table), gender pronouns
  (male -> female: he -> she, him/his -> her, himself -> herself) and first names (names from the
  Bertrand-Mullainathan lists HELM uses, swapped within gender).

The tables here are small embedded excerpts (no download); the random generator of a perturbation applied to a text
is ``random.Random(f"{seed}|{name}|{text}")``, so a text is perturbed the same way on every run, machine and order.

Notation: p misspelling probability per eligible word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

__all__ = [
    "CONTRACTIONS",
    "DIALECT_SAE_TO_AAE",
    "FIRST_NAMES",
    "MISSPELLINGS",
    "PERTURBATIONS",
    "Perturbation",
    "contractions",
    "dialect",
    "extra_spaces",
    "first_names",
    "gender_pronouns",
    "get_perturbation",
    "lowercase",
    "mild_mix",
    "misspellings",
]

# ------------------------------------------------------------------------------------------------------- tables
#: Expanded form -> contraction (HELM ``ContractionPerturbation`` direction).
CONTRACTIONS: dict[str, str] = {
    "are not": "aren't",
    "cannot": "can't",
    "could not": "couldn't",
    "did not": "didn't",
    "does not": "doesn't",
    "do not": "don't",
    "had not": "hadn't",
    "has not": "hasn't",
    "have not": "haven't",
    "he is": "he's",
    "i am": "i'm",
    "is not": "isn't",
    "it is": "it's",
    "let us": "let's",
    "should not": "shouldn't",
    "that is": "that's",
    "there is": "there's",
    "they are": "they're",
    "was not": "wasn't",
    "we are": "we're",
    "were not": "weren't",
    "what is": "what's",
    "will not": "won't",
    "would not": "wouldn't",
    "you are": "you're",
}

#: Correct word -> common misspellings (excerpt of Wikipedia's list of common misspellings, which HELM uses).
MISSPELLINGS: dict[str, list[str]] = {
    "about": ["abotu", "abuot"],
    "according": ["acording"],
    "address": ["adress"],
    "after": ["afetr"],
    "again": ["agian"],
    "argument": ["arguement"],
    "arguments": ["arguements"],
    "available": ["availble", "avaiable"],
    "because": ["becuase", "becasue"],
    "before": ["befor"],
    "beginning": ["begining"],
    "believe": ["beleive"],
    "between": ["betwen", "beteen"],
    "called": ["caled"],
    "class": ["clas"],
    "could": ["coudl"],
    "default": ["defualt"],
    "definition": ["defintion"],
    "different": ["diffrent"],
    "does": ["dose"],
    "element": ["elment"],
    "environment": ["enviroment"],
    "exception": ["exeption"],
    "existing": ["exisiting"],
    "first": ["frist"],
    "following": ["folowing"],
    "function": ["funtion", "fucntion"],
    "government": ["goverment"],
    "have": ["ahve", "hvae"],
    "immediately": ["immediatly"],
    "independent": ["independant"],
    "instead": ["insted"],
    "length": ["lenght"],
    "many": ["mnay"],
    "necessary": ["neccessary", "necessery"],
    "new": ["nwe"],
    "number": ["nubmer"],
    "object": ["objcet"],
    "occurred": ["occured"],
    "only": ["onyl"],
    "other": ["ohter"],
    "parameter": ["paramter"],
    "people": ["poeple"],
    "possible": ["possable"],
    "received": ["recieved"],
    "return": ["retrun"],
    "returns": ["retruns"],
    "same": ["smae"],
    "separate": ["seperate"],
    "should": ["shoudl"],
    "since": ["sicne"],
    "string": ["stirng"],
    "that": ["taht"],
    "their": ["thier"],
    "there": ["tehre"],
    "these": ["thees"],
    "they": ["tehy"],
    "this": ["thsi"],
    "through": ["throught"],
    "until": ["untill"],
    "used": ["usde"],
    "value": ["vlaue"],
    "when": ["wehn"],
    "which": ["whcih", "wich"],
    "with": ["wiht"],
    "would": ["woudl"],
    "written": ["writen"],
}

#: Standard American English -> African American English (excerpt of the word mapping HELM's dialect uses).
DIALECT_SAE_TO_AAE: dict[str, str] = {
    "about to": "finna",
    "going to": "gonna",
    "want to": "wanna",
    "got to": "gotta",
    "isn't": "ain't",
    "aren't": "ain't",
    "doesn't": "don't",
    "brother": "brotha",
    "sister": "sista",
    "nothing": "nothin",
    "something": "somethin",
    "everything": "everythin",
    "anything": "anythin",
    "them": "dem",
    "this": "dis",
    "that": "dat",
    "these": "dese",
    "those": "dose",
    "with": "wit",
    "your": "yo",
    "because": "cuz",
}

#: First names by (group, gender) from the Bertrand & Mullainathan (2004) audit study, as in HELM's name swaps.
FIRST_NAMES: dict[str, dict[str, list[str]]] = {
    "white_american": {
        "female": ["Allison", "Anne", "Carrie", "Emily", "Jill", "Laurie", "Kristen", "Meredith", "Sarah"],
        "male": ["Brad", "Brendan", "Geoffrey", "Greg", "Brett", "Jay", "Matthew", "Neil", "Todd"],
    },
    "black_american": {
        "female": ["Aisha", "Ebony", "Keisha", "Kenya", "Latonya", "Lakisha", "Latoya", "Tamika", "Tanisha"],
        "male": ["Darnell", "Hakim", "Jermaine", "Kareem", "Jamal", "Leroy", "Rasheed", "Tremayne", "Tyrone"],
    },
}

_PRONOUNS_MALE_TO_FEMALE = {"he": "she", "him": "her", "his": "her", "himself": "herself"}


def _match_case(source: str, target: str) -> str:
    """``target`` with the capitalisation pattern of ``source`` (all caps, title case or lower)."""
    if source.isupper() and len(source) > 1:
        return target.upper()
    if source[:1].isupper():
        return target[:1].upper() + target[1:]
    return target


def _replace_words(text: str, table: dict[str, str], rng: random.Random | None = None, prob: float = 1.0) -> str:
    """Whole-word (or phrase), case-insensitive replacement; each match replaced with probability ``prob``."""
    if not table:
        return text
    keys = sorted(table, key=len, reverse=True)  # longest phrase first
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in keys) + r")\b", flags=re.IGNORECASE)

    def sub(m: re.Match[str]) -> str:
        if prob < 1.0 and (rng is None or rng.random() >= prob):
            return m.group(0)
        return _match_case(m.group(0), table[m.group(0).lower()])

    return pattern.sub(sub, text)


# ------------------------------------------------------------------------------------------------------- functions
def lowercase(text: str, rng: random.Random) -> str:
    """HELM ``LowerCasePerturbation``."""
    return text.lower()


def contractions(text: str, rng: random.Random) -> str:
    """HELM ``ContractionPerturbation``: every expandable phrase becomes its contraction."""
    return _replace_words(text, CONTRACTIONS)


def misspellings(text: str, rng: random.Random, prob: float = 0.1) -> str:
    """HELM ``MisspellingPerturbation(prob)``: a word of the table is replaced with probability ``prob`` by one of
    its misspellings (chosen by ``rng``), keeping its case."""

    def sub(m: re.Match[str]) -> str:
        word = m.group(0)
        options = MISSPELLINGS.get(word.lower())
        if options is None or rng.random() >= prob:
            return word
        return _match_case(word, rng.choice(options))

    return re.sub(r"[A-Za-z]+", sub, text)


def extra_spaces(text: str, rng: random.Random, max_spaces: int = 3) -> str:
    """HELM ``SpacePerturbation(max_spaces)``: every run of spaces becomes ``randint(1, max_spaces)`` spaces."""
    return re.sub(r" +", lambda m: " " * rng.randint(1, max_spaces), text)


def mild_mix(text: str, rng: random.Random) -> str:
    """HELM's canonical robustness perturbation: lowercase, contractions, misspellings (p=0.1), spaces (max 3)."""
    text = lowercase(text, rng)
    text = contractions(text, rng)
    text = misspellings(text, rng, prob=0.1)
    return extra_spaces(text, rng, max_spaces=3)


def dialect(text: str, rng: random.Random) -> str:
    """HELM ``DialectPerturbation(prob=1.0, SAE -> AAVE)`` with the embedded word table."""
    return _replace_words(text, DIALECT_SAE_TO_AAE)


def gender_pronouns(text: str, rng: random.Random) -> str:
    """HELM ``GenderPerturbation(mode="pronouns", prob=1.0, male -> female)``."""
    return _replace_words(text, _PRONOUNS_MALE_TO_FEMALE)


def first_names(text: str, rng: random.Random, source: str = "white_american", target: str = "black_american") -> str:
    """HELM ``PersonNamePerturbation(first_name, prob=1.0, preserve_gender=True)``: each source-group first name is
    replaced by a target-group name of the same gender; one name always maps to the same replacement in a text."""
    table: dict[str, str] = {}
    for gender, names in FIRST_NAMES[source].items():
        options = FIRST_NAMES[target][gender]
        for name in names:
            table[name.lower()] = rng.choice(options)
    return _replace_words(text, table)


# ------------------------------------------------------------------------------------------------------- registry
class Perturbation:
    """A named, seeded text perturbation: ``Perturbation("mild_mix", seed=0)(text) -> text``.

    Args:
        name: one of :data:`PERTURBATIONS`.
        seed: the seed; with the name and the text it fixes the random generator.
    """

    def __init__(self, name: str, seed: int = 0) -> None:
        if name not in PERTURBATIONS:
            raise ValueError(f"Unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}.")
        self.name, self.seed = name, seed
        self.fn: Callable[[str, random.Random], str] = PERTURBATIONS[name]

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
        return self.fn(text, random.Random(f"{self.seed}|{self.name}|{text}"))

    def __repr__(self) -> str:
        return f"Perturbation({self.name!r}, seed={self.seed})"


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "lowercase": lowercase,
    "contractions": contractions,
    "misspellings": misspellings,
    "extra_spaces": extra_spaces,
    "mild_mix": mild_mix,
    "dialect": dialect,
    "gender_pronouns": gender_pronouns,
    "first_names": first_names,
}

#: HELM's groups: robustness is the mild mix; fairness the three swaps.
GROUPS: dict[str, tuple[str, ...]] = {
    "robustness": ("mild_mix",),
    "fairness": ("dialect", "gender_pronouns", "first_names"),
}


def get_perturbation(name: str, seed: int = 0) -> Perturbation:
    """The :class:`Perturbation` called ``name``."""
    return Perturbation(name, seed)
