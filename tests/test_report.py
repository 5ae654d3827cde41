"""`tunesmith eval` and `tunesmith report`: the full flow on two tiny SFT runs (with and without NEFTune)."""
import json

import pytest
import torch

from conftest import sft_config, write_jsonl, alpaca_rows
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.evaluation import metrics as M
from tunesmith.evaluation.evaluate import EvalConfig, generation_stats, run as run_eval


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    """Two real SFT runs on the same data, one with NEFTune, plus greedy generations on the training prompts."""
    from tunesmith.recipes.sft import train

    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "train.jsonl", alpaca_rows(24))
    heldout = write_jsonl(root / "heldout.jsonl", alpaca_rows(8, seed=7))
    runs = {}
    for name, alpha in (("base", None), ("neft", 5.0)):
        out = root / name
        cfg = sft_config(tiny_model_dir, data, out, eval_dataset=heldout, eval_strategy="steps", eval_steps=3,
                         num_train_epochs=2, **({"neftune_noise_alpha": alpha} if alpha else {}))
        train(cfg)
        gen = out / "gen_train.jsonl"
        assert main(["generate", "--model", str(out), "--prompts", data, "--output", str(gen),
                     "--max_new_tokens", "12", "--repetition_penalty", "1.2", "--generator", name]) == 0
        runs[name] = out
    return root, data, heldout, runs


def manual_loss(model_dir, data):
    """Token-weighted NLL over response tokens computed straight from HF's own per-example loss."""
    from tunesmith.data.source import read_examples
    from tunesmith.data.templates import load_saved_template
    from tunesmith.data.tokenize import encode
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    template = load_saved_template(model_dir, tok)
    total = count = 0.0
    for ex in read_examples(data):
        enc = encode(tok, template, ex, 512)
        n = sum(1 for x in enc["labels"][1:] if x != -100)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]]))
        total += out.loss.item() * n
        count += n
    return total / count


def test_eval_loss_and_generation_metrics(two_runs, capsys):
    root, data, heldout, runs = two_runs
    out = runs["neft"] / "eval.json"
    assert main(["eval", "--model_name_or_path", str(runs["neft"]), "--dataset", f"{data},{heldout}", "--generations",
                 str(runs["neft"] / "gen_train.jsonl"), "--n_tokens", "4", "--batch_size", "5",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["run"] == "neft"
    assert r["loss"][data]["loss"] == pytest.approx(manual_loss(str(runs["neft"]), data), rel=1e-4)
    assert r["loss"][heldout]["examples"] == 8
    assert r["loss"][data]["perplexity"] == pytest.approx(torch.tensor(r["loss"][data]["loss"]).exp().item(),
                                                          rel=1e-5)
    g = r["generations"]["gen_train"]
    rows = [json.loads(x) for x in (runs["neft"] / "gen_train.jsonl").read_text().splitlines()]
    outputs, refs = [x["output"] for x in rows], [x["reference"] for x in rows]
    assert g["n"] == 24 and g["generator"] == "neft"
    assert g["overlap"]["rouge_l_mean"] == pytest.approx(M.overlap(outputs, refs)["rouge_l_mean"])
    assert g["overlap"]["bleu_corpus"] == pytest.approx(M.corpus_bleu(outputs, refs))
    assert g["diversity"] == M.rep_diversity(outputs, 4)
    assert "loss on" in capsys.readouterr().out


def test_eval_references_file_and_errors(tmp_path):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "q1", "output": "the cat sat"},
                                              {"instruction": "q2", "output": "a dog ran far away"}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "q2", "output": "a dog ran"},
                                              {"instruction": "q1", "output": "the cat sat"}])
    s = generation_stats(gens, 4, refs={("q1", ""): "the cat sat", ("q2", ""): "a dog ran"})
    assert s["overlap"]["rouge_l"] == [1.0, pytest.approx(2 * 1 * 0.6 / 1.6)]
    r = run_eval(EvalConfig(output=str(tmp_path / "e.json"), generations=[gens], references=refs, n_tokens=4))
    assert r["generations"]["g"]["overlap"]["rouge_l"][0] == 1.0
    (tmp_path / "other").mkdir()
    gens2 = write_jsonl(tmp_path / "other" / "g.jsonl", [{"instruction": "q1", "output": "x y z w"}])
    r = run_eval(EvalConfig(output=str(tmp_path / "e.json"), generations=[gens, gens2], n_tokens=4))
    assert list(r["generations"]) == ["g", "g-2"] and r["generations"]["g-2"]["n"] == 1
    no_ref = generation_stats(gens, 4)
    assert no_ref["overlap"] is None and "no references" in no_ref["overlap_note"]
    with pytest.raises(UserError, match=r"g.jsonl:2: field 'instruction': no reference"):
        generation_stats(gens, 4, refs={("q1", ""): "x"})
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "q1"}])
    with pytest.raises(UserError):
        run_eval(EvalConfig(output=str(tmp_path / "e2.json"), generations=[gens], references=empty))
    with pytest.raises(UserError, match="nothing to evaluate"):
        EvalConfig(output="x")
    with pytest.raises(UserError, match="n_tokens must be at least 4"):
        EvalConfig(output="x", generations=[gens], n_tokens=3)


