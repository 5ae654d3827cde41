"""The preference engine: every loss against TRL 1.16's DPOTrainer (sigmoid, hinge, ipo: first step's loss and
gradients) or against its formula computed independently from the model's whole logits (dpop, simpo, orpo, label
smoothing); padding-free batches equal padded ones; NEFTune on the policy pass only; pairs in every data shape."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from transformers import TrainingArguments

from tunesmith.data.formats import Example, Turn
from tunesmith.data.load import Record
from tunesmith.data.preference import (
    Pair,
    detect_preference_format,
    encode_pairs,
    prepare_pairs,
    to_pair,
)
from tunesmith.data.source import open_sources
from tunesmith.data.templates import get_template
from tunesmith.errors import UserError
from tunesmith.preference.loss import LossSettings, PairLogps, preference_loss
from tunesmith.preference.pairs import PairCollator, score_pairs
from tunesmith.preference.trainer import PreferenceTrainer

ANSWERS = [(" the answer is blue blue", " no"), (" it was red", " it was a big green dog that sat on the mat"),
           (" yes", " the sky sea grass"), (" one two three", " one two four"), (" happy", " sad sad sad run"),
           (" small cat", " the cat")]


def _pairs(tok):
    template = get_template("alpaca", tok)
    pairs = [Pair(Example(turns=[Turn(f"what is the color of sky {i}", None)], loc=f"x:{i}"), c, r)
             for i, (c, r) in enumerate(ANSWERS)]
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for row in encode_pairs(tok, template, pairs, 256)]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """A reference and a policy that differs from it (so no loss is at its trivial value), and tokenized pairs."""
    from tunesmith.models import load_model_and_tokenizer

    reference, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return reference.eval(), policy, tok, _pairs(tok)


def with_ref(reference, tok, pairs, max_length=256):
    chosen, rejected = score_pairs(reference, pairs, PairCollator(tok.pad_token_id, max_length), 4, "cpu")
    return [dict(p, ref_chosen=a, ref_rejected=b) for p, a, b in zip(pairs, chosen, rejected)]


def ours(policy, tok, pairs, settings, tmp_path, padding_free=False, neftune=None):
    """(loss, {name: grad}) of one PreferenceTrainer step on ``pairs``."""
    from tunesmith.config import NEFTuneArgs

    model = copy.deepcopy(policy).train()
    collate = PairCollator(tok.pad_token_id, 256, padding_free)
    args = TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none")
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=pairs, data_collator=collate, loss=settings,
                                neftune=neftune or NEFTuneArgs())
    loss = trainer.compute_loss(model, collate(pairs))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_step(policy, reference, tok, pairs, loss_type, beta, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], bf16=False, use_cpu=True,
                     report_to="none", max_length=None, precompute_ref_log_probs=False)
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                     train_dataset=text, processing_class=tok)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    trl.model.train()
    loss = trl._compute_loss(trl.model, batch, False)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trl.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.3), ("hinge", 0.5), ("ipo", 0.2)])
def test_first_step_loss_and_gradients_equal_trl_dpo_trainer(models, loss_type, beta, tmp_path):
    reference, policy, tok, pairs = models
    pairs = with_ref(reference, tok, pairs)
    a_loss, a_grads = ours(policy, tok, pairs, LossSettings(loss_type=loss_type, beta=beta), tmp_path)
    b_loss, b_grads = trl_step(policy, reference, tok, pairs, loss_type, beta, tmp_path)
    assert b_loss > 0.05 and abs(b_loss - math.log(2)) > 1e-3  # a real cross-check, not a trivial value
    assert a_loss == pytest.approx(b_loss, abs=1e-5)
    assert a_grads.keys() == b_grads.keys() and len(a_grads) > 10
    worst = max((a_grads[k] - b_grads[k]).abs().max().item() for k in a_grads)
    assert worst < 1e-5, worst
    assert max(g.abs().max().item() for g in a_grads.values()) > 1e-3  # gradients that are not all ~0


def full_logits_logps(model, tok, pairs):
    """Summed answer log-probs and answer lengths from the model's whole logits (independent of tunesmith's lean
    path and collator)."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        sums, lengths = [], []
        for p in pairs:
            ids = torch.tensor([p["prompt_ids"] + p[key]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n = len(p[key])
            targets = ids[0, -n:]
            sums.append(logp[-n:].gather(-1, targets[:, None]).sum())
            lengths.append(n)
        out += [torch.stack(sums), torch.tensor(lengths, dtype=torch.float32)]
    return out


@pytest.mark.parametrize("loss_type", ["dpop", "simpo", "orpo", "sigmoid-smoothed"])
def test_other_losses_equal_their_formulas(models, loss_type, tmp_path):
    reference, policy, tok, pairs = models
    pairs = with_ref(reference, tok, pairs)
    beta, lam, gamma, eps = 0.4, 5.0, 0.7, 0.2
    settings = LossSettings(loss_type=loss_type.split("-")[0], beta=beta, dpop_lambda=lam, simpo_gamma=gamma,
                            label_smoothing=eps if loss_type == "sigmoid-smoothed" else 0.0)
    a_loss, a_grads = ours(policy, tok, pairs, settings, tmp_path)

    model = copy.deepcopy(policy).train()
    pw, nw, pl, nl = full_logits_logps(model, tok, pairs)
    rw = torch.tensor([p["ref_chosen"] for p in pairs], dtype=torch.float32)
    rl = torch.tensor([p["ref_rejected"] for p in pairs], dtype=torch.float32)
    if loss_type == "dpop":  # Pal et al. 2024, eq. 3
        z = beta * ((pw - rw) - (pl - rl) - lam * torch.clamp(rw - pw, min=0))
        expected = -F.logsigmoid(z)
    elif loss_type == "simpo":  # Meng et al. 2024, eq. 6
        expected = -F.logsigmoid(beta / nw * pw - beta / nl * pl - gamma)
    elif loss_type == "orpo":  # Hong et al. 2024, eq. 6-7: odds(y) = P / (1 - P), P the per-token geometric mean
        p_w, p_l = torch.exp(pw / nw), torch.exp(pl / nl)
        log_or = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
        expected = -pw / nw - beta * F.logsigmoid(log_or)
    else:  # conservative DPO
        z = beta * ((pw - rw) - (pl - rl))
        expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    loss = expected.mean()
    loss.backward()
    b_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert a_loss == pytest.approx(loss.item(), abs=1e-5)
    assert max((a_grads[k] - b_grads[k]).abs().max().item() for k in a_grads) < 1e-5
    if loss_type == "dpop":  # the penalty is active for some pair, so this differs from plain DPO
        plain, _ = ours(policy, tok, pairs, LossSettings(loss_type="sigmoid", beta=beta), tmp_path)
        assert (rw > pw).any() and abs(plain - a_loss) > 1e-3


def test_padding_free_pairs_give_the_padded_loss_and_gradients(models, tmp_path):
    reference, policy, tok, pairs = models
    pairs = with_ref(reference, tok, pairs)
    settings = LossSettings(loss_type="ipo", beta=0.2)  # ipo: the answer-token counts matter too
    a_loss, a_grads = ours(policy, tok, pairs, settings, tmp_path)
    b_loss, b_grads = ours(policy, tok, pairs, settings, tmp_path, padding_free=True)
    batch = PairCollator(tok.pad_token_id, 256, True)(pairs)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, nothing padded
    assert a_loss == pytest.approx(b_loss, abs=1e-5)
    assert max((a_grads[k] - b_grads[k]).abs().max().item() for k in a_grads) < 1e-5


def test_pairs_are_cut_at_max_length_and_counted_after_the_cut(models):
    _, _, tok, pairs = models
    p = pairs[1]
    n = len(p["prompt_ids"]) + 3
    batch = PairCollator(tok.pad_token_id, n)([p])
    assert batch["input_ids"].shape[1] == n
    assert batch["answer_tokens"].tolist() == [3, 3]


def test_neftune_noise_on_the_policy_pass_only(models, tmp_path):
    from tunesmith.config import NEFTuneArgs

    reference, policy, tok, pairs = models
    pairs = with_ref(reference, tok, pairs)
    collate = PairCollator(tok.pad_token_id, 256)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = copy.deepcopy(policy)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=pairs, data_collator=collate,
                                loss=LossSettings(beta=0.5), neftune=NEFTuneArgs(neftune_noise_alpha=15.0))
    batch = collate(pairs)
    model.eval()
    clean = trainer.compute_loss(model, batch).item()
    assert trainer.compute_loss(model, batch).item() == clean  # evaluation passes: no noise
    model.train()
    assert abs(trainer.compute_loss(model, batch).item() - clean) > 1e-4
    with torch.no_grad():  # scoring (the reference pass): no noise even in training mode
        a = score_pairs(model, pairs, collate, 8, "cpu")
        b = score_pairs(model, pairs, collate, 8, "cpu")
    assert a == b


def test_losses_by_hand():
    lp = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([4]), torch.tensor([2]))
    ref_w, ref_l = torch.tensor([-11.0]), torch.tensor([-11.5])
    # delta_w = 1, delta_l = -0.5: z = 0.1 * 1.5 = 0.15
    loss, r_w, r_l = preference_loss(lp, ref_w, ref_l, LossSettings("sigmoid", beta=0.1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)))
    assert (r_w.item(), r_l.item()) == pytest.approx((0.1, -0.05))
    assert preference_loss(lp, ref_w, ref_l, LossSettings("hinge", beta=0.1))[0].item() == pytest.approx(0.85)
    # ipo: 1/4 - (-0.5)/2 = 0.5; (0.5 - 1/(2*0.1))^2 = 20.25
    assert preference_loss(lp, ref_w, ref_l, LossSettings("ipo", beta=0.1))[0].item() == pytest.approx(20.25)
    # dpop: the chosen answer gained likelihood (ref -11 < -10): no penalty, plain DPO
    assert preference_loss(lp, ref_w, ref_l, LossSettings("dpop", beta=0.1, dpop_lambda=50))[0].item() == \
        pytest.approx(math.log(1 + math.exp(-0.15)))
    lost = preference_loss(lp, torch.tensor([-9.0]), ref_l, LossSettings("dpop", beta=0.1, dpop_lambda=2))[0]
    # delta_w = -1, delta_l = -0.5, penalty 1: z = 0.1 * (-1 + 0.5 - 2) = -0.25
    assert lost.item() == pytest.approx(math.log(1 + math.exp(0.25)))


