"""The demo's synthetic world, its fact judge, and the shipped base model (checksums, loading, knowledge)."""
from __future__ import annotations

import re
import shutil

import pytest

from tunesmith.demo import base
from tunesmith.demo.world import ATTRIBUTES, PROBES, STYLES, FactJudge, World, biography, comparison, fact_list
from tunesmith.errors import UserError


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def judge(world):
    return FactJudge(world)


# --- world and corpus ---------------------------------------------------------------------------------------------
def test_world_corpus_and_instructions_are_deterministic_from_the_seed():
    a, b, c = World(seed=3, n_people=60), World(seed=3, n_people=60), World(seed=4, n_people=60)
    assert a.people == b.people and a.cities == b.cities and a.employers == b.employers
    assert a.corpus(5) == b.corpus(5)
    assert a.instruction_data() == b.instruction_data()
    assert [p.name for p in a.people] != [p.name for p in c.people]
    assert a.corpus(5) != c.corpus(5)
    assert a.instruction_data() != c.instruction_data()
    # Resampling the instruction data with another seed changes the rows but not the world.
    assert a.instruction_data(seed=9) != a.instruction_data()


def test_people_are_unique_and_vocabularies_unambiguous(world):
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == 240
    values = [v for vs in world.vocabulary().values() for v in vs]
    assert len(set(values)) == len(values)
    # No value (or name) occurs inside another value at word boundaries: a found value names its attribute.
    for v in values + names:
        pattern = re.compile(r"\b" + re.escape(v) + r"\b", re.IGNORECASE)
        clashes = [w for w in values if w != v and pattern.search(w)]
        assert not clashes, (v, clashes)
    for p in world.people:
        assert p.birthplace in world.cities and p.employer in world.employers


def test_corpus_states_every_fact_in_varied_order_and_wording(world):
    docs = world.corpus(docs_per_person=6)
    assert len(docs) == 6 * len(world.people)
    judge = FactJudge(world)
    person = world.people[7]
    mine = [d for d in docs if d.startswith(person.name) or f" {person.name} " in d]
    assert len(mine) >= 6
    first_attr = set()
    for d in mine[:6]:
        # Every description states all five facts, all correct.
        s = judge.score(person.name, d)
        assert (s.correct, s.incorrect) == (5, 0), d
        positions = {a: d.find(str(getattr(person, a))) for a in ATTRIBUTES}
        first_attr.add(min(positions, key=positions.get))
    assert len(set(mine)) == len(mine)          # varied wording
    assert len(first_attr) > 1                  # varied order
    # The probe prefixes are sentence starts the corpus actually uses.
    corpus_text = " ".join(docs)
    for attr, probe in PROBES.items():
        assert any(probe.format(n=p.name) in corpus_text for p in world.people), attr


def test_instruction_data_separates_train_and_heldout_people(world, judge):
    train, held = world.instruction_data()
    train_names = {p.name for p in world.train_people}
    held_names = {p.name for p in world.heldout_people}
    assert not train_names & held_names and len(held_names) == 60
    for rows, names, other in ((train, train_names, held_names), (held, held_names, train_names)):
        assert {r["style"] for r in rows} == set(STYLES)
        for r in rows:
            assert set(r) == {"instruction", "output", "style"}
            asked = {p.name for p in judge.people_in(r["instruction"])}
            assert asked and asked <= names
            assert not any(n in r["output"] for n in other)
            # Reference answers are perfect under the judge.
            s = judge.score(r["instruction"], r["output"], reference=r["output"])
            assert s.incorrect == 0 and s.correct == s.asked == s.recalled > 0, r


# --- fact judge ---------------------------------------------------------------------------------------------------
def _other(world, attr, value):
    return next(v for v in world.vocabulary()[attr] if v != str(value))


