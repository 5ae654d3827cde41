"""Data and memory at scale: the Arrow data path (same examples, summary and errors as the in-memory path; cached;
shared by the processes of a distributed run), O(n log n) packing (the same rows as the linear first-fit), and lean
logits (the same losses, log-probs and gradients as full logits, without a batch x sequence x vocabulary tensor)."""
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ScaledLogits, alpaca_rows, free_port, write_jsonl

from tunesmith import scoring
from tunesmith.data.collate import Collator, concat, first_fit_decreasing, pack
from tunesmith.data.prepare import tokenize_examples
from tunesmith.data.source import open_source, read_examples
from tunesmith.data.templates import get_template
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError

HERE = Path(__file__).parent
ML = 256  # max_length


def prepared(data, tokenizer, template, max_length, cache_dir, **options):
    """Token rows of one source through the data entry."""
    return open_source(data, cache_dir=cache_dir).tokenized(tokenizer, template, max_length, cache_dir=cache_dir,
                                                            **options)


# --- the Arrow data path --------------------------------------------------------------------------------------------

def mixed_rows(n=40):
    rows = alpaca_rows(n)
    rows[3]["output"] = ""  # nothing to train after the prompt... except the EOS, which is trained
    rows[5]["instruction"] = " ".join(["what"] * 300)  # the prompt alone fills max_length: dropped
    rows[7]["output"] = " ".join(["red"] * 200)  # truncated
    return rows


def test_arrow_path_gives_the_in_memory_examples_and_summary(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows())
    template = get_template("alpaca")
    expected, expected_summary = tokenize_examples(read_examples(data), tiny_tokenizer, template, ML, source=data)
    got, summary = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "cache")
    assert summary == expected_summary
    assert summary.dropped == [f"{data}:6"] and summary.truncated >= 1 and summary.kept == 39
    assert len(got) == len(expected) == 39
    assert list(got) == expected
    assert got[0] == expected[0] and got[-1] == expected[-1] and got[5:9] == expected[5:9]
    assert got[[3, 1]] == [expected[3], expected[1]]
    assert got.lengths.tolist() == [len(e["input_ids"]) for e in expected]
    with pytest.raises(IndexError):
        got[39]


def test_second_run_maps_the_cache_and_inputs_change_the_fingerprint(tiny_tokenizer, tmp_path, monkeypatch):
    from tunesmith.data import prepare

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    template, cache = get_template("alpaca"), tmp_path / "cache"
    first, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")

    with monkeypatch.context() as m:
        m.setattr(prepare, "_build_entry", no_build)
        again, summary = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    assert list(again) == list(first) and summary.kept == 20
    prepared(data, tiny_tokenizer, template, 200, cache_dir=cache)  # another max_length
    prepared(data, tiny_tokenizer, template, ML, train_on_prompt=True, cache_dir=cache)
    prepared(data, tiny_tokenizer, get_template("qa"), ML, cache_dir=cache)
    write_jsonl(data, alpaca_rows(20, seed=2))  # same path, other content
    changed, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    assert list(changed) != list(first)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no build left behind


def test_tokenizing_in_two_processes_gives_the_same_data(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows(60))
    template = get_template("alpaca")
    one, s1 = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "a")
    two, s2 = prepared(data, tiny_tokenizer, template, ML, num_proc=2, cache_dir=tmp_path / "b")
    assert s1 == s2 and list(one) == list(two)
    [entry] = (tmp_path / "b").iterdir()
    assert len(json.loads((entry / "manifest.json").read_text())["files"]) == 2


