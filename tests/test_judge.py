"""Judges against a real HTTP server on 127.0.0.1 speaking the chat-completions wire format; win-rate math."""
import json
import logging
import re
import time

import pytest

from conftest import LocalServer, QuietHandler, free_port
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.evaluation import judge as J
from tunesmith.evaluation.genfile import pair_generations, read_generations
from tunesmith.evaluation.winrate import combine_orders, format_summary, win_rate

KEY = "sk-test-SECRET-0123456789abcdef"


class FakeServer(LocalServer):
    """Prefers the answer containing GOOD. Instructions containing ALWAYS500 / MALFORMED / SLOW / CHATTY misbehave
    every time; ``fail_next`` makes the next n requests return 500; ``status`` forces a status for all."""

    def __init__(self):
        self.requests, self.fail_next, self.status, self.slow_next, self.busy_next = [], 0, None, 0, 0
        self.redirect_code, self.redirect_to = 302, ""
        server = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                user = body["messages"][-1]["content"]
                if server.status:
                    return self.reply(server.status, b'{"error": "nope"}')
                if server.busy_next > 0:
                    server.busy_next -= 1
                    return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "0.5"})
                if server.fail_next > 0:
                    server.fail_next -= 1
                    return self.reply(500, b'{"error": "overloaded"}')
                if server.slow_next > 0 or "SLOW" in user:
                    server.slow_next = max(0, server.slow_next - 1)
                    time.sleep(0.6)
                if "ALWAYS500" in user:
                    return self.reply(500, b"internal error")
                if "TRUNCATED" in user:  # promises 1000 bytes, sends 12 and hangs up
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    return self.wfile.write(b'{"choices": ')
                if "MALFORMED" in user:
                    return self.reply(200, b'{"choices": [{"mess')
                auth = self.headers.get("Authorization") or ""
                if "ECHO401" in user:  # an error page echoing the key across the 200-byte cut
                    return self.reply(401, ("x" * 173 + " got " + auth).encode())
                if "REDIRECT" in user:  # points at another host: the key must not follow
                    return self.reply(server.redirect_code, b"", {"Location": server.redirect_to})
                if "LISTREPLY" in user:  # content parts instead of a string
                    return self.reply(200, json.dumps({"choices": [{"message": {
                        "role": "assistant", "content": [{"type": "text", "text": "1"}]}}]}).encode())
                m = re.search(r"## Answer 1\n(.*?)\n\n## Answer 2\n(.*?)\n\nWhich", user, re.S)
                reply = "1" if "GOOD" in m.group(1) else ("2" if "GOOD" in m.group(2) else "tie")
                if "CHATTY" in user:
                    reply = "Both answers have merit."
                if "ECHOKEY" in user:  # an unparseable reply echoing the key, once in full and once across the cut
                    reply = f"you sent {auth}; " + "y" * 40 + auth
                self.reply(200, json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                                "role": "assistant", "content": reply}}]}).encode())

        self.start(Handler)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def write_gens(path, rows, generator):
    path.write_text("".join(json.dumps({"instruction": i, "output": o, "generator": generator}) + "\n"
                            for i, o in rows))
    return str(path)


def files(tmp_path, prompts_a, prompts_b):
    return (write_gens(tmp_path / "a.jsonl", prompts_a, "neft"), write_gens(tmp_path / "b.jsonl", prompts_b, "base"))


BASIC_A = [("q1", "GOOD a1"), ("q2", "a2"), ("q3", "GOOD a3"), ("q4", "plain")]
BASIC_B = [("q2", "GOOD b2"), ("q1", "b1"), ("q3", "b3"), ("q4", "other plain")]


def judge_args(tmp_path, a, b, url, *extra):
    return ["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "out"), "--base_url", url,
            "--model", "judge-model", "--api_key_env", "TS_JUDGE_KEY", "--backoff", "0.01", "--timeout", "0.3",
            *extra]


def assert_no_key(tmp_path, *texts):
    """Neither the key nor a 12-character piece of it appears in the texts or in any file written."""
    pieces = [KEY[i:i + 12] for i in range(len(KEY) - 11)]
    for t in texts:
        assert not any(x in t for x in pieces), t
    for p in tmp_path.rglob("*"):
        if p.is_file():
            text = p.read_text(errors="replace")
            assert not any(x in text for x in pieces), p


