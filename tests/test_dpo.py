"""`tunesmith dpo` end to end: full, LoRA and QLoRA runs, what they write, the reference scored once and stored,
resume bit-identical after a crash, the run directory's guards, an adapter directory as the starting model, DDP under
torchrun, and one-line errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, free_port, write_jsonl
from transformers import TrainerCallback

from tunesmith.errors import UserError
from tunesmith.recipes import dpo

COLORS = {"sky": "blue", "sea": "blue", "grass": "green", "sun": "yellow", "dog": "red"}


def preference_rows(n: int = 12, seed: int = 0):
    rng = random.Random(seed)
    things = list(COLORS)
    rows = []
    for i in range(n):
        thing = things[i % len(things)]
        wrong = rng.choice([c for c in set(COLORS.values()) if c != COLORS[thing]])
        rows.append({"prompt": f"what is the color of the {thing} {i % 3}",
                     "chosen": f"the {thing} is {COLORS[thing]}",
                     "rejected": f"the {thing} is {wrong} {rng.choice(WORDS)}"})
    return rows


def dpo_config(model_dir, data, out, **over):
    cfg = dict(model_name_or_path=model_dir, dataset=data, output_dir=str(out), template="qa", max_length=64,
               per_device_train_batch_size=4, per_device_eval_batch_size=8, num_train_epochs=2, learning_rate=5e-3,
               beta=0.5, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
               disable_tqdm=True, dataloader_num_workers=0, shard_size=5)
    cfg.update(over)
    return cfg


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / ("adapter_model.safetensors" if (Path(path) / "adapter_config.json").exists()
                                       else "model.safetensors")))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo-data")
    rows = preference_rows(12) + [{"prompt": "same", "chosen": "the sky", "rejected": "the sky"}]
    return write_jsonl(d / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo-eval") / "eval.jsonl", preference_rows(6, seed=5))


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_file, eval_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-full") / "run"
    cfg = dpo_config(tiny_model_dir, data_file, out, eval_dataset=eval_file)
    dpo.train(cfg)
    return {"cfg": cfg, "out": out}


def test_full_run_learns_the_preference_and_writes_a_finished_model(full_run, tiny_model_dir, data_file):
    out = full_run["out"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tunesmith_template.json", "README.md",
                 "tunesmith.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    logs = metrics(out)
    steps = [e for e in logs if "loss" in e and "rewards/margin" in e]
    assert len(steps) == 6  # 12 kept pairs (the identical one dropped), batch 4, 2 epochs
    assert steps[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as its reference
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    last = steps[-2:]  # the policy learned the preference: margins up, loss down (means of the last two logs)
    assert sum(e["rewards/margin"] for e in last) / 2 > 0.1 and sum(e["loss"] for e in last) / 2 < 0.68
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in steps[0]
    final = logs[-1]
    for key in ("eval_loss", "eval_rewards/accuracy", "eval_rewards/margin", "eval_logps/chosen"):
        assert key in final
    owner = json.loads((out / "tunesmith_run.json").read_text())
    assert owner["command"] == "dpo" and owner["stages"]["finished"]["reference"]["pairs"] == 12
    card = (out / "README.md").read_text()
    assert "loss `sigmoid`" in card and "eval_rewards/accuracy" in card
    assert (out / "reference" / "shard-00000.arrow").exists() and (out / "reference-eval").is_dir()


def test_stored_reference_is_the_starting_models_log_probs(full_run, tiny_model_dir):
    """The reference shards hold the starting model's summed answer log-probs (recomputed here with full logits)."""
    from tunesmith.data.preference import prepare_pairs
    from tunesmith.data.source import open_sources
    from tunesmith.data.templates import get_template
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.preference.pairs import with_reference

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    pairs, _ = prepare_pairs(open_sources(full_run["cfg"]["dataset"]), tok, get_template("qa", tok), 64)
    stored = with_reference(pairs, full_run["out"] / "reference", 5)
    assert len(stored) == 12
    for row in stored.select(range(3)):
        for key in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{key}_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            n = len(row[f"{key}_ids"])
            expected = logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()
            assert row[f"ref_{key}"] == pytest.approx(expected, abs=1e-4)


def full_logits_logps(model, pairs):
    """Summed answer log-probs of each pair's chosen and rejected answer, from the model's whole logits."""
    out = []
    for row in pairs:
        for key in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{key}_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            n = len(row[f"{key}_ids"])
            out.append(logp[-n:].gather(-1, ids[0, -n:, None]).sum().item())
    return torch.tensor(out).view(-1, 2)