@pytest.mark.parametrize("content,expected", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"d\.jsonl:2: malformed JSON"),
    (b'{"instruction": "a", "output": "b"}\n{"output": "b", "instruction": 3}\n',
     r"d\.jsonl:2: field 'instruction' must be a string"),
    (b'{"instruction": "a", "output": "b"}\n' * 1500 + b'{"instruction": "a"}\n',
     r"d\.jsonl:1501: field 'output' is missing"),
    (b'{"instruction": "a", "output": "b\xff"}\n', r"d\.jsonl:1: not valid UTF-8"),
    (b"", r"d\.jsonl: the dataset is empty"),
    (b'{"foo": 1}\n', r"d\.jsonl:1: cannot detect the data format"),
])
def test_bad_data_stops_with_its_line_and_caches_nothing(tiny_tokenizer, tmp_path, content, expected):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        prepared(str(p), tiny_tokenizer, get_template("alpaca"), ML, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_nothing_trainable_is_an_error(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a b c d e f", "output": "x"}] * 3)
    with pytest.raises(UserError, match="no example has a trainable token left"):
        prepared(data, tiny_tokenizer, get_template("alpaca"), 8, cache_dir=tmp_path / "cache")


def test_processes_of_a_distributed_run_share_one_build(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch.distributed as dist
        from transformers import AutoTokenizer
        from tunesmith.data import prepare
        from tunesmith.data.source import open_source
        from tunesmith.data.templates import get_template

        dist.init_process_group("gloo")
        builds = []
        real = prepare._build_entry
        prepare._build_entry = lambda *a, **k: (builds.append(1), real(*a, **k))
        tok = AutoTokenizer.from_pretrained({tiny_model_dir!r})
        data, summary = open_source({data!r}).tokenized(tok, get_template("alpaca"), {ML},
                                                        cache_dir={str(tmp_path / "c")!r})
        out = {{"builds": len(builds), "rows": [r["input_ids"] for r in data], "kept": summary.kept}}
        with open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(out, f)
        dist.barrier()
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["builds"] + r1["builds"] == 1  # one process tokenized, the other mapped its result
    assert r0["rows"] == r1["rows"] and r0["kept"] == 30


# --- packing --------------------------------------------------------------------------------------------------------

def linear_first_fit_decreasing(lengths, capacity):
    """The packing tunesmith shipped before: first-fit-decreasing with a linear scan over the bins."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, space = [], []
    for i in order:
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


@pytest.mark.parametrize("seed,capacity", [(0, 64), (1, 100), (2, 512), (3, 37)])
def test_tree_packing_gives_the_rows_of_linear_first_fit(seed, capacity):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, capacity), rng.randint(1, capacity // 4 + 1), capacity])
               for _ in range(3000)]
    lengths[10] = capacity + 5  # longer than a row: alone
    members, offsets = first_fit_decreasing(lengths, capacity)
    rows = [members[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]
    assert rows == linear_first_fit_decreasing(lengths, capacity)
    assert sorted(members.tolist()) == list(range(3000))


def test_packed_rows_read_lazily_from_arrow_equal_packed_lists(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows(50))
    template = get_template("alpaca")
    arrow, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "c")
    listed, _ = tokenize_examples(read_examples(data), tiny_tokenizer, template, ML)
    a, b = pack(arrow, 512), pack(listed, 512)
    assert len(a) == len(b) < len(listed) and list(a) == list(b)
    assert 0.5 < a.fill == b.fill <= 1
    assert sum(len(r["input_ids"]) for r in a) == sum(len(e["input_ids"]) for e in listed)
    assert all(len(r["input_ids"]) <= 512 for r in a)
    first = a[0]
    assert first == concat([listed[i] for i in a.members[a.offsets[0]:a.offsets[1]]])
    batch = Collator(0)(a[0:3])
    assert batch["input_ids"].shape[0] == 3 and "position_ids" in batch


# --- lean logits ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_LOGITS", 7 * 400)  # 7 tokens per chunk at this vocabulary: many chunks


def lm_and_batch(tiny_model_dir, packed=False):
    from tunesmith.data.formats import Example, Turn
    from tunesmith.data.tokenize import encode
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    t = get_template("qa")
    enc = [encode(tok, t, Example(turns=[Turn(r["instruction"], r["output"])]), ML) for r in alpaca_rows(5)]
    enc.append({"input_ids": enc[0]["input_ids"][:9], "labels": enc[0]["input_ids"][:9]})
    batch = Collator(tok.pad_token_id)(pack(enc, 70) if packed else enc)
    return model, batch


def full_logprobs(model, batch):
    """The plain computation, written independently: full logits, log-softmax, gather."""
    logits = model(**scoring.model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


@pytest.mark.parametrize("packed", [False, True])
def test_lean_loss_and_gradients_equal_the_models_own(tiny_model_dir, small_chunks, packed):
    model, batch = lm_and_batch(tiny_model_dir, packed)
    model.train()
    n_items = torch.tensor(int((batch["labels"][:, 1:] != IGNORE).sum()) + 17)  # as if more came in accumulation
    for num_items in (n_items, None):
        inputs = scoring.model_inputs(batch)
        if num_items is not None:
            inputs["num_items_in_batch"] = num_items
        model.zero_grad()
        own = model(**inputs, labels=batch["labels"]).loss
        own.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        lean = scoring.causal_lm_loss(model, batch, num_items)
        lean.backward()
        assert abs(lean.item() - own.item()) < 1e-5
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4), n


def test_lean_log_probs_equal_full_logits_with_and_without_gradients(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir, packed=True)
    model.eval()
    with torch.no_grad():
        ref, ref_mask = full_logprobs(model, batch)
        logp, mask = scoring.token_logprobs(model, batch)
    assert torch.equal(mask, ref_mask) and torch.allclose(logp, ref, atol=1e-5)
    with torch.no_grad():  # lm-eval's question: log p of a continuation, and is each token the most likely one?
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
        lp, hits = scoring.target_logprobs(model, batch, targets, greedy=True)
        logits = model(**scoring.model_inputs(batch)).logits
    assert torch.allclose(lp[:, :-1], ref, atol=1e-5)
    expected_hits = (logits.argmax(-1) == targets) & (targets != IGNORE)
    assert torch.equal(hits, expected_hits)
    seq = scoring.sequence_logprobs(model, batch)  # with gradients (SPIN's policy pass)
    seq.sum().backward()
    lean_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_seq = full_logprobs(model, batch)[0].sum(1)
    ref_seq.sum().backward()
    assert torch.allclose(seq, ref_seq, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, lean_grads[n], atol=1e-5, rtol=1e-4), n
    loss = scoring.dataset_loss(model, [batch])
    assert loss["tokens"] == int(mask.sum())
    assert loss["loss"] == pytest.approx(float(-ref.sum() / ref_mask.sum()), abs=1e-5)


class _BiggestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_sequence_by_vocabulary_tensor(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    full = batch["input_ids"].numel() * vocab
    with _BiggestTensor() as seen:
        full_logprobs(model, batch)[0].sum().backward()
    assert seen.largest >= full  # the plain computation does build it (so this test can fail)
    with _BiggestTensor() as seen:  # the model without its head: attention, embeddings and their gradients
        model(**scoring.model_inputs(batch), logits_to_keep=1).logits.sum().backward()
    body = seen.largest
    assert body < full
    for run in (lambda: scoring.causal_lm_loss(model, batch).backward(),
                lambda: scoring.dataset_loss(model, [batch])):
        with _BiggestTensor() as seen:
            run()
        assert seen.largest <= max(body, scoring.CHUNK_LOGITS)


def test_lean_scoring_takes_the_final_hidden_states_without_keeping_every_layer(tiny_model_dir):
    """output_hidden_states would hold one batch x sequence x width tensor per layer: the decoder's output is taken."""
    model, batch = lm_and_batch(tiny_model_dir)
    model.eval()
    asked = []
    model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(dict(kw)), with_kwargs=True)
    with torch.no_grad():
        lean = scoring.sequence_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    full = (torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            * (labels != -100)).sum(-1)
    assert asked[0].get("logits_to_keep") == 1 and not asked[0].get("output_hidden_states")
    assert torch.allclose(lean, full, atol=1e-4)
    assert model not in scoring._FULL_LOGITS


def test_a_head_that_is_not_a_plain_projection_falls_back_to_full_logits(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir)
    scaled = ScaledLogits(model.eval())
    with torch.no_grad():
        ref, _ = full_logprobs(scaled, batch)
        plain, _ = full_logprobs(model, batch)
        assert (ref - plain).abs().max() > 0.1
        logp, _ = scoring.token_logprobs(scaled, batch)
    assert torch.allclose(logp, ref, atol=1e-5)


def test_lm_eval_log_likelihoods_equal_lm_evals_own(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from tunesmith.evaluation.lm_eval_bridge import _lean
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    model.eval()
    rng = random.Random(0)
    requests = []
    for n in range(9):
        context = [rng.randrange(5, 400) for _ in range(rng.randint(1, 30))]
        continuation = [rng.randrange(5, 400) for _ in range(rng.randint(1, 6))]
        if n == 0:  # a continuation the model predicts greedily, so the exact-match flag is True once
            with torch.no_grad():
                continuation = [int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())]
        requests.append((("ctx", "cont"), context, continuation))
    own = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")._loglikelihood_tokens(requests)
    lean = _lean(HFLM)(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")._loglikelihood_tokens(requests)
    assert [g for _, g in lean] == [g for _, g in own] and own[0][1]
    assert [lp for lp, _ in lean] == pytest.approx([lp for lp, _ in own], abs=1e-5)
