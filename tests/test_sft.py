"""The SFT recipe end to end: full / LoRA / QLoRA train and reload, packing == no packing, kill and resume,
2-process DDP == 1 process, merge, audit, and every bad input's one-line error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import alpaca_rows, free_port, sft_config, write_jsonl
from tunesmith.cli import main
from tunesmith.data.collate import Collator
from tunesmith.recipes import sft
from tunesmith.scoring import dataset_loss

HERE = Path(__file__).parent
SRC = Path(sft.__file__).parents[3]  # the tunesmith under test (this checkout), for worker processes


def losses(out):
    return [r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]


def final_metrics(out):
    return [r for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "eval_train_loss" in r][-1]


def reloaded_loss(out, data_file):
    from tunesmith.data.prepare import tokenize_examples
    from tunesmith.data.source import read_examples
    from tunesmith.data.templates import load_saved_template
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(out)
    template = load_saved_template(out, tok)
    enc, _ = tokenize_examples(read_examples(data_file), tok, template, 128)
    batches = [Collator(tok.pad_token_id)(enc[i:i + 8]) for i in range(0, len(enc), 8)]
    return dataset_loss(model, batches)["loss"]


@pytest.mark.parametrize("variant", [{}, {"use_peft": True, "learning_rate": 1e-2},
                                     {"load_in_4bit": True, "learning_rate": 1e-2}])
def test_training_lowers_loss_and_saved_model_reloads(tiny_model_dir, alpaca_file, tmp_path, variant):
    out = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "run", num_train_epochs=4,
                               train_loss_eval_samples=1000, **variant))
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.3
    files = set(os.listdir(out))
    assert {"tunesmith.yaml", "tunesmith_template.json", "README.md", "tokenizer.json"} <= files
    card = ModelCard.load(os.path.join(out, "README.md"))  # a Hugging Face model card: metadata header + text
    assert "tunesmith" in card.data.tags and card.data.library_name == ("peft" if variant else "transformers")
    assert "## Final metrics" in card.text and "- eval_train_loss: " in card.text
    assert ("adapter_model.safetensors" if variant else "model.safetensors") in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    if variant.get("load_in_4bit"):
        return  # the 4-bit base is re-quantized on load; the adapter file itself is checked above
    assert reloaded_loss(out, alpaca_file) == pytest.approx(final_metrics(out)["eval_train_loss"], abs=1e-4)


def test_padding_free_batches_train_exactly_like_padded_ones(tiny_model_dir, alpaca_file, tmp_path):
    runs = {}
    for free in (False, True):
        out = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / f"free{free}", max_steps=4,
                                   padding_free=free, train_loss_eval_samples=0))
        runs[free] = losses(out)
    assert len(runs[True]) == 4
    assert runs[True] == pytest.approx(runs[False], abs=2e-5)  # the batch layout: tests/test_collate.py


def test_packing_run_trains(tiny_model_dir, alpaca_file, tmp_path):
    out = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "p", packing=True, num_train_epochs=4))
    curve = losses(out)
    assert curve[-1] < curve[0]


def _worker(cfg_path, *extra, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(SRC)]))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
           if torchrun else [sys.executable])
    return subprocess.run(cmd + [str(HERE / "sft_worker.py"), str(cfg_path), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_mid_training_resumes_to_identical_weights(tiny_model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    base = sft_config(tiny_model_dir, alpaca_file, None, max_steps=6, save_strategy="steps", save_steps=2,
                      neftune_noise_alpha=5.0, train_loss_eval_samples=0)
    paths = {}
    for name in ("straight", "killed"):
        cfg = dict(base, output_dir=str(tmp_path / name))
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(cfg))
    assert _worker(paths["straight"]).returncode == 0
    killed = _worker(paths["killed"], "6")  # after step 6, before its checkpoint: resumes from step 4
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "tunesmith.yaml").exists()  # does not look finished
    cfg = json.loads(paths["killed"].read_text())
    cfg["resume_from_checkpoint"] = "true"
    paths["killed"].write_text(json.dumps(cfg))
    logged_before = [r["step"] for r in map(json.loads, open(tmp_path / "killed" / "metrics.jsonl")) if "loss" in r]
    assert logged_before == [1, 2, 3, 4, 5]
    resumed = _worker(paths["killed"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    logged = [r["step"] for r in map(json.loads, open(tmp_path / "killed" / "metrics.jsonl")) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 5 (after the step-4 checkpoint) is not logged twice
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_ddp_matches_one_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32))
    base = sft_config(tiny_model_dir, data, None, max_steps=4, train_loss_eval_samples=0,
                      gradient_accumulation_steps=2)
    one = dict(base, output_dir=str(tmp_path / "one"), per_device_train_batch_size=4)
    two = dict(base, output_dir=str(tmp_path / "two"), per_device_train_batch_size=2)
    for name, cfg in (("one", one), ("two", two)):
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    r1 = _worker(tmp_path / "one.json")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _worker(tmp_path / "two.json", torchrun=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    worlds = [json.loads((tmp_path / "two" / f"world.rank{r}").read_text()) for r in (0, 1)]
    assert all((w["world_size"], w["args_world_size"]) == (2, 2) for w in worlds)
    # without NEFTune the ranks' generators are left as the Trainer set them
    assert worlds[0]["rng"] == worlds[1]["rng"]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, abs=2e-4)


def test_audit_marks_trained_tokens(tiny_model_dir, alpaca_file, capsys):
    assert main(["audit", "--model_name_or_path", tiny_model_dir, "--dataset", alpaca_file,
                 "--output_dir", "unused", "--template", "qa", "--show", "1"]) == 0
    out = capsys.readouterr().out
    first = alpaca_rows()[0]
    assert f"A:⟦ {first['output']}</s>⟧" in out
    assert "32 examples, 32 kept, 0 dropped" in out and "EOS trained in 32/32" in out


def _bad(tmp_path, content: bytes, **over):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    return data


@pytest.mark.parametrize("content,over,expected", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": \n', {}, r"bad\.jsonl:2: malformed JSON"),
    (b'{"instruction": "a"}\n', {}, r"bad\.jsonl:1: field 'output' is missing"),
    (b'{"instruction": ["a"], "output": "b"}\n', {}, r"bad\.jsonl:1: field 'instruction' must be a string"),
    (b'{"instruction": "a", "output": "b"}\n', {"dataset_format": "xml"}, r"unknown dataset_format 'xml'"),
    (b'{"instruction": "a", "output": "b"}\n', {"template": "fancy"}, r"unknown template 'fancy'"),
    (b'{"instruction": "a", "output": "b"}\n', {"template": "Q: {prompt}"}, r"response marker"),
    (b'{"instruction": "a", "output": "\xc3("}\n', {}, r"bad\.jsonl:1: not valid UTF-8"),
    (b"", {}, r"bad\.jsonl: the dataset is empty"),
    (b'{"instruction": "a", "output": "b"}\n', {"dataset": "/nonexistent/x.jsonl"}, r"x\.jsonl: file not found"),
    (b'{"instruction": "a", "output": "b"}\n', {"learning_rate": "fast"}, r"field 'learning_rate': expected a number"),
    (b'{"instruction": "a", "output": "b"}\n', {"lerning_rate": "1"}, r"unknown flag --lerning_rate \(did you mean "
                                                                      r"--learning_rate\?\)"),
])
def test_bad_input_is_one_line_and_leaves_no_finished_run(tiny_model_dir, tmp_path, capsys, content, over, expected):
    import re

    data = _bad(tmp_path, content)
    out = tmp_path / "out"
    args = {"model_name_or_path": tiny_model_dir, "dataset": str(data), "output_dir": str(out), "report_to": "none",
            "use_cpu": "true", **over}
    argv = ["sft"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(expected, err), err
    assert not (out / "tunesmith.yaml").exists() and not (out / "model.safetensors").exists()


def test_console_script_exit_code_and_config_file_errors(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: x\n  dataset: [\n")
    r = subprocess.run(["tunesmith", "sft", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run.yaml:2: invalid YAML" in r.stderr and "Traceback" not in r.stderr