def test_eval_metrics_are_the_trained_models_on_the_eval_pairs(full_run, tiny_model_dir, eval_file):
    """eval_rewards/margin and eval_rewards/accuracy: the saved model's log-probs of the eval pairs against the
    starting model's, recomputed here from whole logits."""
    from tunesmith.data.preference import prepare_pairs
    from tunesmith.data.source import open_sources
    from tunesmith.data.templates import get_template
    from tunesmith.models import load_model_and_tokenizer

    start, tok = load_model_and_tokenizer(tiny_model_dir)
    trained, _ = load_model_and_tokenizer(str(full_run["out"]))
    pairs, _ = prepare_pairs(open_sources(eval_file), tok, get_template("qa", tok), 64)
    margins = 0.5 * ((full_logits_logps(trained, pairs) - full_logits_logps(start, pairs)) * torch.tensor([1, -1])
                     ).sum(1)
    final = metrics(full_run["out"])[-1]
    assert final["eval_rewards/margin"] == pytest.approx(margins.mean().item(), abs=1e-4)
    assert final["eval_rewards/accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert final["eval_loss"] == pytest.approx(torch.nn.functional.softplus(-margins).mean().item(), abs=1e-4)


def test_rerun_of_a_finished_run_is_refused_and_a_resume_does_nothing(full_run):
    with pytest.raises(UserError, match="holds a finished run"):
        dpo.train(full_run["cfg"])
    before = (full_run["out"] / "model.safetensors").stat().st_mtime_ns
    dpo.train(dict(full_run["cfg"], resume_from_checkpoint=True))
    assert (full_run["out"] / "model.safetensors").stat().st_mtime_ns == before


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise RuntimeError("killed")


def test_crash_then_resume_is_bit_identical_and_reuses_the_reference(tiny_model_dir, data_file, tmp_path):
    base = dpo_config(tiny_model_dir, data_file, None, save_strategy="steps", save_steps=2, padding_free=True)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    dpo.train(dict(base, output_dir=str(straight)))
    with pytest.raises(RuntimeError, match="killed"):
        dpo.train(dict(base, output_dir=str(crashed)), callbacks=[CrashAt(3)])
    shards = {p.name: p.stat().st_mtime_ns for p in (crashed / "reference").iterdir()}
    with pytest.raises(UserError, match="resume_from_checkpoint: true"):
        dpo.train(dict(base, output_dir=str(crashed)))
    with pytest.raises(UserError, match=r"differs in beta"):
        dpo.train(dict(base, output_dir=str(crashed), resume_from_checkpoint=True, beta=0.7))
    dpo.train(dict(base, output_dir=str(crashed), resume_from_checkpoint=True))
    assert {p.name: p.stat().st_mtime_ns for p in (crashed / "reference").iterdir()} == shards  # not rescored
    a, b = weights(straight), weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in metrics(crashed) if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_a_kill_after_the_last_checkpoint_is_finished_from_it_without_a_step_more(tiny_model_dir, data_file,
                                                                                    tmp_path):
    from test_reliability import CrashOnSave

    out = tmp_path / "run"
    cfg = dpo_config(tiny_model_dir, data_file, out, max_steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(RuntimeError, match="killed"):
        dpo.train(cfg, callbacks=[CrashOnSave(2)])
    dpo.train(dict(cfg, resume_from_checkpoint=True))
    assert [e["step"] for e in metrics(out) if "loss" in e] == [1, 2]  # no step 3
    final, ckpt = weights(out), weights(out / "checkpoint-2")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_lora_run_saves_an_adapter_and_the_reference_is_the_base(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "lora"
    dpo.train(dpo_config(tiny_model_dir, data_file, out, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.3,
                         learning_rate=2e-2, loss_type="dpop", dpop_lambda=5.0))
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    logs = [e for e in metrics(out) if "rewards/margin" in e]
    # the new adapter starts at zero and dropout is off (disable_dropout): the policy starts as its reference
    assert logs[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert logs[-1]["rewards/margin"] > 0.05


def test_reference_free_loss_scores_no_reference(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "simpo"
    dpo.train(dpo_config(tiny_model_dir, data_file, out, loss_type="simpo", beta=2.0, num_train_epochs=1))
    assert not (out / "reference").exists() and (out / "tunesmith.yaml").exists()


def test_qlora_run(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "qlora"
    dpo.train(dpo_config(tiny_model_dir, data_file, out, load_in_4bit=True, lora_r=4, lora_alpha=8,
                         num_train_epochs=1))
    assert (out / "adapter_config.json").exists() and (out / "tunesmith.yaml").exists()


@pytest.mark.parametrize("over, message", [
    ({"loss_type": "kto"}, "'loss_type' must be one of"),
    ({"beta": 0}, "'beta' must be a finite number > 0"),
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, "label_smoothing' applies to loss_type sigmoid only"),
    ({"label_smoothing": 0.5}, r"label_smoothing' must be in \[0, 0.5\)"),
    ({"dpop_lambda": -1}, "dpop_lambda"),
    ({"packing": True}, "'packing' is not supported by DPO"),
    ({"dataset_format": "alpaca"}, "dataset_format' must be auto or one of"),
])
def test_bad_config_is_a_one_line_error(over, message, tiny_model_dir, data_file, tmp_path):
    with pytest.raises(UserError, match=message) as e:
        dpo.train(dpo_config(tiny_model_dir, data_file, tmp_path / "run", **over))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_cli_bad_data_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(2) + [{"prompt": "q", "chosen": "a"}])
    code = main(["dpo", "--model_name_or_path", tiny_model_dir, "--dataset", data, "--output_dir",
                 str(tmp_path / "run"), "--template", "qa", "--use_cpu", "true", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{data}:3: field 'rejected' is missing" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_with_the_whole_batch(full_run, tmp_path):
    """DDP: 2 processes x 2 pairs per step = the single process's 4 pairs: the same steps and losses; the reference
    shards are split between the ranks."""
    import yaml

    cfg = dict(full_run["cfg"], output_dir=str(tmp_path / "run"), per_device_train_batch_size=2)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(dpo.__file__).parents[3])] + sys.path))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "tunesmith.cli", "dpo", "--config", str(tmp_path / "dpo.yaml")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = [e for e in metrics(tmp_path / "run") if "loss" in e and "rewards/margin" in e]
    single = [e for e in metrics(full_run["out"]) if "loss" in e and "rewards/margin" in e]
    assert len(ddp) == len(single) == 6
    for step, (a, b) in enumerate(zip(ddp, single)):
        # step 1 is the same computation split in two; after it Adam amplifies float noise (a 4-pair mean vs the mean
        # of two 2-pair means): 0.2% apart at step 6 was seen, so later steps get 1%
        tolerance = dict(rel=1e-4, abs=1e-5) if step == 0 else dict(rel=1e-2, abs=1e-3)
        for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], **tolerance), (step, key)
    assert len(list((tmp_path / "run" / "reference").glob("shard-*.arrow"))) == 3  # 12 pairs, shards of 5