def test_endpoint_judge_end_to_end_cache_and_key_hygiene(tmp_path, server, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    assert main(judge_args(tmp_path, a, b, server.url)) == 0
    assert len(server.requests) == 8  # 4 prompts x both orders
    assert all(r["auth"] == f"Bearer {KEY}" and r["path"] == "/v1/chat/completions" for r in server.requests)
    assert {r["body"]["model"] for r in server.requests} == {"judge-model"}
    rows = [json.loads(x) for x in (tmp_path / "out/judgements.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["A", "B", "A", "tie"]
    s = json.loads((tmp_path / "out/winrate.json").read_text())
    assert (s["wins"], s["losses"], s["draws"], s["n"]) == (2, 1, 1, 4)
    assert s["win_rate"] == pytest.approx(62.5) and s["win_rate_excluding_draws"] == pytest.approx(200 / 3)
    out = capsys.readouterr()
    assert "62.50" in out.out and "wins/(n − draws)" in out.out
    # rerun: everything comes from the cache
    assert main(judge_args(tmp_path, a, b, server.url)) == 0
    assert len(server.requests) == 8
    out2 = capsys.readouterr()
    assert_no_key(tmp_path, out.out, out.err, out2.out, out2.err, caplog.text)


def test_transient_failures_are_retried(tmp_path, server, monkeypatch, caplog):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    server.fail_next, server.slow_next = 2, 1  # two 500s, then one reply slower than the timeout
    judge = J.EndpointJudge(server.url, "m", "TS_JUDGE_KEY", timeout=0.3, max_retries=4, backoff=0.01)
    assert judge("q", "GOOD", "bad") == "1"
    assert len(server.requests) == 4
    assert "retry" in caplog.text and KEY not in caplog.text


@pytest.mark.parametrize("marker,reason", [("ALWAYS500", "HTTP 500"), ("MALFORMED", "malformed"),
                                           ("SLOW", "timed out"), ("CHATTY", "unparseable"),
                                           ("TRUNCATED", "IncompleteRead")])
def test_single_failures_become_unjudged_not_ties(tmp_path, server, monkeypatch, marker, reason):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    a, b = files(tmp_path, BASIC_A + [(f"q5 {marker}", "GOOD x")], BASIC_B + [(f"q5 {marker}", "y")])
    assert main(judge_args(tmp_path, a, b, server.url, "--max_retries", "1")) == 0
    rows = [json.loads(x) for x in (tmp_path / "out/judgements.jsonl").read_text().splitlines()]
    assert rows[-1]["outcome"] == "unjudged" and reason in rows[-1]["reason"]
    s = json.loads((tmp_path / "out/winrate.json").read_text())
    assert s["unjudged"] == 1 and s["n"] == 4 and s["draws"] == 1
    assert_no_key(tmp_path)


def test_whole_step_failure_exits_nonzero_and_keeps_judgements(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    prompts_a = BASIC_A[:2] + [(f"z{i} ALWAYS500", "o") for i in range(3)]
    prompts_b = BASIC_B[:2] + [(f"z{i} ALWAYS500", "p") for i in range(3)]
    a, b = files(tmp_path, prompts_a, prompts_b)
    code = main(judge_args(tmp_path, a, b, server.url, "--max_retries", "0", "--max_consecutive_failures", "2"))
    assert code != 0
    err = capsys.readouterr().err
    assert "failed on 2 prompts in a row" in err and KEY not in err
    partial = [json.loads(x) for x in (tmp_path / "out/judgements.partial.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in partial] == ["A", "B", "unjudged", "unjudged"]
    assert not (tmp_path / "out/winrate.json").exists()
    assert len((tmp_path / "out/judge_cache.jsonl").read_text().splitlines()) == 4  # both orders of 2 prompts
    assert_no_key(tmp_path)


def test_auth_error_stops_at_once(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    server.status = 401
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    assert main(judge_args(tmp_path, a, b, server.url)) == 2
    assert len(server.requests) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and KEY not in err


def test_unreachable_endpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    port = free_port()  # nobody listens there
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    code = main(judge_args(tmp_path, a, b, f"http://127.0.0.1:{port}/v1", "--max_retries", "1",
                           "--max_consecutive_failures", "2"))
    assert code != 0 and "in a row" in capsys.readouterr().err


def test_missing_key_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TS_JUDGE_KEY", raising=False)
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    assert main(judge_args(tmp_path, a, b, "http://127.0.0.1:9/v1")) == 2
    assert "TS_JUDGE_KEY" in capsys.readouterr().err


def test_mismatched_prompts_and_missing_keys(tmp_path):
    a, b = files(tmp_path, BASIC_A, BASIC_B[:3] + [("other", "x")])
    with pytest.raises(UserError, match=r"a.jsonl:4: field 'instruction': prompt not found in b.jsonl"):
        pair_generations(read_generations(a), read_generations(b))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "o"}\n{"instruction": "q2"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'output': missing"):
        read_generations(bad)


def test_python_judge_position_bias_is_controlled(tmp_path):
    gens = read_generations(files(tmp_path, BASIC_A, BASIC_B)[0])
    pairs = pair_generations(gens, read_generations(tmp_path / "b.jsonl"))
    always_first = J.PythonJudge(lambda i, x, y: "1")
    rows = J.judge_pairs(pairs, always_first, progress=False)
    assert {r["outcome"] for r in rows} == {"tie"}
    rows = J.judge_pairs(pairs, always_first, both_orders=False, progress=False)
    assert {r["outcome"] for r in rows} == {"A"}
    flaky = J.PythonJudge(lambda i, x, y: 1 / 0 if i == "q2" else ("1" if "GOOD" in x else "2"))
    rows = J.judge_pairs(pairs, flaky, progress=False)
    assert [r["outcome"] for r in rows] == ["A", "unjudged", "A", "tie"]  # q4: "2" in both orders
    assert "ZeroDivisionError" in rows[1]["reason"]


def test_python_judge_via_cli(tmp_path, capsys):
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    assert main(["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "o"), "--judge", "python",
                 "--python_judge", "test_judge:good_judge"]) == 0
    s = json.loads((tmp_path / "o/winrate.json").read_text())
    assert (s["wins"], s["losses"], s["draws"]) == (2, 1, 1) and s["name_a"] == "neft" and s["name_b"] == "base"


def good_judge(instruction, x, y):
    return "1" if "GOOD" in x else ("2" if "GOOD" in y else "tie")


def test_human_sheet_roundtrip(tmp_path):
    import csv

    a, b = files(tmp_path, BASIC_A, BASIC_B)
    base = ["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "h")]
    assert main(base + ["--judge", "sheet_export"]) == 0
    sheet = tmp_path / "h/sheet.csv"
    rows = list(csv.DictReader(sheet.open()))
    assert len(rows) == 4 and "GOOD" in (tmp_path / "h/sheet.html").read_text()
    for r in rows:  # a rater who prefers GOOD, leaves one row blank
        r["verdict"] = "" if r["instruction"] == "q4" else good_judge(None, r["answer_1"], r["answer_2"])
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=J.SHEET_FIELDS)
        w.writeheader()
        w.writerows(rows)
    assert main(base + ["--judge", "sheet_import", "--sheet", str(sheet)]) == 0
    out = [json.loads(x) for x in (tmp_path / "h/judgements.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in out] == ["A", "B", "A", "unjudged"]
    rows[0]["verdict"] = "maybe"
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=J.SHEET_FIELDS)
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(UserError, match=r"sheet.csv:2: field 'verdict'"):
        J.import_sheet(sheet, tmp_path / "h/sheet_key.json")


def test_cache_ignores_torn_line(tmp_path):
    c = J.VerdictCache(tmp_path / "c.jsonl")
    c.put("k1", "1")
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('{"key": "k2", "verd')
    assert J.VerdictCache(tmp_path / "c.jsonl").data == {"k1": "1"}


def test_local_judge_decodes_only_new_tokens():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["2", "<pad>", "<unk>", "</s>", "1", "tie", "Answer"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=1, eos_token_id=3))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal -> greedy picks id 0, the token "2"
    judge = J.LocalJudge("tiny", max_new_tokens=2, model=model, tokenizer=tokenizer)
    assert judge("q", "x", "y") == "2"


def test_win_rate_math_hand_made():
    s = win_rate(["A"] * 6 + ["B"] * 2 + ["tie"] * 2 + ["unjudged"] * 3, n_bootstrap=500)
    assert (s["n"], s["wins"], s["losses"], s["draws"], s["unjudged"]) == (10, 6, 2, 2, 3)
    assert s["win_rate"] == pytest.approx(70.0)
    assert s["win_rate_excluding_draws"] == pytest.approx(75.0)
    assert s["ci_low"] < 70 < s["ci_high"] and 0 <= s["ci_low"] and s["ci_high"] <= 100
    assert s["ci_excluding_draws_low"] <= 75 <= s["ci_excluding_draws_high"]
    assert "AlpacaEval" in s["label_win_rate"] and "n − draws" in s["label_win_rate_excluding_draws"]
    assert win_rate(["A"] * 5)["ci_low"] == 100.0  # no variation -> degenerate interval
    all_ties = win_rate(["tie"] * 4)
    assert all_ties["win_rate"] == 50.0 and all_ties["win_rate_excluding_draws"] is None
    assert "undefined" in format_summary(all_ties)
    assert win_rate(["unjudged"])["win_rate"] is None
    with pytest.raises(ValueError):
        win_rate(["draw"])


def test_bootstrap_interval_matches_normal_approximation():
    import math

    s = win_rate(["A"] * 300 + ["B"] * 700, n_bootstrap=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000) * 100
    assert s["ci_low"] == pytest.approx(30 - half, abs=0.6) and s["ci_high"] == pytest.approx(30 + half, abs=0.6)


def test_combine_orders():
    assert combine_orders("1", "2") == "A" and combine_orders("2", "1") == "B"
    assert combine_orders("1", "1") == "tie" and combine_orders("tie", "2") == "tie"
    assert combine_orders(None, "2") == "unjudged"


def test_alpaca_eval_json_list_is_read(tmp_path):
    p = tmp_path / "model_outputs.json"
    p.write_text(json.dumps([{"instruction": "q1", "output": "o1", "generator": "m"},
                             {"instruction": "q2", "output": "o2"}]))
    gens = read_generations(p)
    assert [(g.instruction, g.output, g.generator) for g in gens] == [("q1", "o1", "m"), ("q2", "o2", "model_outputs")]
    p.write_text(json.dumps([{"instruction": "q1", "output": 3}]))
    with pytest.raises(UserError, match="model_outputs.json: row 0: field 'output': expected a string"):
        read_generations(p)


def test_parallel_workers_give_the_same_judgements(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    prompts_a = [(f"p{i}", "GOOD a" if i % 3 else "meh") for i in range(12)]
    prompts_b = [(f"p{i}", "GOOD b" if i % 4 == 0 else "nah") for i in range(12)]
    a, b = files(tmp_path, prompts_a, prompts_b)
    assert main(judge_args(tmp_path, a, b, server.url, "--workers", "4", "--cache", str(tmp_path / "c.jsonl"))) == 0
    rows = [json.loads(x) for x in (tmp_path / "out/judgements.jsonl").read_text().splitlines()]
    expected = ["tie" if (i % 3 != 0) == (i % 4 == 0) else ("A" if i % 3 else "B") for i in range(12)]
    assert [r["outcome"] for r in rows] == expected and [r["index"] for r in rows] == list(range(12))
    assert len(server.requests) == 24 and len(J.VerdictCache(tmp_path / "c.jsonl").data) == 24


def test_retry_after_is_honoured(server, monkeypatch):
    delays = []
    monkeypatch.setattr(J.time, "sleep", delays.append)
    server.busy_next, server.fail_next = 1, 1  # a 429 with Retry-After: 0.5, then a plain 500
    judge = J.EndpointJudge(server.url, "m", None, timeout=2, max_retries=3, backoff=0.01)
    assert judge("q", "bad", "GOOD") == "2"
    assert delays == [0.5, 0.02] and server.requests[0]["auth"] is None


def test_custom_judge_prompt(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('Rubric {"strict": true}\n\n## Instruction\n{instruction}\n\n## Answer 1\n{output_1}\n\n'
                      '## Answer 2\n{output_2}\n\nWhich is better? Reply 1, 2 or tie.')
    assert main(judge_args(tmp_path, a, b, server.url)) == 0
    assert main(judge_args(tmp_path, a, b, server.url, "--judge_prompt", str(prompt))) == 0
    assert len(server.requests) == 16  # a different prompt is a different judge: nothing reused from the cache
    content = server.requests[-1]["body"]["messages"][-1]["content"]
    assert content.startswith('Rubric {"strict": true}') and "## Answer 1\nother plain" in content
    rows = [json.loads(x) for x in (tmp_path / "out/judgements.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["A", "B", "A", "tie"]
    prompt.write_text("{instruction} {output_1}")
    assert main(judge_args(tmp_path, a, b, server.url, "--judge_prompt", str(prompt))) == 2
    assert "lacks the marker {output_2}" in capsys.readouterr().err


def test_render_prompt_leaves_other_braces():
    assert J.render_prompt("{x} {instruction}|{output_1}|{output_2}", "a {output_2}", "b", "c") == \
        "{x} a {output_2}|b|c"


@pytest.mark.parametrize("marker,reason", [("ECHOKEY", "unparseable"),
                                           ("LISTREPLY", "reply content is list, not text")])
def test_server_echoes_and_odd_replies_never_leak_the_key_nor_crash(tmp_path, server, monkeypatch, capsys, caplog,
                                                                    marker, reason):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    a, b = files(tmp_path, BASIC_A + [(f"q5 {marker}", "GOOD x")], BASIC_B + [(f"q5 {marker}", "y")])
    assert main(judge_args(tmp_path, a, b, server.url, "--max_retries", "1")) == 0
    rows = [json.loads(x) for x in (tmp_path / "out/judgements.jsonl").read_text().splitlines()]
    assert rows[-1]["outcome"] == "unjudged" and reason in rows[-1]["reason"]
    assert [r["outcome"] for r in rows[:4]] == ["A", "B", "A", "tie"]
    if marker != "LISTREPLY":
        assert "***" in rows[-1]["reason"]  # the echo is there, redacted
    out = capsys.readouterr()
    assert_no_key(tmp_path, out.out, out.err, caplog.text)


def test_error_page_echoing_the_key_is_redacted_before_it_is_cut(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    a, b = files(tmp_path, [("q ECHO401", "GOOD")], [("q ECHO401", "bad")])
    assert main(judge_args(tmp_path, a, b, server.url)) == 2
    err = capsys.readouterr().err
    assert "HTTP 401 (xxxx" in err and len(server.requests) == 1
    assert_no_key(tmp_path, err)


class RecordingServer(LocalServer):
    """Another host: records whatever reaches it (GET or POST) with its Authorization header."""

    def __init__(self):
        self.hits = []
        hits = self.hits

        class Handler(QuietHandler):
            def _record(self):
                hits.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _record

        # "localhost" is another host name than the judge's 127.0.0.1 (and another port)
        self.start(Handler, host="localhost", path="/steal")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_the_key_never_follows_a_redirect(tmp_path, server, monkeypatch, capsys, code):
    monkeypatch.setenv("TS_JUDGE_KEY", KEY)
    other = RecordingServer()
    try:
        server.redirect_code, server.redirect_to = code, other.url
        a, b = files(tmp_path, [("q REDIRECT", "GOOD")], [("q REDIRECT", "bad")])
        assert main(judge_args(tmp_path, a, b, server.url)) == 2
        err = capsys.readouterr().err
        assert f"HTTP {code} redirects to {other.url}" in err and "set base_url" in err
        assert other.hits == [] and len(server.requests) == 1  # nothing sent elsewhere, no retries
        assert_no_key(tmp_path, err)
    finally:
        other.close()


def test_judges_see_the_alpaca_input_and_pairs_match_on_it(tmp_path):
    rows_a = [{"instruction": "Summarize the text.", "input": "cats", "output": "GOOD cats"},
              {"instruction": "Summarize the text.", "input": "dogs", "output": "dogs"}]
    rows_b = [{"instruction": "Summarize the text.", "input": "dogs", "output": "GOOD dogs"},
              {"instruction": "Summarize the text.", "input": "cats", "output": "cats"}]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = pair_generations(read_generations(tmp_path / "a.jsonl"), read_generations(tmp_path / "b.jsonl"))
    assert [(x.input, y.input) for x, y in pairs] == [("cats", "cats"), ("dogs", "dogs")]
    seen = []

    def judge(instruction, x, y):
        seen.append(instruction)
        return good_judge(instruction, x, y)

    rows = J.judge_pairs(pairs, J.PythonJudge(judge), progress=False)
    assert [r["outcome"] for r in rows] == ["A", "B"] and [r["input"] for r in rows] == ["cats", "dogs"]
    assert seen[0] == "Summarize the text.\n\ncats" and seen[2] == "Summarize the text.\n\ndogs"
    info = J.export_sheet(pairs, tmp_path / "sheet")
    import csv

    sheet = list(csv.DictReader(open(info["sheet"])))
    assert sorted(r["instruction"] for r in sheet) == ["Summarize the text.\n\ncats", "Summarize the text.\n\ndogs"]


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    a, b = files(tmp_path, BASIC_A, BASIC_B)
    (tmp_path / "taken").write_text("x")
    assert main(["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "taken"), "--judge", "python",
                 "--python_judge", "test_judge:good_judge"]) == 2
    assert "'output_dir' is a file, not a directory" in capsys.readouterr().err
    assert main(["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "o"), "--judge", "python",
                 "--python_judge", "test_judge:good_judge", "--cache", str(tmp_path)]) == 2
    assert "'cache' names a directory" in capsys.readouterr().err