# ------------------------------------------------------------------------------------------------ data shapes


SHAPES = {
    "text": {"prompt": "what is the sky", "chosen": " blue", "rejected": " green"},
    "conversation": {"prompt": [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                                {"role": "user", "content": "what is the sky"}],
                     "chosen": [{"role": "assistant", "content": "blue"}],
                     "rejected": [{"role": "assistant", "content": "green"}]},
    "implicit": {"chosen": [{"role": "user", "content": "what is the sky"}, {"role": "assistant", "content": "blue"}],
                 "rejected": [{"role": "user", "content": "what is the sky"},
                              {"role": "assistant", "content": "green"}]},
    "implicit_text": {"chosen": "Q: what is the sky A: blue", "rejected": "Q: what is the sky A: green"},
    "ultrafeedback": {"prompt": "what is the sky", "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 2.0,
                      "chosen": [{"role": "user", "content": "what is the sky"},
                                 {"role": "assistant", "content": "blue"}],
                      "rejected": [{"role": "user", "content": "what is the sky"},
                                   {"role": "assistant", "content": "green"}]},
    "hh": {"chosen": "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: what is the sky\n\nAssistant: blue",
           "rejected": "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: what is the sky\n\nAssistant: green"},
}


@pytest.mark.parametrize("shape, fmt, turns, chosen, rejected", [
    ("text", "preference", [("what is the sky", None)], " blue", " green"),
    ("conversation", "preference", [("hello", "hi"), ("what is the sky", None)], "blue", "green"),
    ("implicit", "implicit", [("what is the sky", None)], "blue", "green"),
    ("implicit_text", "implicit", [("Q: what is the sky A:", None)], " blue", " green"),
    ("ultrafeedback", "ultrafeedback", [("what is the sky", None)], "blue", "green"),
    ("hh", "hh", [("hello", "hi"), ("what is the sky", None)], "blue", "green"),
])
def test_each_shape_is_detected_and_normalised(shape, fmt, turns, chosen, rejected):
    record = Record(SHAPES[shape], "d.jsonl:7")
    assert detect_preference_format(record.data, record.loc) == fmt
    pair = to_pair(record, fmt)
    assert [(t.prompt, t.response) for t in pair.example.turns] == turns
    assert (pair.chosen, pair.rejected) == (chosen, rejected)
    assert pair.example.system == ("be brief" if shape == "conversation" else None)