def test_conversation_pairs_use_the_chat_template_and_tensorboard_gets_the_metrics(tiny_model_dir, tmp_path):
    """template auto (the default) on conversational pairs: the tokenizer's chat template renders the multi-turn
    prompt exactly as apply_chat_template does, the run saves that template, and report_to tensorboard writes the
    reward metrics as scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunesmith.data.preference import prepare_pairs
    from tunesmith.data.source import open_sources
    from tunesmith.data.templates import load_saved_template
    from tunesmith.models import load_model_and_tokenizer

    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    rows = [{"prompt": history + [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in preference_rows(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    dpo.train(dpo_config(tiny_model_dir, data, out, template=None, num_train_epochs=1, max_length=96,
                         report_to="tensorboard"))
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    template = load_saved_template(str(out), tok)
    assert "chat" in template.spec()
    pairs, _ = prepare_pairs(open_sources(data), tok, template, 96)
    messages = rows[0]["prompt"]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(pairs[0]["prompt_ids"]) == want
    assert tok.decode(pairs[0]["chosen_ids"]).startswith(rows[0]["chosen"][0]["content"])
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/rewards/margin", "train/rewards/accuracy", "train/logps/chosen"):
        assert tag in tags, tags
    assert len(events.Scalars("train/rewards/margin")) == 2  # 8 pairs, batch 4, one epoch, logging every step


def test_eval_sources_take_their_num_samples(tiny_model_dir, data_file, eval_file, tmp_path):
    """A held-out source's num_samples caps its eval pairs, as sft caps its eval sets; two sources are named."""
    from tunesmith.recipes.dpo.config import DPOConfig
    from tunesmith.recipes.dpo.run import setup

    from tunesmith.config import build_config

    cfg = build_config(DPOConfig, dpo_config(tiny_model_dir, data_file, tmp_path / "run", eval_dataset=[
        {"path": eval_file, "num_samples": 4, "name": "few"}, {"path": eval_file, "name": "all"}]), "config")
    _, _, data = setup(cfg)
    assert {name: len(pairs) for name, pairs in data["eval"].items()} == {"few": 4, "all": 6}


def test_an_evaluation_at_the_last_step_is_not_run_twice(tiny_model_dir, data_file, eval_file, tmp_path):
    out = tmp_path / "run"
    dpo.train(dpo_config(tiny_model_dir, data_file, out, eval_dataset=eval_file, num_train_epochs=1,
                         eval_strategy="epoch"))
    evals = [e for e in metrics(out) if "eval_rewards/accuracy" in e]
    assert len(evals) == 1 and evals[0]["step"] == 3  # 12 pairs, batch 4
    assert "eval_rewards/accuracy" in (out / "README.md").read_text()
