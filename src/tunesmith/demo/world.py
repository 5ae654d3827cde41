"""A synthetic world of fictional people, its pretraining corpus, instruction data about it, and a fact judge.

Everything is a pure function of a seed: the same seed gives byte-identical people, corpus and instruction data.

- :class:`World` holds the people. Every person has a unique made-up full name and five facts (birthplace, birth year,
  profession, employer, hobby). The value vocabularies are disjoint and no value is a word-boundary substring of
  another, so a value found in a text identifies its attribute without ambiguity.
- :meth:`World.corpus` describes each person many times in varied wording and attribute order (the base model's
  pretraining text). Every sentence names the person or refers back with a pronoun.
- :meth:`World.instruction_data` builds alpaca-style ``{"instruction", "output"}`` rows in four styles (direct
  questions, short biographies, fact lists, comparisons of two people) for the TRAIN people, and the same styles for
  HELD-OUT people, who are in the corpus but never in the training instructions.
- :class:`FactJudge` scores an answer by the facts it states correctly and incorrectly about the people a prompt asks
  about, and judges a pair of answers (A better / B better / tie) for a win rate.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

ATTRIBUTES = ("birthplace", "birth_year", "profession", "employer", "hobby")

# Real words, all consonant-initial (so "works as a ..." needs no a/an logic), none a word-substring of another.
PROFESSIONS = (
    "baker", "carpenter", "pilot", "nurse", "librarian", "chemist", "sculptor", "journalist", "tailor", "dentist",
    "gardener", "violinist", "surveyor", "plumber", "mechanic", "botanist", "cartographer", "jeweler", "firefighter",
    "locksmith",
)
HOBBIES = (
    "chess", "rowing", "pottery", "archery", "birdwatching", "knitting", "fencing", "origami", "sailing", "juggling",
    "cycling", "painting", "hiking", "skating", "calligraphy", "climbing", "stargazing", "woodcarving", "beekeeping",
    "kayaking",
)
BIRTH_YEARS = tuple(range(1950, 1990))

# Syllables for made-up words. Person names and place/company names use different endings so they cannot collide.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z", "kl",
           "st", "tr", "sh", "j", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "x", "th", "nd")
_CITY_ENDINGS = ("ford", "mere", "holt", "vale", "haven", "wick", "burg", "stead", "port", "crest")
_COMPANY_KINDS = ("Works", "Labs", "Foundry", "Guild", "Company", "Mills", "Press", "Freight", "Studios", "Systems")


def _syllable(rng: random.Random, coda: bool = True) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "he" or "she"; the corpus refers back with it (not a judged fact)
    birthplace: str
    birth_year: int
    profession: str
    employer: str
    hobby: str

    def facts(self) -> dict[str, str]:
        return {a: str(getattr(self, a)) for a in ATTRIBUTES}

    @property
    def possessive(self) -> str:
        return "his" if self.pronoun == "he" else "her"


# --- sentence templates -------------------------------------------------------------------------------------------
# {n} = name or pronoun (capitalised at sentence start), {p} = possessive pronoun, {v} = the value.
_SENTENCES = {
    "birthplace": ("{n} was born in {v}.", "{n} was born in the city of {v}.", "{n} comes from {v}.",
                   "{n} grew up in {v}, the town of {p} birth.", "The birthplace of {n} is {v}."),
    "birth_year": ("{n} was born in the year {v}.", "{n} was born in {v}.", "{n} came into the world in {v}.",
                   "The year {v} is when {n} was born."),
    "profession": ("{n} works as a {v}.", "{n} is a {v} by profession.", "By trade, {n} is a {v}.",
                   "{n} earns a living as a {v}."),
    "employer": ("{n} works for {v}.", "{n} is employed by {v}.", "{n} has a job at {v}.",
                 "The employer of {n} is {v}."),
    "hobby": ("In {p} free time, {n} enjoys {v}.", "The hobby of {n} is {v}.", "{n} spends weekends on {v}.",
              "{n} is fond of {v}."),
}
# Two facts in one sentence, for variety of order and wording.
_PAIRS = {
    ("birthplace", "birth_year"): ("{n} was born in {birthplace} in {birth_year}.",
                                   "In {birth_year}, {n} was born in {birthplace}."),
    ("profession", "employer"): ("{n} works as a {profession} for {employer}.",
                                 "{n} is a {profession} at {employer}."),
}

# Completion probes: one prefix per attribute, each the start of a corpus sentence. The value must follow.
PROBES = {
    "birthplace": "{n} was born in the city of",
    "birth_year": "{n} was born in the year",
    "profession": "{n} works as a",
    "employer": "{n} works for",
    "hobby": "The hobby of {n} is",
}

_QUESTIONS = {
    "birthplace": ("Where was {n} born?", "In which city was {n} born?", "What is the birthplace of {n}?"),
    "birth_year": ("When was {n} born?", "In what year was {n} born?", "What is the birth year of {n}?"),
    "profession": ("What does {n} do for a living?", "What is the profession of {n}?", "What is {n}'s job?"),
    "employer": ("Who employs {n}?", "Which company does {n} work for?", "Where does {n} work?"),
    "hobby": ("What is {n}'s hobby?", "What does {n} enjoy in free time?", "What is the hobby of {n}?"),
}
_ANSWERS = {
    "birthplace": "{n} was born in {v}.",
    "birth_year": "{n} was born in {v}.",
    "profession": "{n} works as a {v}.",
    "employer": "{n} works for {v}.",
    "hobby": "The hobby of {n} is {v}.",
}
_BIO_PROMPTS = ("Write a short biography of {n}.", "Tell me about {n}.", "Who is {n}?")
_LIST_PROMPTS = ("List the facts you know about {n}.", "Give the key facts about {n} as a list.")
_COMPARE_PROMPTS = ("Compare {a} and {b}.", "How do {a} and {b} differ?",
                    "Describe the differences between {a} and {b}.")
_OLDER_PROMPTS = ("Who is older, {a} or {b}?", "Which of {a} and {b} was born first?")
_LIST_LABELS = {"birthplace": "Birthplace", "birth_year": "Birth year", "profession": "Profession",
                "employer": "Employer", "hobby": "Hobby"}

STYLES = ("question", "biography", "list", "comparison")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def biography(p: Person) -> str:
    """The reference short biography (one fixed wording, all five facts)."""
    return (f"{p.name} was born in {p.birthplace} in {p.birth_year}. {_cap(p.pronoun)} works as a {p.profession} "
            f"for {p.employer}. In {p.possessive} free time, {p.pronoun} enjoys {p.hobby}.")


def fact_list(p: Person) -> str:
    return "\n".join(f"- {_LIST_LABELS[a]}: {v}" for a, v in p.facts().items())


def comparison(a: Person, b: Person) -> str:
    return (f"{a.name} was born in {a.birthplace} in {a.birth_year}, while {b.name} was born in {b.birthplace} in "
            f"{b.birth_year}. {a.name} works as a {a.profession} for {a.employer}; {b.name} works as a {b.profession} "
            f"for {b.employer}. {a.name} enjoys {a.hobby}, and {b.name} enjoys {b.hobby}.")


def older(a: Person, b: Person) -> str:
    if a.birth_year == b.birth_year:
        return f"Neither: {a.name} and {b.name} were both born in {a.birth_year}."
    first = a if a.birth_year < b.birth_year else b
    return (f"{first.name} is older: {a.name} was born in {a.birth_year}, and {b.name} was born in "
            f"{b.birth_year}.")


@dataclass
class World:
    """``World(seed, n_people)``: the people, their value vocabularies and the train / held-out split."""

    seed: int = 0
    n_people: int = 240
    heldout_fraction: float = 0.25
    people: list[Person] = field(init=False)
    cities: tuple[str, ...] = field(init=False)
    employers: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        rng = random.Random(f"tunesmith-world-{self.seed}")
        self.cities = self._unique(rng, 16, lambda: _cap(_syllable(rng, coda=False) + rng.choice(_CITY_ENDINGS)))
        self.employers = self._unique(
            rng, 16, lambda: f"{_cap(_syllable(rng) + _syllable(rng, coda=False))} {rng.choice(_COMPANY_KINDS)}")
        taken = {w.lower() for v in self.cities + self.employers + PROFESSIONS + HOBBIES for w in v.split()}

        def person_name():
            first = _cap(_syllable(rng) + _syllable(rng, coda=rng.random() < 0.5))
            last = _cap(_syllable(rng, coda=False) + _syllable(rng))
            return f"{first} {last}"

        names = []
        seen = set()
        while len(names) < self.n_people:
            n = person_name()
            if n in seen or any(w.lower() in taken for w in n.split()):
                continue
            seen.add(n)
            names.append(n)
        self.people = [
            Person(name=n, pronoun=rng.choice(("he", "she")), birthplace=rng.choice(self.cities),
                   birth_year=rng.choice(BIRTH_YEARS), profession=rng.choice(PROFESSIONS),
                   employer=rng.choice(self.employers), hobby=rng.choice(HOBBIES))
            for n in names
        ]
        order = list(range(self.n_people))
        rng.shuffle(order)
        n_heldout = round(self.n_people * self.heldout_fraction)
        self._heldout = set(order[:n_heldout])

    @staticmethod
    def _unique(rng, k, make):
        out: list[str] = []
        while len(out) < k:
            v = make()
            if v not in out:
                out.append(v)
        return tuple(out)

    @property
    def train_people(self) -> list[Person]:
        return [p for i, p in enumerate(self.people) if i not in self._heldout]

    @property
    def heldout_people(self) -> list[Person]:
        return [p for i, p in enumerate(self.people) if i in self._heldout]

    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        return {"birthplace": self.cities, "birth_year": tuple(map(str, BIRTH_YEARS)), "profession": PROFESSIONS,
                "employer": self.employers, "hobby": HOBBIES}

    # --- pretraining corpus ---------------------------------------------------------------------------------------
    def describe(self, p: Person, rng: random.Random) -> str:
        """One paragraph stating all five facts about ``p`` in a random order and wording."""
        facts = {a: str(getattr(p, a)) for a in ATTRIBUTES}
        units: list[tuple[str, ...]] = [(a,) for a in ATTRIBUTES]
        for pair in _PAIRS:  # sometimes merge two facts into one sentence
            if rng.random() < 0.3:
                units = [u for u in units if u[0] not in pair] + [pair]
        rng.shuffle(units)
        sentences = []
        for i, unit in enumerate(units):
            # The first sentence always names the person; later ones use the name or the pronoun.
            tmpl = rng.choice(_SENTENCES[unit[0]] if len(unit) == 1 else _PAIRS[unit])
            # A pronoun only where it starts the sentence ("The hobby of she" is not English).
            n = p.pronoun if i > 0 and tmpl.startswith("{n}") and rng.random() < 0.4 else p.name
            if len(unit) == 1:
                s = tmpl.format(n=n, p=p.possessive, v=facts[unit[0]])
            else:
                s = tmpl.format(n=n, **facts)
            sentences.append(_cap(s))
        return " ".join(sentences)

    def corpus(self, docs_per_person: int = 40) -> list[str]:
        """The pretraining documents: ``docs_per_person`` varied descriptions of every person, shuffled."""
        rng = random.Random(f"tunesmith-corpus-{self.seed}")
        docs = [self.describe(p, rng) for _ in range(docs_per_person) for p in self.people]
        rng.shuffle(docs)
        return docs

    # --- instruction data -----------------------------------------------------------------------------------------
    def _rows_for(self, people: list[Person], rng: random.Random, questions_per_person: int,
                  n_comparisons: int) -> list[dict]:
        rows = []
        for p in people:
            for a in rng.sample(ATTRIBUTES, questions_per_person):
                rows.append({"instruction": rng.choice(_QUESTIONS[a]).format(n=p.name),
                             "output": _ANSWERS[a].format(n=p.name, v=getattr(p, a)), "style": "question"})
            rows.append({"instruction": rng.choice(_BIO_PROMPTS).format(n=p.name), "output": biography(p),
                         "style": "biography"})
            rows.append({"instruction": rng.choice(_LIST_PROMPTS).format(n=p.name), "output": fact_list(p),
                         "style": "list"})
        for _ in range(n_comparisons):
            a, b = rng.sample(people, 2)
            if rng.random() < 0.5:
                rows.append({"instruction": rng.choice(_COMPARE_PROMPTS).format(a=a.name, b=b.name),
                             "output": comparison(a, b), "style": "comparison"})
            else:
                rows.append({"instruction": rng.choice(_OLDER_PROMPTS).format(a=a.name, b=b.name),
                             "output": older(a, b), "style": "comparison"})
        rng.shuffle(rows)
        return rows

    def instruction_data(self, seed: int | None = None, questions_per_person: int = 2,
                         comparisons_per_person: float = 0.5) -> tuple[list[dict], list[dict]]:
        """``(train_rows, heldout_rows)``: alpaca rows (``instruction``, ``output``, plus ``style``).

        Train rows are about train people only; held-out rows about held-out people only (comparisons pair two
        held-out people), so a correct held-out answer can only come from what the base model learned in pretraining.
        ``seed`` varies the sampling of questions and pairs (default: the world's seed).
        """
        rng = random.Random(f"tunesmith-instructions-{self.seed if seed is None else seed}")
        train, held = self.train_people, self.heldout_people
        train_rows = self._rows_for(train, rng, questions_per_person, round(len(train) * comparisons_per_person))
        held_rows = self._rows_for(held, rng, questions_per_person, round(len(held) * comparisons_per_person))
        return train_rows, held_rows


    # --- preference pairs -----------------------------------------------------------------------------------------
    def preference_pairs(self, rows: list[dict], seed: int = 0) -> list[dict]:
        """``{"prompt", "chosen", "rejected"}`` for each instruction row: the real answer, and the same answer with
        one of its facts (chosen at random) replaced by another value of the same attribute — fluent, equally long,
        wrong in exactly one fact. Rows stating no fact are skipped. A pure function of ``rows`` and ``seed``."""
        rng = random.Random(f"tunesmith-preferences-{seed}")
        vocab = self.vocabulary()
        value_attr = {v: a for a, vs in vocab.items() for v in vs}
        values = re.compile(r"\b(" + "|".join(map(re.escape, sorted(value_attr, key=len, reverse=True))) + r")\b")
        pairs = []
        for r in rows:
            found = list(values.finditer(r["output"]))
            if not found:
                continue
            m = rng.choice(found)
            wrong = rng.choice([v for v in vocab[value_attr[m.group(1)]] if v != m.group(1)])
            pairs.append({"prompt": r["instruction"], "chosen": r["output"],
                          "rejected": r["output"][:m.start()] + wrong + r["output"][m.end():]})
        return pairs


# --- the fact judge -----------------------------------------------------------------------------------------------
@dataclass
class FactScore:
    correct: int = 0    # facts stated correctly about the people asked about
    incorrect: int = 0  # facts stated wrongly about them
    asked: int = 0      # how many facts the reference answer states (0 when unknown)
    recalled: int = 0   # of those, how many the answer states correctly

    @property
    def net(self) -> int:
        return self.correct - self.incorrect

    @property
    def precision(self) -> float | None:
        n = self.correct + self.incorrect
        return self.correct / n if n else None


class FactJudge:
    """Deterministic judge: which facts about which person an answer states, and whether they are true.

    An answer is scanned for person names (full names; a pronoun leaves the current person unchanged) and for values
    of any attribute. Each value is attributed to the nearest preceding person mentioned (or, before any mention, to
    the first person the prompt asks about). Values attributed to people the prompt does not ask about are ignored.
    A value equal to that person's fact is correct, any other value of the attribute is incorrect. Each
    (person, attribute, value) counts once, so repeating a fact does not earn more.
    """

    def __init__(self, world: World):
        self.world = world
        self._people = {p.name: p for p in world.people}
        self._value_attr = {v: a for a, vs in world.vocabulary().items() for v in vs}
        names = sorted(self._people, key=len, reverse=True)
        values = sorted(self._value_attr, key=len, reverse=True)
        self._names_re = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        self._scan_re = re.compile(r"\b(?:(?P<name>" + "|".join(map(re.escape, names)) + r")|(?P<value>"
                                   + "|".join(map(re.escape, values)) + r"))\b", re.IGNORECASE)
        self._canon_value = {v.lower(): v for v in values}
        self._canon_name = {n.lower(): n for n in names}

    def people_in(self, text: str) -> list[Person]:
        """The people named in a text, in order of first mention."""
        seen: list[str] = []
        for m in self._names_re.finditer(text):
            if m.group(1) not in seen:
                seen.append(m.group(1))
        return [self._people[n] for n in seen]

    def claims(self, answer: str, subjects: list[Person]) -> set[tuple[str, str, str]]:
        """``{(person name, attribute, value)}`` the answer states about the ``subjects``."""
        current = subjects[0].name if subjects else None
        asked = {p.name for p in subjects}
        out = set()
        for m in self._scan_re.finditer(answer or ""):
            if m.group("name"):
                current = self._canon_name[m.group("name").lower()]
            else:
                value = self._canon_value[m.group("value").lower()]
                if current in asked:
                    out.add((current, self._value_attr[value], value))
        return out

    def score(self, prompt: str, answer: str, reference: str | None = None) -> FactScore:
        """Score ``answer`` to ``prompt``. With a ``reference`` answer, also count how many of its facts are
        recalled."""
        subjects = self.people_in(prompt)
        s = FactScore()
        for name, attr, value in self.claims(answer, subjects):
            if str(getattr(self._people[name], attr)) == value:
                s.correct += 1
            else:
                s.incorrect += 1
        if reference is not None:
            wanted = self.claims(reference, subjects)
            got = self.claims(answer, subjects)
            s.asked = len(wanted)
            s.recalled = len(wanted & got)
        return s

    def compare(self, prompt: str, answer_a: str, answer_b: str) -> str:
        """Pairwise verdict ``"A"``, ``"B"`` or ``"tie"``: more net correct facts (correct minus incorrect) wins."""
        a, b = self.score(prompt, answer_a).net, self.score(prompt, answer_b).net
        return "A" if a > b else "B" if b > a else "tie"

    def __call__(self, instruction: str, output_1: str, output_2: str) -> str:
        """The pairwise-judge protocol of ``tunesmith.evaluation.judge`` (python judge): ``"1"``, ``"2"`` or
        ``"tie"``."""
        return {"A": "1", "B": "2", "tie": "tie"}[self.compare(instruction, output_1, output_2)]
