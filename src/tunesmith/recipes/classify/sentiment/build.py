"""Write the bundled sentiment set (train / validation / test JSONL) from templates, deterministically.

    python -m tunesmith.recipes.classify.sentiment.build          # rewrites the three files next to this script

Every sentence is composed here from the word lists and templates below (written for tunesmith; no existing dataset
is copied). The set is built so that word counting alone does not solve it:

* negation and contrast flip the meaning of a sentiment word ("far from brilliant", "I expected it to be dull, but
  it was gripping"), so the same word appears under both labels;
* many templates carry both a positive and a negative word, and only their order or role decides the label;
* some adjectives and items never occur in training, only in validation and test (held-out vocabulary);
* no sentence occurs in more than one split.

Labels are "negative" / "positive", balanced in every split.
"""
from __future__ import annotations

import random
from pathlib import Path

SEED = 20240501
SIZES = {"train": 400, "validation": 100, "test": 120}

# item -> aspects that make sense for it
ITEMS = {
    "movie": ["plot", "acting", "soundtrack", "ending", "pacing", "dialogue"],
    "novel": ["plot", "prose", "ending", "characters", "pacing"],
    "restaurant": ["food", "service", "dessert", "staff", "atmosphere"],
    "phone": ["battery", "screen", "camera", "speaker", "software"],
    "laptop": ["keyboard", "screen", "battery", "trackpad", "fan"],
    "hotel": ["room", "staff", "breakfast", "bed", "location"],
    "album": ["vocals", "production", "lyrics", "opening track", "mixing"],
    "game": ["story", "controls", "graphics", "level design", "music"],
    "pair of headphones": ["sound", "fit", "battery", "noise cancelling", "build quality"],
    "concert": ["sound", "setlist", "venue", "encore", "crowd"],
    # held out: only in validation / test
    "board game": ["rules", "artwork", "box", "strategy", "replay value"],
    "coffee machine": ["coffee", "milk frother", "water tank", "design", "noise"],
}
HELD_OUT_ITEMS = {"board game", "coffee machine"}

POSITIVE = ["great", "excellent", "wonderful", "superb", "delightful", "fantastic", "brilliant", "impressive",
            "charming", "lovely", "outstanding", "enjoyable", "pleasant", "terrific", "satisfying", "gripping",
            "stellar", "memorable", "polished", "splendid", "marvelous", "exquisite", "sublime"]
NEGATIVE = ["terrible", "awful", "dreadful", "disappointing", "boring", "mediocre", "poor", "bland", "sloppy",
            "frustrating", "tedious", "clumsy", "lousy", "dull", "forgettable", "weak", "shoddy", "unbearable",
            "painful", "clunky", "abysmal", "atrocious", "dismal"]
HELD_OUT_WORDS = {"splendid", "marvelous", "exquisite", "sublime", "abysmal", "atrocious", "dismal"}

INTENSIFIERS = ["", "really ", "truly ", "absolutely ", "quite ", "genuinely ", "remarkably "]
OPENERS = ["", "Honestly, ", "To be fair, ", "Overall, ", "In short, ", "Frankly, ", "All in all, "]
REFERENCES = ["the first one", "the last model", "its predecessor", "most of its rivals", "the one I had before"]


PLURAL = {"controls", "graphics", "vocals", "lyrics", "characters", "rules"}


def _was(aspect: str) -> str:
    return "were" if aspect in PLURAL else "was"


