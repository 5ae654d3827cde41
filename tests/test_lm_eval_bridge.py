"""The lm-evaluation-harness bridge on a tiny local task, offline, cross-checked by scoring the choices by hand."""
import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from tunesmith.cli import main  # noqa: E402
from tunesmith.errors import UserError  # noqa: E402
from tunesmith.evaluation.lm_eval_bridge import resolve_tasks, run_tasks  # noqa: E402

DOCS = [{"question": f"what is the color of {thing} {i}", "choices": ["red", "blue", "green"], "answer": i % 3}
        for i, thing in enumerate(["sky", "sea", "grass", "cat", "dog", "mat", "sky", "sea"])]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = tmp_path / "tasks" / "tiny_colors.yaml"
    task.parent.mkdir()
    task.write_text(f"""task: tiny_colors
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return str(task)


def choice_logprob(model, tok, context, continuation):
    """lm-eval's rule: encode context + continuation together, the continuation is what follows the context."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    pos = range(len(ctx) - 1, len(whole) - 1)
    return sum(logp[p, t].item() for p, t in zip(pos, cont))


def test_local_task_matches_manual_scoring(tiny_model_dir, local_task):
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    out = run_tasks(model, tok, [local_task], batch_size=4)
    acc = out["results"]["tiny_colors"]["acc"]
    manual = []
    for d in DOCS:
        scores = [choice_logprob(model, tok, f"Q: {d['question']} A:", " " + c) for c in d["choices"]]
        manual.append(max(range(3), key=scores.__getitem__) == d["answer"])
    assert acc == pytest.approx(sum(manual) / len(manual))
    assert "acc_stderr" in out["results"]["tiny_colors"] and out["n_samples"]["tiny_colors"]["effective"] == 8
    assert not model.training


def test_eval_cli_with_tasks(tiny_model_dir, local_task, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model_name_or_path", tiny_model_dir, "--tasks", local_task, "--task_limit", "4",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["benchmarks"]["results"]) == {"tiny_colors"}
    assert r["benchmarks"]["n_samples"]["tiny_colors"]["effective"] == 4
    assert "tiny_colors: acc " in capsys.readouterr().out


def test_bad_tasks(tiny_model_dir, tmp_path, local_task):
    with pytest.raises(UserError, match="task file not found"):
        resolve_tasks([str(tmp_path / "nope.yaml")])
    names, paths = resolve_tasks([local_task, "arc_easy"])
    assert names == ["tiny_colors", "arc_easy"] and paths == [str((tmp_path / "tasks").resolve())]
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task'"):
        run_tasks(model, tok, [local_task, "no_such_task"], include_defaults=False)


def test_lm_eval_log_likelihoods_equal_lm_evals_own(tiny_model_dir):
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
