"""SPIN: the loss (hand-computed and against TRL's DPO sigmoid loss), two iterations end to end (full and LoRA),
kill -9 during generation and training then resume, token-identical prompts, and bad input."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ScaledLogits, alpaca_rows, free_port, sft_config, write_jsonl

from transformers import TrainerCallback, TrainingArguments

from tunesmith.config import NEFTuneArgs, build_config
from tunesmith.data.formats import Example, Turn
from tunesmith.data.templates import get_template
from tunesmith.data.tokenize import encode, encode_prompt
from tunesmith.errors import UserError
from tunesmith.preference.loss import LossSettings, PairLogps, preference_loss
from tunesmith.preference.pairs import PairCollator, answer_row, pair_logps, score_pairs
from tunesmith.preference.trainer import PreferenceTrainer
from tunesmith.recipes import spin
from tunesmith.recipes.spin.data import generate_shards
from tunesmith.scoring import sequence_logprobs


def spin_config(model_dir, data, out, **over):
    cfg = sft_config(model_dir, data, out, max_length=256, num_iterations=2, beta=0.5, learning_rate=3e-3,
                     num_train_epochs=1, max_new_tokens=10, shard_size=6, generation_batch_size=4,
                     per_device_eval_batch_size=8, save_strategy="steps", save_steps=2,
                     do_sample=False)  # greedy: shards of any size (the torchrun test) hold the same answers
    del cfg["train_loss_eval_samples"]  # an SFT key; SPIN has no such key
    cfg.update(over)
    return cfg


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def shard_rows(directory):
    from datasets import Dataset

    rows = []
    for p in sorted(Path(directory).glob("shard-*.arrow")):
        rows += Dataset.from_file(str(p)).remove_columns("seconds").to_list()
    return rows


def owner(out):
    """The run directory's record: fingerprint, config and the finished stages with their metrics."""
    return json.loads((Path(out) / "tunesmith_run.json").read_text())


def stage(out, t, name):
    return owner(out)["stages"]["finished"].get(f"iteration-{t}/{name}")


@torch.no_grad()
def logps_under(model, pairs, pad_token_id):
    chosen, rejected = score_pairs(model.eval(), pairs, PairCollator(pad_token_id, 256), 8, "cpu")
    return torch.tensor(chosen, dtype=torch.float32), torch.tensor(rejected, dtype=torch.float32)


def spin_loss(real, generated, ref_real, ref_generated, beta, loss_type="sigmoid"):
    """SPIN's loss through the preference engine (chosen = real, rejected = generated): (loss, t)."""
    ones = torch.ones_like(real)
    loss, r_w, r_l = preference_loss(PairLogps(real, generated, ones, ones), ref_real, ref_generated,
                                     LossSettings(loss_type=loss_type, beta=beta))
    return loss, r_w - r_l


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("spin-data") / "sft.jsonl", alpaca_rows(12))


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_file, tmp_path_factory):
    """An uninterrupted two-iteration run (full fine-tuning), recording every shard and stage event."""
    out = tmp_path_factory.mktemp("spin-full") / "run"
    cfg = spin_config(tiny_model_dir, data_file, out)
    events = []
    final = spin.train(cfg, on_event=lambda stage, t, k: events.append((stage, t, k)))
    run = spin.SpinRun(build_config(spin.SPINConfig, cfg))
    return {"cfg": cfg, "out": out, "final": final, "events": events, "run": run}


# ------------------------------------------------------------------------------------------------ the loss


def test_loss_equals_papers_formula_on_hand_computed_numbers():
    # pair 1: t = 0.1 * ((-10 - -11) - (-12 - -11.5)) = 0.15; pair 2 (beta 1): t = (3 - (-1)) = 4 -> hinge 0;
    # pair 3: the generated answer gained more than the real one: t = 0.5 * ((-20 - -19) - (-15 - -17)) = -1.5
    pr, pg = torch.tensor([-10.0, -5.0, -20.0]), torch.tensor([-12.0, -9.0, -15.0])
    rr, rg = torch.tensor([-11.0, -8.0, -19.0]), torch.tensor([-11.5, -8.0, -17.0])
    expected_t = [0.15, 4.0, -1.5]
    for i, beta in enumerate([0.1, 1.0, 0.5]):
        sig, t = spin_loss(pr[i:i + 1], pg[i:i + 1], rr[i:i + 1], rg[i:i + 1], beta, "sigmoid")
        hinge, _ = spin_loss(pr[i:i + 1], pg[i:i + 1], rr[i:i + 1], rg[i:i + 1], beta, "hinge")
        assert t.item() == pytest.approx(expected_t[i], abs=1e-6)
        assert sig.item() == pytest.approx(math.log(1 + math.exp(-expected_t[i])), abs=1e-6)
        assert hinge.item() == pytest.approx(max(0.0, 1 - expected_t[i]), abs=1e-6)
    assert spin_loss(pr[1:2], pg[1:2], rr[1:2], rg[1:2], 1.0, "hinge")[0].item() == 0.0