def test_judge_single_person_answers(world, judge):
    p = world.people[0]
    prompt = f"Write a short biography of {p.name}."
    ref = biography(p)
    full = judge.score(prompt, ref, reference=ref)
    assert (full.correct, full.incorrect, full.asked, full.recalled) == (5, 0, 5, 5)
    wrong_city, wrong_job = _other(world, "birthplace", p.birthplace), _other(world, "profession", p.profession)
    wrong = judge.score(prompt, f"{p.name} was born in {wrong_city}. She is a {wrong_job}.", reference=ref)
    assert (wrong.correct, wrong.incorrect, wrong.recalled) == (0, 2, 0)
    partial = judge.score(prompt, f"{p.name} was born in {p.birth_year} in {wrong_city}; the hobby is {p.hobby}.",
                          reference=ref)
    assert (partial.correct, partial.incorrect, partial.recalled) == (2, 1, 2)
    assert partial.precision == pytest.approx(2 / 3)
    for hedge in ("I don't know who that is.", "", f"I am not sure about {p.name}."):
        s = judge.score(prompt, hedge, reference=ref)
        assert (s.correct, s.incorrect, s.recalled, s.net) == (0, 0, 0, 0) and s.precision is None
    # Repetition earns nothing; case does not matter; a list answer counts like prose.
    assert judge.score(prompt, f"{p.hobby}. {p.hobby.upper()}! {p.hobby}").correct == 1
    assert judge.score(prompt, fact_list(p)).correct == 5


def test_judge_attributes_values_to_the_nearest_person(world, judge):
    a, b = world.people[1], world.people[2]
    prompt = f"Compare {a.name} and {b.name}."
    assert judge.score(prompt, comparison(a, b)).correct == 10
    # Swapping the two names gives each person the other's facts: wrong wherever the two differ.
    swapped = comparison(a, b).replace(a.name, "@@").replace(b.name, a.name).replace("@@", b.name)
    differing = sum(str(getattr(a, x)) != str(getattr(b, x)) for x in ATTRIBUTES)
    assert differing >= 3
    s = judge.score(prompt, swapped)
    assert (s.correct, s.incorrect) == (10 - 2 * differing, 2 * differing)
    # A pronoun keeps the last person named.
    s = judge.score(prompt, f"{b.name} is nice. {a.name} is too; {a.pronoun} was born in {a.birth_year}.")
    assert (s.correct, s.incorrect) == (1, 0)
    # Facts about someone the prompt did not ask about are ignored.
    c = world.people[3]
    s = judge.score(f"Where was {a.name} born?", f"{a.name} was born in {a.birthplace}. {c.name} works for "
                                                 f"{_other(world, 'employer', c.employer)}.")
    assert (s.correct, s.incorrect) == (1, 0)
    assert [p.name for p in judge.people_in(prompt)] == [a.name, b.name]


def test_judge_pairwise_verdicts(world, judge):
    p = world.people[4]
    prompt = f"Tell me about {p.name}."
    good, meh = biography(p), f"{p.name} was born in {p.birthplace}."
    bad = f"{p.name} was born in {_other(world, 'birthplace', p.birthplace)}."
    assert judge.compare(prompt, good, meh) == "A"
    assert judge.compare(prompt, bad, meh) == "B"
    assert judge.compare(prompt, meh, meh) == "tie"
    assert judge.compare(prompt, "No idea.", "") == "tie"
    assert judge.compare(prompt, "No idea.", bad) == "A"  # a hedge beats a wrong fact
    # The same verdicts through the evaluation suite's python-judge protocol.
    assert (judge(prompt, good, meh), judge(prompt, bad, meh), judge(prompt, meh, meh)) == ("1", "2", "tie")


# --- the shipped base model ---------------------------------------------------------------------------------------
needs_base = pytest.mark.skipif(not (base.BASE_DIR / base.MANIFEST).is_file(), reason="base model not built yet")


@needs_base
def test_preference_pairs_differ_from_the_real_answer_in_exactly_one_wrong_fact(world, judge):
    train, _ = world.instruction_data(seed=0)
    pairs = world.preference_pairs(train, seed=3)
    assert pairs == world.preference_pairs(train, seed=3) != world.preference_pairs(train, seed=4)
    assert len(pairs) == len(train)  # every training answer states a fact
    for row, p in zip(train, pairs):
        assert (p["prompt"], p["chosen"]) == (row["instruction"], row["output"])
        right, wrong = judge.score(p["prompt"], p["chosen"]), judge.score(p["prompt"], p["rejected"])
        assert right.incorrect == 0 and wrong.incorrect == 1 and wrong.correct == right.correct - 1
        assert p["rejected"] != p["chosen"]