def _a(word: str) -> str:
    """'a' or 'an' plus the word."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _det(adj: str, aspect: str) -> str:
    """'a dull plot', 'dull graphics'."""
    return f"{adj} {aspect}" if aspect in PLURAL else f"{_a(adj)} {aspect}"


def _pick(rng: random.Random, words: list[str], split: str) -> str:
    pool = words if split != "train" else [w for w in words if w not in HELD_OUT_WORDS]
    return rng.choice(pool)


def _adj(rng, polarity: str, split: str) -> str:
    return _pick(rng, POSITIVE if polarity == "positive" else NEGATIVE, split)


def _other(polarity: str) -> str:
    return "negative" if polarity == "positive" else "positive"


def _sentence(rng: random.Random, label: str, split: str) -> str:
    """One review whose sentiment is ``label``."""
    items = [i for i in ITEMS if split != "train" or i not in HELD_OUT_ITEMS]
    item = rng.choice(items)
    a1, a2 = rng.sample(ITEMS[item], 2)
    opener = rng.choice(OPENERS)
    inten = rng.choice(INTENSIFIERS)
    pos, neg = label == "positive", label == "negative"
    # negation and two-sided kinds (1, 2, 3, 10, 12) are drawn more often than the one-sided ones
    kind = rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 12, 12])
    if kind == 0:   # plain statement
        s = f"{opener}the {a1} of this {item} {_was(a1)} {inten}{_adj(rng, label, split)}."
    elif kind == 1:  # negated positive word -> negative; "not ... in the slightest" + negative word -> positive
        if neg:
            s = f"{opener}the {a1} {_was(a1)} {rng.choice(['not', 'far from', 'anything but', 'hardly'])} " \
                f"{_adj(rng, 'positive', split)}."
        else:
            s = f"{opener}the {a1} {_was(a1)} not {_adj(rng, 'negative', split)} in the slightest; " \
                f"{'they were' if a1 in PLURAL else 'it was'} {_adj(rng, 'positive', split)}."
    elif kind == 2:  # contrast: the clause after "but" decides
        s = f"The {a1} {_was(a1)} {_adj(rng, _other(label), split)}, but the {a2} {_was(a2)} {inten}" \
            f"{_adj(rng, label, split)} and that is what stays with me."
    elif kind == 3:  # expectation reversed
        pronoun = "they" if a1 in PLURAL else "it"
        s = f"I expected the {a1} to be {_adj(rng, _other(label), split)}, yet {pronoun} turned out " \
            f"{_adj(rng, label, split)}."
    elif kind == 4:  # recommendation, with and without negation
        s = rng.choice([
            f"I would {rng.choice(['happily', 'gladly', 'certainly'])} recommend this {item} to a friend.",
            f"I wouldn't hesitate to recommend this {item}.",
            f"I can't think of a reason not to buy this {item}.",
        ]) if pos else rng.choice([
            f"I would not recommend this {item} to anyone.",
            f"I can't recommend this {item}, sadly.",
            f"Save your money and skip this {item}.",
        ])
    elif kind == 5:  # comparison
        be = "are" if a1 in PLURAL else "is"
        s = rng.choice([f"This {item} is better than {rng.choice(REFERENCES)}.",
                        f"The {a1} {be} a big step up from {rng.choice(REFERENCES)}."]) if pos else \
            rng.choice([f"This {item} is not as good as {rng.choice(REFERENCES)}.",
                        f"The {a1} {be} a step down from {rng.choice(REFERENCES)}."])
    elif kind == 6:  # feelings
        s = rng.choice([f"I {rng.choice(['loved', 'enjoyed', 'adored'])} the {a1}.",
                        f"I couldn't help but smile at the {a1}.",
                        f"I didn't expect to enjoy the {a1} this much."]) if pos else \
            rng.choice([f"I {rng.choice(['hated', 'regretted', 'could not stand'])} the {a1}.",
                        f"I didn't enjoy the {a1} at all.",
                        f"I really wanted to like the {a1}, but I couldn't."])
    elif kind == 7:  # coming back / buying again
        s = rng.choice([f"I would happily pay for this {item} again.",
                        f"Nothing about the {a1} disappointed me.",
                        f"No complaints about the {a1} whatsoever."]) if pos else \
            rng.choice([f"I would never pay for this {item} again.",
                        f"Nothing about the {a1} impressed me.",
                        f"No amount of praise for the {a2} can save the {a1}."])
    elif kind == 8:  # value for money
        be = "are" if a1 in PLURAL else "is"
        s = rng.choice(["Worth every penny.", f"The {item} was worth every penny.",
                        f"For the price, the {a1} {be} {_adj(rng, 'positive', split)}."]) if pos else \
            rng.choice(["Not worth the money.", f"The {item} was not worth a single penny.",
                        f"For the price, the {a1} should not be this {_adj(rng, 'negative', split)}."])
    elif kind == 9:  # two aspects, same direction
        s = f"Both the {a1} and the {a2} were {inten}{_adj(rng, label, split)}."
    elif kind == 10:  # "only" / "except" framing: one good thing among bad ones, or the reverse
        s = (f"Apart from {_det(_adj(rng, 'negative', split), a1)}, everything was "
             f"{_adj(rng, 'positive', split)}.") if pos else \
            (f"Apart from {_det(_adj(rng, 'positive', split), a1)}, everything was "
             f"{_adj(rng, 'negative', split)}.")
    elif kind == 12:  # concession: the main clause decides, the "although" clause loses
        s = f"Although the {a1} {_was(a1)} {_adj(rng, _other(label), split)}, the {a2} {_was(a2)} " \
            f"{inten}{_adj(rng, label, split)}."
    else:  # rhetorical
        s = rng.choice([f"Who knew {_a(item)} could be this {_adj(rng, 'positive', split)}?",
                        f"Could the {a1} have been any better? I doubt it."]) if pos else \
            rng.choice([f"How can {_a(item)} be this {_adj(rng, 'negative', split)}?",
                        f"Could the {a1} have been any worse? I doubt it."])
    return s[0].upper() + s[1:]


def build(sizes: dict[str, int] = SIZES, seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows: list[dict] = []
        while len(rows) < n:
            label = ("negative", "positive")[len(rows) % 2]
            text = _sentence(rng, label, split)
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append({"text": text, "label": label})
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def main() -> None:
    from tunesmith.io import atomic_write_jsonl

    here = Path(__file__).resolve().parent
    for split, rows in build().items():
        atomic_write_jsonl(here / f"{split}.jsonl", rows)
        print(f"{here / (split + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()