def _triples(tokenizer):
    template = get_template("alpaca", tokenizer)
    out = []
    for i, r in enumerate(alpaca_rows(6)):
        ex = Example(turns=[Turn(r["instruction"], r["output"])], input=r["input"] or None)
        prompt = encode_prompt(tokenizer, template, ex)
        real = encode(tokenizer, template, ex, 10**9)["input_ids"][len(prompt):]
        generated = tokenizer(f" the sky is {'big ' * (i + 1)}no", add_special_tokens=False)["input_ids"]
        out.append((prompt, real, generated + [tokenizer.eos_token_id]))
    return out


def test_loss_equals_trl_dpo_sigmoid_loss(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tunesmith.models import load_model_and_tokenizer

    reference, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    triples = _triples(tok)
    beta = 0.3

    # tunesmith: reference log-probs stored with the pairs, the policy scored in PreferenceTrainer.compute_loss
    pairs = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": y} for p, r, y in triples]
    collate = PairCollator(tok.pad_token_id, 256)
    ref_r, ref_g = score_pairs(reference.eval(), pairs, collate, 8, "cpu")
    for pair, a, b in zip(pairs, ref_r, ref_g):
        pair["ref_chosen"], pair["ref_rejected"] = a, b
    args = TrainingArguments(output_dir=str(tmp_path / "ts"), use_cpu=True, report_to="none")
    ours = PreferenceTrainer(model=copy.deepcopy(policy).eval(), args=args, train_dataset=pairs,
                             data_collator=collate, loss=LossSettings(loss_type="sigmoid", beta=beta))
    ours_loss = ours.compute_loss(ours.model, collate(pairs)).item()

    # TRL: chosen = real, rejected = generated, a reference copy of the same model, beta = lambda
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid"], bf16=False, use_cpu=True,
                         report_to="none", max_length=None, precompute_ref_log_probs=False)
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
                     train_dataset=text, processing_class=tok)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": y} for p, r, y in triples])
    trl.model.eval()
    with torch.no_grad():
        trl_loss = trl._compute_loss(trl.model, batch, False).item()
    assert trl_loss > 0.1 and abs(trl_loss - math.log(2)) > 1e-3  # a real cross-check, not the trivial log 2
    assert ours_loss == pytest.approx(trl_loss, abs=1e-5)