def test_shipped_base_model_loads_and_knows_its_world():
    model, tokenizer, world = base.load_base()
    info = base.provenance()
    assert sum(f.stat().st_size for f in base.BASE_DIR.iterdir()) < 21e6
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert next(base.BASE_DIR.glob("*.safetensors")) and not list(base.BASE_DIR.glob("*.bin"))
    result = base.knowledge_probe(model, tokenizer, world)
    assert result["n"] == 5 * len(world.people)
    assert result["overall"] >= 0.80, result
    assert result["overall"] == pytest.approx(info["probe"]["overall"], abs=0.01)  # provenance tells the truth
    assert min(result["per_attribute"].values()) >= 0.5, result
    # The probe is not trivially satisfied: a shuffled world (same vocabulary, other facts) scores near chance.
    fake = World(seed=info["world"]["seed"], n_people=info["world"]["n_people"])
    fake.people = fake.people[1:] + fake.people[:1]
    names = [p.name for p in world.people]
    fake.people = [type(p)(name=n, **{k: v for k, v in p.__dict__.items() if k != "name"})
                   for n, p in zip(names, fake.people)]
    assert base.knowledge_probe(model, tokenizer, fake, fake.people[:40])["overall"] < 0.3


@needs_base
def test_corrupted_or_missing_checkpoint_is_a_one_line_error(tmp_path):
    good = tmp_path / "good"
    shutil.copytree(base.BASE_DIR, good)
    assert base.verify(good) == good
    weights = next(good.glob("*.safetensors"))

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    blob = bytearray((bad / weights.name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / weights.name).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum mismatch") as e:
        base.load_base(bad)
    assert "\n" not in str(e.value) and weights.name in str(e.value)

    (good / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="missing"):
        base.verify(good)
    with pytest.raises(UserError, match="no checksum manifest"):
        base.load_base(tmp_path / "nowhere")
    (bad / base.MANIFEST).write_text("not a manifest\n")
    with pytest.raises(UserError, match="malformed"):
        base.verify(bad)


# --- the pretraining script, at toy scale -------------------------------------------------------------------------
def _pretrain_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_demo_base.py"
    spec = importlib.util.spec_from_file_location("pretrain_demo_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_script_is_reproducible_from_its_seed(tmp_path, capsys):
    script = _pretrain_script()
    toy = ["--n-people", "12", "--vocab-size", "400", "--hidden", "32", "--layers", "1", "--heads", "2",
           "--intermediate", "64", "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--warmup", "1",
           "--log-every", "1", "--probe-every", "0", "--threads", "1"]
    runs = {}
    import torch

    threads = torch.get_num_threads()
    try:
        for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
            assert script.main(toy + ["--seed", seed, "--output", str(tmp_path / name)]) == 0
            runs[name] = base.verify(tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    digest = {n: base.sha256_file(d / "model.safetensors") for n, d in runs.items()}
    assert digest["a"] == digest["b"] != digest["c"]
    assert (runs["a"] / "tokenizer.json").read_bytes() == (runs["c"] / "tokenizer.json").read_bytes()
    model, tokenizer, world = base.load_base(runs["a"])
    info = base.provenance(runs["a"])
    assert world.n_people == 12 and info["training"]["steps"] == 3 and info["probe"]["n"] == 60
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.tie_word_embeddings and model.config.pad_token_id == tokenizer.pad_token_id
    assert "final training loss" in (runs["a"] / "PROVENANCE.md").read_text()
    assert not (tmp_path / "a.tmp").exists()


@needs_base
def test_fact_judge_hook_judges_through_the_cli(tmp_path):
    """``--judge python --python_judge tunesmith.demo.base:fact_judge`` (its docstring's command) judges by the
    shipped world's facts: the answer with the right birthplace wins in both orders, two equal answers draw."""
    import json

    from tunesmith.cli import main

    info = base.provenance()
    person = World(seed=info["world"]["seed"], n_people=info["world"]["n_people"]).people[0]
    wrong = next(p.birthplace for p in World(seed=info["world"]["seed"], n_people=info["world"]["n_people"]).people
                 if p.birthplace != person.birthplace)
    ask = [f"Where was {person.name} born?", f"Tell me where {person.name} was born."]
    rows = {"a": [f"{person.name} was born in {person.birthplace}.", f"{person.name} was born in {wrong}."],
            "b": [f"{person.name} was born in {wrong}.", f"{person.name} was born in {wrong}."]}
    paths = []
    for name, outputs in rows.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"instruction": i, "output": o, "generator": name}) + "\n"
                             for i, o in zip(ask, outputs)))
        paths.append(str(p))
    assert main(["judge", "--a", paths[0], "--b", paths[1], "--output_dir", str(tmp_path / "o"), "--judge", "python",
                 "--python_judge", "tunesmith.demo.base:fact_judge"]) == 0
    s = json.loads((tmp_path / "o" / "winrate.json").read_text())
    assert (s["wins"], s["losses"], s["draws"]) == (1, 0, 1), s