@pytest.mark.parametrize("data, message", [
    ({"prompt": "q", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"},
                                                                {"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "exactly one assistant message"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "assistant message must follow a user message"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     "differ before their last Assistant turn"),
    ({"chosen": "\n\nHuman: q\n\nHuman: a", "rejected": "\n\nHuman: q\n\nHuman: b"}, "must alternate"),
    ({"prompt": "not the question", "chosen": SHAPES["ultrafeedback"]["chosen"],
      "rejected": SHAPES["ultrafeedback"]["rejected"]}, "not the last user message"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
])
def test_bad_pairs_are_one_line_errors_naming_file_and_line(data, message):
    record = Record(data, "d.jsonl:3")
    with pytest.raises(UserError, match=message) as e:
        to_pair(record, detect_preference_format(data, record.loc))
    assert str(e.value).startswith("d.jsonl:3") and "\n" not in str(e.value)


def test_a_prompt_in_data_read_as_implicit_pairs_is_an_error_not_ignored(tiny_tokenizer, tmp_path):
    """The first record (prompt null) makes the set implicit pairs; a later record's prompt was silently ignored."""
    from tunesmith.data.preference import prepare_pairs
    from tunesmith.data.source import open_sources
    from tunesmith.data.templates import get_template

    rows = [{"prompt": None, "chosen": "the sky is blue", "rejected": "the sky is black"},
            {"prompt": "the sea is", "chosen": "the sea is deep", "rejected": "the sea is dry"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: field 'prompt' is set, but the data is read as implicit"):
        prepare_pairs(open_sources(data), tiny_tokenizer, get_template("qa", tiny_tokenizer), 64,
                      cache_dir=tmp_path / "cache")


def test_prepared_pairs_drop_and_count_identical_and_too_long_prompts(tiny_tokenizer, tmp_path):
    from tunesmith.models import ensure_pad_token

    tok = copy.deepcopy(tiny_tokenizer)
    ensure_pad_token(tok)
    rows = [{"prompt": "what is the sky", "chosen": "blue", "rejected": "green"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "one two three four five six seven eight nine ten " * 4, "chosen": "a", "rejected": "b"},
            {"prompt": "what is the sky", "chosen": "blue " * 30, "rejected": "green"}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    template = get_template("qa", tok)
    ds, [summary] = prepare_pairs(open_sources(data), tok, template, 40, cache_dir=tmp_path / "cache")
    assert (summary.records, summary.kept, summary.identical, summary.prompt_too_long) == (4, 2, 1, 1)
    assert summary.truncated == 1 and summary.first_dropped == [f"{data}:2", f"{data}:3"]
    assert "1 with chosen = rejected" in summary.lines()[0]
    assert ds.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"] and len(ds) == 2
    # the prompt ids are the training text's prefix; each answer ends with EOS as the template trains it
    prompt = tok("Please answer the following question. Q: what is the sky A:", add_special_tokens=False)["input_ids"]
    assert ds[0]["prompt_ids"] == prompt
    assert ds[0]["chosen_ids"] == tok(" blue", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    again, _ = prepare_pairs(open_sources(data), tok, template, 40, cache_dir=tmp_path / "cache")  # cached
    assert again[:] == ds[:]
    with pytest.raises(UserError, match="no pair is left"):
        prepare_pairs(open_sources(write_jsonl(tmp_path / "same.jsonl", rows[1:2])), tok, template, 40,
                      cache_dir=tmp_path / "cache")


def test_two_sources_are_mixed_with_their_num_samples(tiny_tokenizer, tmp_path):
    """A list of sources: each prepared on its own, mixed by the data entry's plan (num_samples, interleave), the mix
    written once and memory-mapped; the same call again reads the same rows."""
    from tunesmith.data.mixture import plan
    from tunesmith.models import ensure_pad_token

    tok = copy.deepcopy(tiny_tokenizer)
    ensure_pad_token(tok)
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"sky {i}", "chosen": "blue", "rejected": "green"}
                                           for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"sea {i}", "chosen": "deep", "rejected": "dry"}
                                           for i in range(4)])
    template = get_template("qa", tok)
    sources = [a, {"path": b, "num_samples": 2}]
    for mixture in ("concat", "interleave"):
        ds, summaries = prepare_pairs(open_sources(sources), tok, template, 64, mixture=mixture,
                                      cache_dir=tmp_path / "cache")
        src, row = plan([5, 4], [s.spec for s in open_sources(sources)], mixture, 0)
        want = [f"{'sky' if k == 0 else 'sea'} {i}" for k, i in zip(src, row)]
        assert len(summaries) == 2 and len(ds) == len(want) == (7 if mixture == "concat" else len(ds))
        assert [tok.decode(p).split("Q: ")[1].split(" A:")[0] for p in ds["prompt_ids"]] == want
        again, _ = prepare_pairs(open_sources(sources), tok, template, 64, mixture=mixture,
                                 cache_dir=tmp_path / "cache")
        assert again[:] == ds[:]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".partial", ".tmp")]


@pytest.mark.parametrize("chosen, rejected, prompt, answers", [
    ("the sky is blue", "the sky is black", "the sky is", (" blue", " black")),  # TRL: "the sky is bl" + ue / ack
    ("the sky\nis blue", "the sky\nis b", "the sky\nis", (" blue", " b")),
    ("the sky is blue", "the sky is blue and green", "the sky is blue", ("", " and green")),
    ("A: yes", "A: no", "A:", (" yes", " no")),
    ("abc", "abd", "ab", ("c", "d")),  # no whitespace before the difference: cut where they differ
])
def test_implicit_texts_are_cut_before_the_word_where_they_differ(chosen, rejected, prompt, answers):
    pair = to_pair(Record({"chosen": chosen, "rejected": rejected}, "d.jsonl:1"), "implicit")
    assert pair.example.turns[0].prompt == prompt and (pair.chosen, pair.rejected) == answers