def full_logits_answer_logprobs(model, batch):
    """Summed log p of each row's answer tokens from the model's whole logits tensor (the independent reference)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def test_answer_logprobs_equal_full_logits_and_fall_back_when_the_head_is_not_plain(tiny_model_dir):
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    model.eval()
    pairs = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": y} for p, r, y in _triples(tok)]
    batch = PairCollator(tok.pad_token_id, 256)(pairs)
    with torch.no_grad():
        full = full_logits_answer_logprobs(model, batch)
        assert torch.allclose(sequence_logprobs(model, batch), full, atol=1e-4)
        scaled = ScaledLogits(model)
        expected = full_logits_answer_logprobs(scaled, batch)
        assert (expected - full).abs().max() > 0.1
        assert torch.allclose(sequence_logprobs(scaled, batch), expected, atol=1e-4)


def test_neftune_noise_on_policy_pass_only(tiny_model_dir, tmp_path):
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    pairs = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": y, "ref_chosen": -30.0, "ref_rejected": -30.0}
             for p, r, y in _triples(tok)]
    collate = PairCollator(tok.pad_token_id, 256)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    tr = PreferenceTrainer(model=model, args=args, train_dataset=pairs, data_collator=collate,
                           loss=LossSettings(beta=0.5), neftune=NEFTuneArgs(15.0))
    batch = collate(pairs)
    model.eval()
    clean = tr.compute_loss(model, batch).item()
    assert tr.compute_loss(model, batch).item() == clean  # eval/scoring passes: no noise
    model.train()
    noisy = tr.compute_loss(model, batch).item()
    assert abs(noisy - clean) > 1e-4


def test_identical_real_and_generated_answers_give_zero_margin_and_no_gradient(tiny_model_dir, tiny_tokenizer):
    """The SFT model often reproduces a training answer: such a pair has t = 0 whatever the weights (loss log 2), so
    it contributes nothing to the gradient; a pair that differs does."""
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    template = get_template("alpaca", tok)
    ex = Example(turns=[Turn("what is the color of sky", "the answer is blue")])
    prompt = encode_prompt(tok, template, ex)
    real = encode(tok, template, ex, 10**9)["input_ids"][len(prompt):]
    other = encode(tok, template, Example(turns=[Turn("what is the color of sky", "it was red")]),
                   10**9)["input_ids"][len(prompt):]
    grads = {}
    for generated, moves in ((real, False), (other, True)):
        pair = {"prompt_ids": prompt, "chosen_ids": real, "rejected_ids": generated,
                "ref_chosen": -5.0, "ref_rejected": -5.0 if not moves else -7.0}  # theta_t scores identical rows alike
        batch = PairCollator(tok.pad_token_id, 256)([pair])
        model.zero_grad()
        lp = pair_logps(model, batch)
        loss, t = spin_loss(lp.chosen, lp.rejected, batch["ref_chosen"], batch["ref_rejected"], beta=0.5)
        loss.sum().backward()
        grads[moves] = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
        if not moves:
            assert t.item() == 0.0 and loss.item() == pytest.approx(math.log(2))
    assert grads[True] > 1e-3 and grads[False] < 1e-5 * grads[True]  # zero up to float rounding


def test_generated_answers_end_as_the_template_ends_real_ones(tiny_model_dir, tmp_path, monkeypatch):
    """A chat template that writes text after the end-of-turn token (here "</s>\n", like Qwen's "<|im_end|>\n"):
    real rows are trained on that tail, so every finished generated row ends with the same tokens; a cut answer has
    no end. With a plain template the end is the EOS alone."""
    import shutil

    from transformers import AutoTokenizer

    import tunesmith.generate

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}"
                         "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}")
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for template, end in (("chat", [tok.eos_token_id] + newline), ("alpaca", [tok.eos_token_id])):
        cfg = build_config(spin.SPINConfig, spin_config(str(model_dir), data, tmp_path / template, template=template))
        run = spin.SpinRun(cfg)
        for p in run.prompts:
            assert p["end_ids"] == end and p["real_ids"][-len(end):] == end
        answers = [[tok.convert_tokens_to_ids("Ġthe")] * 3, [5, 6], [7], [8, 9, 10]]
        monkeypatch.setattr(tunesmith.generate, "generate", lambda model, tokenizer, prompt_ids, **kw: [
            {"output_ids": a, "output": "x", "truncated": i == 3, "new_tokens": len(a)}  # the 4th is cut
            for i, a in enumerate(answers[:len(prompt_ids)])])  # stands in for the model: fixed answers
        generate_shards(cfg, None, run.tokenizer, run.prompts, 0, tmp_path / f"{template}-gen")
        rows = shard_rows(tmp_path / f"{template}-gen")
        assert [r["ids"] for r in rows] == [a + end for a in answers[:3]] + [answers[3]]
        for p, r in zip(run.prompts.select(range(3)), rows):  # the real and the generated row end alike
            real, gen = answer_row(p["prompt_ids"], p["real_ids"], 256), answer_row(p["prompt_ids"], r["ids"], 256)
            assert real["input_ids"][-len(end):] == gen["input_ids"][-len(end):] == end
            assert real["labels"][-len(end):] == gen["labels"][-len(end):] == end  # both trained


def test_a_run_made_with_another_world_size_is_refused(full_run, tmp_path):
    """The world size sets the global batch (and which rank wrote which shard): it is part of the fingerprint."""
    import shutil

    from tunesmith.rundir import Fingerprint

    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    (out / "tunesmith.yaml").unlink()  # as if it had not finished
    state = owner(out)
    assert state["config"]["world_size"] == 1
    state["config"]["world_size"] = 2  # as written by a 2-process torchrun run
    state["fingerprint"] = Fingerprint.of(state["config"]).digest
    (out / "tunesmith_run.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"config differs in world_size\)"):
        spin.train(dict(full_run["cfg"], output_dir=str(out)))


def test_qlora_iterations_end_to_end(tiny_model_dir, tmp_path):
    """load_in_4bit: each iteration's adapter is merged into its full-precision base (theta_t read from disk), so
    iteration 1 generates and scores with theta_1."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(6))
    cfg = spin_config(tiny_model_dir, data, tmp_path / "run", load_in_4bit=True, use_peft=True, lora_r=4,
                      lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, mix_previous_iteration=False,
                      max_new_tokens=6)
    final = spin.train(cfg)
    out = tmp_path / "run"
    assert final == str(out / "iteration-1" / "model")
    for t, base in ((0, tiny_model_dir), (1, str(out / "iteration-0" / "model"))):
        model_dir = out / f"iteration-{t}" / "model"
        assert (model_dir / "model.safetensors").exists() and not (model_dir / "adapter_config.json").exists()
        adapter = json.loads((out / f"iteration-{t}" / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == base  # merged into theta_t, not theta_0
    w0, w1 = weights(tiny_model_dir), weights(out / "iteration-0" / "model")
    linear = [k for k in w0 if "layers" in k and k.endswith("proj.weight")]  # where LoRA sits (all-linear)
    assert linear and max((w1[k] - w0[k]).abs().max().item() for k in linear) > 1e-4  # the adapter was folded in
    assert stage(out, 1, "reference")["ref_real"] != stage(out, 0, "reference")["ref_real"]


# ------------------------------------------------------------------------------------------------ end to end


def test_two_iterations_end_to_end(full_run, tiny_model_dir, tiny_tokenizer):
    out, run = full_run["out"], full_run["run"]
    done = owner(out)["stages"]["finished"]
    assert set(done) == {f"iteration-{t}/{s}" for t in (0, 1) for s in ("generate", "reference", "train")}
    assert (out / "tunesmith.yaml").exists()  # the whole run is finished
    summary = json.loads((out / "summary.json").read_text())
    assert [r["iteration"] for r in summary] == [0, 1]
    assert "| 1 |" in (out / "summary.md").read_text()
    assert full_run["final"] == str(out / "iteration-1" / "model")

    for t in (0, 1):
        tr = stage(out, t, "train")
        # the margin starts at 0 (policy == reference) and rises within the iteration
        logs = [json.loads(line) for line in (out / f"iteration-{t}" / "metrics.jsonl").read_text().splitlines()]
        margins = [e["rewards/margin"] for e in logs if "rewards/margin" in e]
        assert margins[0] == pytest.approx(0.0, abs=1e-4)
        assert margins[-1] > margins[0] + 0.5
        assert tr["reward_margin"] > 0.5 and tr["reward_accuracy"] > 0.5
        assert tr["policy_real"] - tr["ref_real"] > tr["policy_generated"] - tr["ref_generated"]
        gen = stage(out, t, "generate")
        rows = shard_rows(out / f"iteration-{t}" / "generations")
        same = [r["ids"] == p["real_ids"] for r, p in zip(rows, run.prompts)]
        assert gen["identical"] == pytest.approx(sum(same) / 12)
        pairs_t = run.pairs(t, with_reference=False)
        n_same = sum(p["chosen_ids"] == p["rejected_ids"] for p in pairs_t)
        assert tr["identical_pairs"] == pytest.approx(n_same / len(pairs_t))
        assert tr["reward_accuracy_distinct"] == pytest.approx(tr["reward_accuracy"] * len(pairs_t)
                                                               / (len(pairs_t) - n_same))
        assert [r["index"] for r in rows] == list(range(12))  # each prompt exactly once
        assert gen["truncated"] == sum(r["truncated"] for r in rows)
        assert all(len(r["ids"]) == 10 for r in rows if r["truncated"])
        assert not list((out / f"iteration-{t}" / "trainer").glob("checkpoint-*"))  # removed once the model is saved

    # iteration 1 trains on its own and iteration 0's generations (mix_previous_iteration), 24 pairs
    assert stage(out, 1, "train")["trained_on_iterations"] == [1, 0]
    pairs = run.pairs(1, with_reference=True)
    assert len(pairs) == 24
    # iteration 1's reference log-probs are iteration 0's model's (theta_1), not the SFT model's
    stored = torch.tensor([pairs["ref_chosen"], pairs["ref_rejected"]], dtype=torch.float32).T
    r1, g1 = logps_under(load(out / "iteration-0" / "model"), pairs, run.tokenizer.pad_token_id)
    assert torch.allclose(stored, torch.stack([r1, g1], 1), atol=1e-4)
    r0, g0 = logps_under(run.load_model(0).eval(), pairs, run.tokenizer.pad_token_id)
    assert (stored - torch.stack([r0, g0], 1)).abs().max() > 0.1


def test_generation_prompt_is_token_identical_to_training_prefix(full_run, data_file):
    out, run = full_run["out"], full_run["run"]
    rows = shard_rows(out / "iteration-0" / "generations")
    pairs = run.pairs(0, with_reference=True)
    template = get_template("alpaca", run.tokenizer)
    for r, prompt, pair, record in zip(rows, run.prompts, pairs, alpaca_rows(12)):
        ex = Example(turns=[Turn(record["instruction"], record["output"])], input=record["input"] or None)
        trained = encode(run.tokenizer, template, ex, 10**9)  # exactly what SFT trains on
        n = len(prompt["prompt_ids"])
        assert prompt["prompt_ids"] == trained["input_ids"][:n] == pair["prompt_ids"]
        assert trained["labels"][n - 1] == -100 and trained["labels"][n] != -100  # the answer starts right there
        assert pair["prompt_ids"] + pair["chosen_ids"] == trained["input_ids"]  # the real answer as trained
        assert pair["rejected_ids"] == r["ids"]  # the generated answer after the same prompt


def test_sampled_shards_are_reproduced_exactly_when_regenerated(full_run, tmp_path):
    """A sampled shard lost to a crash is regenerated identically (each shard has its own seed). The default
    decoding is the authors' HF script's (the checkpoint's generation config); giving a temperature samples."""
    run = full_run["run"]
    defaults = {k: v for k, v in full_run["cfg"].items() if k not in ("do_sample", "max_new_tokens")}
    cfg = build_config(spin.SPINConfig, dict(defaults, output_dir=str(tmp_path / "o")))
    assert (cfg.spin.generation, cfg.spin.max_new_tokens) == ("checkpoint", 256)
    cfg = build_config(spin.SPINConfig, dict(defaults, output_dir=str(tmp_path / "o"), max_new_tokens=10,
                                             temperature=1.5, repetition_penalty=1.1))
    assert cfg.spin.sampling(None)["do_sample"] and cfg.spin.generation == "custom"
    model = run.load_model(0).eval()
    gen = tmp_path / "g"
    gen.mkdir()
    generate_shards(cfg, model, run.tokenizer, run.prompts, 0, gen)
    first = shard_rows(gen)
    (gen / "shard-00001.arrow").unlink()
    generate_shards(cfg, model, run.tokenizer, run.prompts, 0, gen)
    assert shard_rows(gen) == first
    greedy = shard_rows(full_run["out"] / "iteration-0" / "generations")
    assert [r["ids"] for r in first] != [r["ids"] for r in greedy]  # the sampling settings were used
    generate_shards(cfg, model, run.tokenizer, run.prompts, 1, tmp_path / "h")  # another iteration, other seeds
    assert [r["ids"] for r in shard_rows(tmp_path / "h")] != [r["ids"] for r in first]


def test_rerun_of_a_finished_run_redoes_nothing(full_run):
    out = full_run["out"]
    before = (out / "tunesmith_run.json").read_bytes(), (out / "iteration-1" / "model" / "model.safetensors").stat()
    events = []
    spin.train(full_run["cfg"], on_event=lambda *e: events.append(e))
    assert events == []
    assert (out / "tunesmith_run.json").read_bytes() == before[0]
    assert (out / "iteration-1" / "model" / "model.safetensors").stat().st_mtime_ns == before[1].st_mtime_ns


def test_lora_iterations_merge_so_the_next_reference_is_the_trained_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    held_out = write_jsonl(tmp_path / "e.jsonl", alpaca_rows(4, seed=7))
    cfg = spin_config(tiny_model_dir, data, tmp_path / "run", use_peft=True, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, learning_rate=1e-2, neftune_noise_alpha=5.0, mix_previous_iteration=False,
                      shard_size=8, eval_dataset=held_out)
    spin.train(cfg)
    run = spin.SpinRun(build_config(spin.SPINConfig, cfg))
    merged = tmp_path / "run" / "iteration-0" / "model"
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    pairs = run.pairs(1, with_reference=True)
    assert len(pairs) == 8
    stored = torch.tensor([pairs["ref_chosen"], pairs["ref_rejected"]], dtype=torch.float32).T
    r1, g1 = logps_under(load(merged), pairs, run.tokenizer.pad_token_id)
    assert torch.allclose(stored, torch.stack([r1, g1], 1), atol=1e-4)  # theta_1, scored noise-free
    r0, g0 = logps_under(run.load_model(0).eval(), pairs, run.tokenizer.pad_token_id)
    assert (stored - torch.stack([r0, g0], 1)).abs().max() > 0.1  # not theta_0
    assert stage(tmp_path / "run", 1, "train")["reward_margin"] > 0
    # the held-out loss at the end of each iteration is the trained model's, noise-free
    from tunesmith.data.collate import Collator
    from tunesmith.data.prepare import tokenize_examples
    from tunesmith.data.source import read_examples
    from tunesmith.scoring import dataset_loss

    rows, _ = tokenize_examples(read_examples(held_out), run.tokenizer, get_template("alpaca", run.tokenizer), 256)
    expected = dataset_loss(load(merged), [Collator(run.tokenizer.pad_token_id)(rows)])["loss"]
    assert stage(tmp_path / "run", 0, "train")["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())[1]["eval_loss"] is not None


# ------------------------------------------------------------------------------------------------ kill and resume

KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from transformers import TrainerCallback
    from tunesmith.recipes import spin

    cfg, kill, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def on_event(stage, t, k):
        if kill.get("stage") == stage and kill["iteration"] == t and kill["shard"] == k:
            die()

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            here = args.output_dir.endswith(f"iteration-{kill.get('iteration')}/trainer")
            if here and kill.get("step") == state.global_step:
                die()

    spin.train(cfg, callbacks=[KillAtStep()], on_event=on_event)
""")


def _run_killable(cfg, kill):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(spin.__file__).parents[3])] + sys.path))
    return subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), json.dumps(kill),
                           str(torch.get_num_threads())], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # four subprocesses (~40 s wall on a loaded 2-core machine)
def test_sigkill_during_generation_reference_and_training_then_resume_matches_uninterrupted(full_run, tmp_path):
    cfg = dict(full_run["cfg"], output_dir=str(tmp_path / "run"))
    out = tmp_path / "run"
    # 1. killed right after the first generation shard of iteration 0 is written
    p = _run_killable(cfg, {"stage": "generate", "iteration": 0, "shard": 0})
    assert p.returncode == -9, p.stderr[-2000:]
    gen0 = out / "iteration-0" / "generations"
    assert sorted(x.name for x in gen0.iterdir()) == ["shard-00000.arrow"]  # no half shard, no temp file
    # 2. resumed, then killed after the second reference shard of iteration 1 (24 pairs, 4 shards)
    p = _run_killable(cfg, {"stage": "reference", "iteration": 1, "shard": 1})
    assert p.returncode == -9, p.stderr[-2000:]
    assert sorted(x.name for x in (out / "iteration-1" / "reference").iterdir()) == ["shard-00000.arrow",
                                                                                     "shard-00001.arrow"]
    # 3. resumed, then killed at step 3 of iteration 1's training (after the step-2 checkpoint)
    p = _run_killable(cfg, {"step": 3, "iteration": 1})
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "iteration-1" / "trainer" / "checkpoint-2").exists()
    assert not (out / "iteration-1" / "model").exists()
    assert stage(out, 1, "train") is None and stage(out, 1, "reference") is not None
    # 4. resumed to the end
    p = _run_killable(cfg, {})
    assert p.returncode == 0, p.stderr[-2000:]

    ref = full_run["out"]
    for t in (0, 1):
        a = shard_rows(out / f"iteration-{t}" / "generations")
        b = shard_rows(ref / f"iteration-{t}" / "generations")
        assert [r["index"] for r in a] == list(range(12))
        assert [r["ids"] for r in a] == [r["ids"] for r in b]
        ra, rb = shard_rows(out / f"iteration-{t}" / "reference"), shard_rows(ref / f"iteration-{t}" / "reference")
        assert len(ra) == len(rb) == (12 if t == 0 else 24)
        for x, y in zip(ra, rb):
            assert x["ref_chosen"] == pytest.approx(y["ref_chosen"], abs=1e-4)
            assert x["ref_rejected"] == pytest.approx(y["ref_rejected"], abs=1e-4)
    wa, wb = weights(out / "iteration-1" / "model"), weights(ref / "iteration-1" / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    # training resumed from checkpoint-2: steps 1-2 (logged before the kill) were not trained or logged again
    steps = [json.loads(x)["step"] for x in (out / "iteration-1" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:6] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("over, message", [
    ({"beta": 0}, "'beta' must be > 0"),
    ({"beta": [0.1, -1.0]}, "'beta' must be > 0"),
    ({"learning_rate": [1e-3, 1e-3, 1e-3]}, "'learning_rate' has 3 values but num_iterations is 2"),
    ({"num_train_epochs": [1, 2, 3]}, "'num_train_epochs' has 3 values"),
    ({"loss_type": "kto"}, "loss_type"),
    ({"packing": True}, "packing"),
])
def test_bad_config_is_a_one_line_user_error(over, message, tiny_model_dir, data_file, tmp_path):
    with pytest.raises(UserError, match=message) as e:
        spin.train(spin_config(tiny_model_dir, data_file, tmp_path / "run", **over))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_prompts_without_real_answers_are_refused(tiny_model_dir, tmp_path):
    rows = alpaca_rows(4)
    rows[2]["output"] = "  "
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"d.jsonl:3: the prompt has no real answer"):
        spin.train(spin_config(tiny_model_dir, data, tmp_path / "run"))
    del rows[2]["output"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"d.jsonl:3: field 'output' is missing"):
        spin.train(spin_config(tiny_model_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_model_without_template_is_refused(tiny_model_dir, data_file, tmp_path):
    cfg = spin_config(tiny_model_dir, data_file, tmp_path / "run")
    del cfg["template"]  # the tiny model was not saved by tunesmith: no tunesmith_template.json
    with pytest.raises(UserError, match="tunesmith_template.json"):
        spin.train(cfg)
    assert not (tmp_path / "run").exists()


def test_output_dir_of_another_run_is_refused_and_left_untouched(full_run, tmp_path):
    out = full_run["out"]
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    with pytest.raises(UserError, match="holds a different spin run .*beta"):
        spin.train(dict(full_run["cfg"], beta=0.7))
    assert {p: p.read_bytes() for p in out.rglob("*.json")} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no spin run"):
        spin.train(dict(full_run["cfg"], output_dir=str(tmp_path / "other")))


def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    from tunesmith.cli import main

    code = main(["spin", "--model_name_or_path", tiny_model_dir, "--dataset", data_file, "--output_dir",
                 str(tmp_path / "run"), "--template", "alpaca", "--num_iterations", "2", "--beta", "[0.1, 0.2, 0.3]",
                 "--use_cpu", "true", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "'beta' has 3 values" in err


@pytest.mark.slow
def test_torchrun_two_processes_split_generation_shards_and_train_ddp(full_run, tmp_path):
    import yaml

    cfg = dict(full_run["cfg"], output_dir=str(tmp_path / "run"), num_iterations=1, shard_size=5,
               per_device_train_batch_size=2)  # 2 processes x 2 pairs = the single-process batch of 4
    (tmp_path / "spin.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(spin.__file__).parents[3])] + sys.path))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "tunesmith.cli", "spin", "--config", str(tmp_path / "spin.yaml")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "run"
    gen = out / "iteration-0" / "generations"
    assert sorted(x.name for x in gen.iterdir()) == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    rows = shard_rows(gen)
    assert [r["index"] for r in rows] == list(range(12))
    assert [r["ids"] for r in rows] == [r["ids"] for r in shard_rows(full_run["out"] / "iteration-0" / "generations")]
    ddp, single = stage(out, 0, "train"), stage(full_run["out"], 0, "train")
    assert ddp["steps"] == single["steps"] == 3
    for key in ("loss", "reward_margin", "policy_real", "policy_generated"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-3, abs=1e-3), key


def test_killed_after_the_last_checkpoint_finishes_from_it(tiny_model_dir, data_file, tmp_path):
    """Issue 10 item 4 for SPIN: a kill between the iteration's last checkpoint and its model save is finished from
    that checkpoint, without a training step past it (the Trainer, resumed from a checkpoint that ends mid-epoch,
    would train one more), giving the uninterrupted run's model."""
    # 12 pairs, batch 4: 3 steps an epoch; half an epoch ends at step 2, mid-epoch, where checkpoint-2 is written
    base = spin_config(tiny_model_dir, data_file, None, num_iterations=1, num_train_epochs=0.5)

    class CrashOnLastSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == state.max_steps:
                raise RuntimeError("killed")

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    spin.train(dict(base, output_dir=str(straight)))
    with pytest.raises(RuntimeError, match="killed"):
        spin.train(dict(base, output_dir=str(killed)), callbacks=[CrashOnLastSave()])
    assert [p.name for p in (killed / "iteration-0" / "trainer").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (killed / "iteration-0" / "model").exists()
    spin.train(dict(base, output_dir=str(killed)))
    log = (killed / "iteration-0" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["step"] for x in log) == 2  # nothing trained after the last checkpoint
    wa, wb = weights(killed / "iteration-0" / "model"), weights(straight / "iteration-0" / "model")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_fingerprint_is_built_from_the_config_parts(full_run):
    """Issue 18.8: every key of the config parts (model_revision, chat_template, modules_to_save, bf16/fp16,
    generation_batch_size, ...) plus the tokenized prompts and the world size; a rerun that changes one is refused."""
    values = full_run["run"].fingerprint.values
    for key in ("model_revision", "chat_template", "modules_to_save", "bf16", "fp16", "generation_batch_size",
                "loss_type", "dpop_lambda", "padding_free", "prompts", "world_size"):
        assert key in values, key
    assert "eval_dataset" not in values and "output_dir" not in values
    with pytest.raises(UserError, match=r"config differs in generation_batch_size\)"):
        spin.train(dict(full_run["cfg"], generation_batch_size=3))


def test_lora_honours_modules_to_save(full_run, data_file, tmp_path):
    cfg = build_config(spin.SPINConfig, spin_config(full_run["cfg"]["model_name_or_path"], data_file, tmp_path / "r",
                                                    use_peft=True, lora_r=4, modules_to_save=["norm"]))
    run = spin.SpinRun(cfg)
    model = run.model_to_train(0, run.load_model(0))
    saved = [n for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert saved and all("norm" in n for n in saved)


@pytest.mark.parametrize("loss_type, over", [("dpop", {"dpop_lambda": 5.0}), ("ipo", {}), ("simpo", {})])
def test_the_preference_losses_train_spin_iterations(tiny_model_dir, data_file, tmp_path, loss_type, over):
    """SPIN takes DPO's loss options: with a reference (dpop, ipo) the first step's policy is its reference, so the
    loss is the loss at margin 0 (dpop: ln 2; ipo: (1 / (2 beta))^2); simpo scores no reference (the stage is
    skipped and no reference shard is written)."""
    out = tmp_path / loss_type
    spin.train(spin_config(tiny_model_dir, data_file, out, num_iterations=1, loss_type=loss_type, logging_steps=1,
                           **over))
    logs = [json.loads(x) for x in (out / "iteration-0" / "metrics.jsonl").read_text().splitlines()]
    first = next(e for e in logs if "loss" in e)
    assert stage(out, 0, "train") is not None
    if loss_type == "simpo":
        assert stage(out, 0, "reference") is None and not (out / "iteration-0" / "reference").exists()
    else:
        assert first["loss"] == pytest.approx(math.log(2) if loss_type == "dpop" else (1 / (2 * 0.5)) ** 2, abs=1e-3)
        assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