def test_a_bad_n_tokens_names_every_accepted_value(tmp_path, capsys):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "q1", "output": "a b c d e"}])
    assert main(["eval", "--generations", gens, "--output", str(tmp_path / "e.json"), "--n_tokens", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "tunesmith eval: error: command line: field 'n_tokens': expected an integer or auto, got 'many'"


def test_eval_references_match_instruction_and_input(tmp_path):
    """Alpaca rows that share an instruction differ by their input: each generation gets its own reference."""
    refs = write_jsonl(tmp_path / "r.jsonl", [
        {"instruction": "Summarize the text.", "input": "the cat sat on the mat", "output": "a cat sat"},
        {"instruction": "Summarize the text.", "input": "dogs run in the park", "output": "dogs run"},
        {"instruction": "Summarize the text.", "output": "nothing to summarize"}])
    gens = write_jsonl(tmp_path / "g.jsonl", [
        {"instruction": "Summarize the text.", "input": "dogs run in the park", "output": "dogs run"},
        {"instruction": "Summarize the text.", "output": "nothing to summarize"},
        {"instruction": "Summarize the text.", "input": "the cat sat on the mat", "output": "a cat sat"}])
    r = run_eval(EvalConfig(output=str(tmp_path / "e.json"), generations=[gens], references=refs, n_tokens=4))
    assert r["generations"]["g"]["overlap"]["rouge_l"] == [1.0, 1.0, 1.0]
    other = write_jsonl(tmp_path / "o.jsonl", [{"instruction": "Summarize the text.", "input": "unknown text",
                                               "output": "x"}])
    with pytest.raises(UserError, match=r"o.jsonl:1: field 'instruction': no reference answer with this "
                                        r"instruction and input"):
        run_eval(EvalConfig(output=str(tmp_path / "e.json"), generations=[other], references=refs, n_tokens=4))
    bad = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "input": 3, "output": "x"}])
    with pytest.raises(UserError, match=r"b.jsonl:1: field 'input': expected a string"):
        generation_stats(bad, 4)


def test_eval_diversity_mode_is_recorded(tmp_path, capsys):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "q", "output": "a b a b a b"}])
    assert main(["eval", "--generations", gens, "--n_tokens", "6", "--diversity_mode", "paper", "--output",
                 str(tmp_path / "e.json")]) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    d = r["generations"]["g"]["diversity"]
    assert r["diversity_mode"] == d["mode"] == "paper" and d["rep_2"] == 50.0  # formula mode: 60.0
    assert "paper mode, first 6 words" in capsys.readouterr().out
    assert main(["eval", "--generations", gens, "--n_tokens", "4", "--diversity_mode", "paper", "--output",
                 str(tmp_path / "e.json")]) == 2
    assert "n_tokens must be at least 5" in capsys.readouterr().err
    assert main(["eval", "--generations", gens, "--diversity_mode", "simctg", "--output",
                 str(tmp_path / "e.json")]) == 2


def test_report_renders_with_plots(two_runs, tmp_path, capsys):
    root, data, heldout, runs = two_runs
    for name, mode in (("base", "formula"), ("neft", "paper")):
        assert main(["eval", "--generations", str(runs[name] / "gen_train.jsonl"), "--n_tokens", "5",
                     "--diversity_mode", mode, "--output", str(runs[name] / "eval.json")]) == 0
        ev = json.loads((runs[name] / "eval.json").read_text())
        assert ev["diversity_mode"] == mode and ev["generations"]["gen_train"]["diversity"]["mode"] == mode
    ev = json.loads((runs["base"] / "eval.json").read_text())
    ev["benchmarks"] = {"results": {"tiny_colors": {"acc": 0.375, "acc_stderr": 0.18}}}
    (runs["base"] / "eval.json").write_text(json.dumps(ev))
    wr_dir = tmp_path / "judge"
    assert main(["judge", "--a", str(runs["neft"] / "gen_train.jsonl"), "--b", str(runs["base"] / "gen_train.jsonl"),
                 "--judge", "python", "--python_judge", "test_report:longer_judge", "--output_dir", str(wr_dir)]) == 0
    wr = json.loads((wr_dir / "winrate.json").read_text())
    assert wr["n"] == 24 and (wr["name_a"], wr["name_b"]) == ("neft", "base")
    out = tmp_path / "report"
    assert main(["report", str(runs["base"]), str(runs["neft"]), "--output", str(out), "--winrate",
                 str(wr_dir)]) == 0
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for png in ("loss_curves.png", "overlap.png", "winrates.png"):
        data_ = (out / png).read_bytes()
        assert data_[:8] == b"\x89PNG\r\n\x1a\n" and len(data_) > 5000, png
        assert f"]({png})" in md and f"src='{png}'" in page
        import matplotlib.image

        img = matplotlib.image.imread(out / png)
        assert img.shape[0] > 100 and img.std() > 0.01  # something is drawn
    # numbers a reader needs are in the text, not only in JSON
    ev = json.loads((runs["neft"] / "eval.json").read_text())["generations"]["gen_train"]
    assert f"{ev['overlap']['rouge_l_mean']:.4f}" in md
    assert "neft / gen_train" in md and "base / gen_train" in md
    assert f"| neft vs base | python | {wr['wins']} / {wr['draws']} / {wr['losses']} | 24 | 0 | " \
           f"{wr['win_rate']:.2f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}]" in md
    log = [json.loads(x) for x in (runs["neft"] / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_eval_loss" in x for x in log) and any("eval_train_loss" in x for x in log)
    assert "| base | tiny_colors | acc 0.3750 | acc_stderr 0.1800 |" in md
    assert "held-out loss (last logged)" in md and "<table>" in page
    # the report says how rep-n was computed, and warns when the runs differ
    assert "formula mode: rep-n" in md and "paper mode: as the NEFTune paper" in md
    assert "do not all use the same mode" in md
    assert "3 plots" in capsys.readouterr().out


def longer_judge(instruction, x, y):
    """A deterministic python judge for the flow test: the answer with more words wins."""
    return "tie" if len(x.split()) == len(y.split()) else ("1" if len(x.split()) > len(y.split()) else "2")


def test_report_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither metrics.jsonl nor eval.json"):
        main_report([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="run directory not found"):
        main_report([str(tmp_path / "nope")])
    (tmp_path / "w.json").write_text("{}")
    with pytest.raises(UserError, match="field 'n': missing"):
        main_report(["--winrate", str(tmp_path / "w.json")])
    with pytest.raises(UserError, match="'output' is a file, not a directory"):
        main_report(["--winrate", str(tmp_path / "w.json"), "--output", str(tmp_path / "w.json")])
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "q", "output": "a b c d"}])
    with pytest.raises(UserError, match="'output' names a directory"):
        EvalConfig(output=str(tmp_path), generations=[gens])


def main_report(argv):
    from tunesmith.evaluation.report import cli

    return cli(argv)


def test_metrics_log_torn_last_line_is_skipped_but_bad_middle_line_is_an_error(tmp_path):
    from tunesmith.evaluation.report import read_metrics_log

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics_log(p)] == [1, 2]
    p.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics_log(p)


def test_n_tokens_auto_keeps_most_short_answers(tmp_path, capsys):
    """Issue 23.6: 20 short answers (5-14 words). The paper's fixed N of 50 leaves every one out (every cell '-');
    the default, auto, takes the largest N that keeps at least 80% of them, and says which N in eval.json, in the
    printed line and in the report."""
    import random

    from tunesmith.evaluation.report import ReportConfig, run as run_report

    rng = random.Random(3)
    words = "red blue green sky sea grass cat dog ran sat far away the a".split()
    lengths = [5 + i % 10 for i in range(20)]
    (tmp_path / "run").mkdir()
    gens = write_jsonl(tmp_path / "run" / "g.jsonl", [
        {"instruction": f"q{i}", "output": " ".join(rng.choice(words) for _ in range(n))}
        for i, n in enumerate(lengths)])
    # the same rule by brute force: the largest N with at least 16 of the 20 answers this long
    expect = max(n for n in range(4, 20) if sum(k >= n for k in lengths) >= 16)
    assert expect == M.auto_n_tokens([" ".join(["w"] * k) for k in lengths]) == 7
    assert main(["eval", "--generations", gens, "--output", str(tmp_path / "run" / "eval.json")]) == 0
    r = json.loads((tmp_path / "run" / "eval.json").read_text())
    d = r["generations"]["g"]["diversity"]
    assert r["n_tokens"] == "auto" and d["n_tokens"] == expect and d["n_tokens_rule"].startswith("auto")
    assert d["n_used"] == sum(k >= expect for k in lengths) >= 16 and d["rep_2"] is not None
    assert f"first {expect} words (auto)" in capsys.readouterr().out
    run_report(ReportConfig(runs=[str(tmp_path / "run")], output=str(tmp_path / "rep")))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "largest N that keeps at least 80%" in md and f"| {expect} | {d['n_used']} / {d['n_too_short']} |" in md

    assert main(["eval", "--generations", gens, "--n_tokens", "50", "--output", str(tmp_path / "e50.json")]) == 0
    fixed = json.loads((tmp_path / "e50.json").read_text())["generations"]["g"]["diversity"]
    assert fixed["n_tokens"] == 50 and fixed["n_used"] == 0 and fixed["rep_2"] is None  # the paper's N, one flag away
    assert fixed["n_tokens_rule"] == "fixed"


def test_auto_n_tokens_matches_its_definition():
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(0, 40) for _ in range(rng.randint(1, 30))]
        texts = [" ".join(["w"] * k) for k in lengths]
        ok = [n for n in range(4, 42) if sum(k >= n for k in lengths) >= 0.8 * len(lengths)]
        assert M.auto_n_tokens(texts) == (max(ok) if ok else 4)
