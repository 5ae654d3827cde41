"""`tunesmith serve`: the OpenAI-compatible API, tested with the real `openai` client against a server started on a free
loopback port; greedy answers equal `tunesmith generate`'s on full, LoRA-adapter and merged models; bounded concurrent
load (all answered, decoded in shared batches); overload is a 503; bad requests are 400s that leave the server serving;
the bearer key; `tunesmith judge --base_url` against it; the blind-preference endpoint; the CLI as a process."""
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from conftest import alpaca_rows, save_lora_adapter, write_jsonl

from tunesmith.cli import main


def make_runs(base: str, root: Path) -> dict[str, str]:
    """A full model (alpaca template), a LoRA adapter of it (qa template, non-zero B) and its merge."""
    from tunesmith.data.templates import get_template
    from tunesmith.models import load_model_and_tokenizer, merge_adapter, save_model_dir

    full = root / "full"
    model, tok = load_model_and_tokenizer(base)
    save_model_dir(model, tok, full, template=get_template("alpaca"))
    save_lora_adapter(full, root / "adapter", template="qa")
    merge_adapter(str(root / "adapter"), str(root / "merged"))
    return {"full": str(full), "adapter": str(root / "adapter"), "merged": str(root / "merged")}


def make_judge_model(base: str, path: Path) -> str:
    """A model that answers 'tie.' to anything: a huge constant MLP bias in the last layer points the final hidden
    state at the embedding of an added token 'tie.' (tied output embeddings), so greedy decoding always picks it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.data.templates import get_template, save_template

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.add_tokens(["tie."])
    t = tok.convert_tokens_to_ids("tie.")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, mlp_bias=True))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[t] *= 3
        model.model.layers[-1].mlp.down_proj.bias.copy_(1e4 * emb[t] / emb[t].norm())
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    save_template(get_template("chat", tok), path)
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    out = make_runs(tiny_model_dir, root)
    out["judge"] = make_judge_model(tiny_model_dir, root / "judge")
    return out


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    from tunesmith.serve.engine import load_served
    from tunesmith.serve.run import Background, ServeConfig, build_server

    names = list(runs)
    cfg = ServeConfig(model_name_or_path=[runs[n] for n in names], served_model_name=names,
                      preferences_dir=str(tmp_path_factory.mktemp("prefs")), max_batch_size=16)
    srv = build_server(cfg, served=[load_served(runs[n], n, dtype="float32") for n in names])
    bg = Background(srv)
    yield bg
    bg.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    data = body.encode() if isinstance(body, str) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(text)
    except ValueError:
        return resp.status, dict(resp.getheaders()), text


PROMPTS = [{"instruction": r["instruction"], "input": r["input"]} for r in alpaca_rows(6, seed=3)]


PENALTY = {"repetition_penalty": 1.5}  # greedy answers of a random model then depend on the prompt's tokens


def chat_messages(row):
    user = {"role": "user", "content": row["instruction"]}
    if row.get("input"):
        user["input"] = row["input"]
    return [user]


# ---------------------------------------------------------------- the API through the openai client


def test_models_chat_and_completions_with_the_openai_client(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["full", "adapter", "merged", "judge"]
    r = client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[0]), max_tokens=7, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 7 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: the same text, in pieces, then a usage chunk
    chunks = list(client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[0]), max_tokens=7,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    # text completions: a list of prompts x n choices
    r = client.completions.create(model="merged", prompt=["the cat sat", "what is"], max_tokens=4, n=2,
                                  temperature=0.9, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens <= 16
    assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    streamed = list(client.completions.create(model="merged", prompt="the cat sat", max_tokens=4, temperature=0,
                                              stream=True))
    plain = client.completions.create(model="merged", prompt="the cat sat", max_tokens=4, temperature=0)
    assert "".join(ch.choices[0].text for ch in streamed) == plain.choices[0].text


def test_max_tokens_stop_and_seed(client):
    r = client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[1]), max_tokens=12,
                                       temperature=0)
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12
    # stop: the answer ends before the first occurrence of the stop string
    if len(text) > 3:
        stop = text[2:4]
        s = client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[1]), max_tokens=12,
                                           temperature=0, stop=[stop])
        assert s.choices[0].finish_reason == "stop" and s.choices[0].message.content == text[:text.index(stop)]
        streamed = list(client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[1]),
                                                       max_tokens=12, temperature=0, stop=stop, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == text[:text.index(stop)]
    # a seed makes a sample reproducible; n samples differ from one another
    ask = lambda seed: client.chat.completions.create(
        model="full", messages=chat_messages(PROMPTS[2]), max_tokens=10, temperature=1.0, seed=seed, n=3)
    a, b = ask(7), ask(7)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1


def test_greedy_equals_tunesmith_generate_on_full_adapter_and_merged_models(client, runs, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    for name in ("full", "adapter", "merged"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model_name_or_path", runs[name], "--prompts", prompts, "--output", str(out),
                     "--max_new_tokens", "9", "--repetition_penalty", "1.2"]) == 0
        expected = [json.loads(line)["output"] for line in out.read_text().splitlines()]
        got = [client.chat.completions.create(model=name, messages=chat_messages(row), max_tokens=9, temperature=0,
                                              extra_body={"repetition_penalty": 1.2}).choices[0].message.content
               for row in PROMPTS]
        assert got == expected, name
    adapter = [json.loads(line)["output"] for line in (tmp_path / "adapter.jsonl").read_text().splitlines()]
    full = [json.loads(line)["output"] for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert adapter != full  # the adapter (and its qa template) really is in the served model


def test_seeded_sample_equals_tunesmith_generate(client, runs, tmp_path):
    prompts = write_jsonl(tmp_path / "one.jsonl", PROMPTS[:1])
    out = tmp_path / "sampled.jsonl"
    assert main(["generate", "--model_name_or_path", runs["full"], "--prompts", prompts, "--output", str(out),
                 "--max_new_tokens", "8", "--do_sample", "true", "--temperature", "0.8", "--top_p", "0.9",
                 "--seed", "11"]) == 0
    expected = json.loads(out.read_text())["output"]
    r = client.chat.completions.create(model="full", messages=chat_messages(PROMPTS[0]), max_tokens=8,
                                       temperature=0.8, top_p=0.9, seed=11)
    assert r.choices[0].message.content == expected


def test_bounded_concurrent_load_is_batched_and_all_answered(client, server):
    def ask(i, stream=False):
        return client.chat.completions.create(model="adapter", messages=chat_messages(PROMPTS[i]), max_tokens=6,
                                              temperature=0, stream=stream, extra_body=PENALTY)

    expected = {i: ask(i).choices[0].message.content for i in range(len(PROMPTS))}
    assert len(set(expected.values())) > 1  # the answers differ by prompt: a mix-up would show
    engine = server.server.engines["adapter"]
    before = engine.batches

    def one(k):
        i = k % len(PROMPTS)
        if k % 3 == 0:  # some streamed
            return i, "".join(ch.choices[0].delta.content or "" for ch in ask(i, stream=True) if ch.choices)
        return i, ask(i).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    assert len(results) == 48
    assert all(text == expected[i] for i, text in results)  # batched greedy == alone
    assert engine.largest_batch > 1 and engine.batches - before < 48  # forward passes were shared


# ---------------------------------------------------------------- errors and limits


def test_bad_requests_are_400s_and_the_server_keeps_serving(server):
    url = server.url
    long_prompt = " ".join(["the cat sat on the mat"] * 200)
    cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), "unknown model"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
         "'max_tokens' must be >= 1"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": long_prompt}]}), "context"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}),
         "exceed the model's context"),
        (json.dumps({"model": "full", "messages": []}), "non-empty list"),
        (json.dumps({"model": "full", "messages": [{"role": "assistant", "content": "hi"}]}), "must follow"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
         "'temperature' must be a number"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "n": 99}), "'n' must be"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}), "'stop'"),
        (json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}),
         "not supported"),
        (json.dumps({"model": "full", "prompt": 5}), "'prompt' must be"),
    ]
    for body, message in cases:
        path = "/v1/completions" if '"prompt"' in body else "/v1/chat/completions"
        status, _, resp = raw(url, "POST", path, body)
        assert status == 400, (body[:60], resp)
        assert message in resp["error"]["message"] and resp["error"]["type"] == "invalid_request_error", resp
    status, _, resp = raw(url, "POST", "/v1/chat/completions", b"x" * (2 << 20))
    assert status == 413 and "max_body_bytes" in resp["error"]["message"]
    assert raw(url, "GET", "/v1/nothing")[0] == 404
    assert raw(url, "GET", "/v1/chat/completions")[0] == 405
    assert raw(url, "GET", "/v1/models/nope")[0] == 404
    ok, _, resp = raw(url, "POST", "/v1/chat/completions",
                      json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert ok == 200 and resp["choices"][0]["message"]["role"] == "assistant"


def test_a_full_waiting_list_is_a_503_and_nothing_is_lost(runs):
    from tunesmith.serve.engine import Params, load_served
    from tunesmith.serve.run import Background, ServeConfig, build_server

    cfg = ServeConfig(model_name_or_path=[runs["full"]], served_model_name=["full"], max_queue=1, preferences_dir="")
    srv = build_server(cfg, served=[load_served(runs["full"], "full", dtype="float32")])
    engine = srv.engines["full"]
    gate = threading.Event()
    blocker = engine.job([[5, 6, 7]], 1, Params(max_tokens=2, temperature=0), lambda ev: gate.wait(30))
    engine.submit(blocker)  # the worker is held inside this job's first token
    deadline = time.time() + 10
    while engine.waiting and time.time() < deadline:
        time.sleep(0.01)
    bg = Background(srv)
    try:
        body = json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(raw, bg.url, "POST", "/v1/chat/completions", body)  # waits (max_queue 1)
            while not engine.waiting and time.time() < deadline:
                time.sleep(0.01)
            status, headers, resp = raw(bg.url, "POST", "/v1/chat/completions", body)
            assert status == 503 and headers.get("retry-after") == "1" and "busy" in resp["error"]["message"]
            gate.set()
            assert first.result(timeout=60)[0] == 200
        assert raw(bg.url, "POST", "/v1/chat/completions", body)[0] == 200
        assert blocker.done.wait(10) and blocker.error is None
    finally:
        gate.set()
        bg.stop()


def test_bearer_key_from_a_named_variable(runs, monkeypatch, caplog):
    from tunesmith.serve.engine import load_served
    from tunesmith.serve.run import Background, ServeConfig, build_server

    monkeypatch.setenv("TS_TEST_KEY", "s3cret-key")
    cfg = ServeConfig(model_name_or_path=[runs["full"]], served_model_name=["full"], api_key_env="TS_TEST_KEY",
                      preferences_dir="")
    bg = Background(build_server(cfg, served=[load_served(runs["full"], "full", dtype="float32")]), log_level="info")
    try:
        body = json.dumps({"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            status, _, resp = raw(bg.url, "POST", "/v1/chat/completions", body, headers)
            assert status == 401 and resp["error"]["type"] == "authentication_error" and "s3cret" not in str(resp)
        assert raw(bg.url, "GET", "/v1/models")[0] == 401
        ok = openai.OpenAI(base_url=bg.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert ok.chat.completions.create(model="full", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message is not None
        assert raw(bg.url, "GET", "/")[0] == 200  # the page itself holds nothing secret; it asks for the key
    finally:
        bg.stop()
    assert "s3cret-key" not in caplog.text


def test_stop_strings_are_held_back_until_decided():
    from tunesmith.serve.engine import Job, Params

    class Tok:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    events = []
    job = Job([[1]], 1, Params(max_tokens=50, temperature=0, stop=["STOP"]), Tok(), events.append)
    for ch in "abST":
        assert not job.feed(job.choices[0], ord(ch), eos={0})
    assert "".join(e[1] for e in events if e) == "ab"  # "ST" may start "STOP": held back
    for ch in "Ax":
        job.feed(job.choices[0], ord(ch), eos={0})
    assert "".join(e[1] for e in events if e) == "abSTAx"[:len("abSTAx")]  # not a stop after all: released
    assert job.feed(job.choices[0], ord("S"), eos={0}) is False
    for ch in "TOP":
        done = job.feed(job.choices[0], ord(ch), eos={0})
    assert done and job.choices[0].finish_reason == "stop" and job.choices[0].text == "abSTAx"


# ---------------------------------------------------------------- judge, preferences, the CLI


def test_tunesmith_judge_against_the_server(server, tmp_path):
    rows = [{"instruction": p["instruction"], "output": f"answer {i}", "generator": g}
            for g in ("a", "b") for i, p in enumerate(PROMPTS[:3])]
    a = write_jsonl(tmp_path / "a.jsonl", rows[:3])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(r, output=r["output"] + " more") for r in rows[3:]])
    code = main(["judge", "--a", a, "--b", b, "--output_dir", str(tmp_path / "judged"), "--judge", "endpoint",
                 "--base_url", server.url + "/v1", "--model", "judge", "--api_key_env", "", "--max_retries", "0"])
    assert code == 0
    judged = [json.loads(line) for line in (tmp_path / "judged" / "judgements.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in judged] == ["tie"] * 3
    assert json.loads((tmp_path / "judged" / "winrate.json").read_text())["n"] == 3


def test_blind_preferences_are_recorded_in_the_judges_format(server):
    from tunesmith.evaluation.winrate import win_rate

    vote = {"instruction": "hi", "name_a": "full", "name_b": "merged", "output_a": "x", "output_b": "y"}
    outcomes = []
    for answer_1, verdict, outcome in (("B", "1", "B"), ("A", "1", "A"), ("B", "2", "A"), ("A", "tie", "tie")):
        status, _, resp = raw(server.url, "POST", "/tunesmith/preferences",
                              json.dumps(dict(vote, answer_1=answer_1, verdict=verdict)))
        assert status == 200 and resp["recorded"]["outcome"] == outcome
        outcomes.append(outcome)
    path = Path(resp["file"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["outcome"] for r in rows] == outcomes
    assert resp["summary"]["win_rate"] == win_rate(outcomes)["win_rate"] == 62.5
    assert raw(server.url, "POST", "/tunesmith/preferences", json.dumps(dict(vote, verdict="3", answer_1="A")))[0] \
        == 400
    status, _, summary = raw(server.url, "GET", "/tunesmith/preferences?a=full&b=merged")
    assert status == 200 and summary["n"] == 4


@pytest.mark.slow  # a fresh Python process imports torch and transformers (~20 s on 2 busy cores)
def test_the_serve_command_as_a_process(runs, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", runs["merged"], "--port", "0",
                             "--preferences_dir", str(tmp_path / "prefs"), "--log_level", "warning"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "OpenAI API at " in line:
                url = line.split("OpenAI API at ")[1].split("/v1")[0]
        assert url and url.startswith("http://127.0.0.1:"), lines
        status, _, resp = raw(url, "GET", "/v1/models")
        assert status == 200 and resp["data"][0]["id"] == "merged" and resp["data"][0]["template"] == "qa"
        proc.send_signal(signal.SIGTERM)  # a graceful stop; uvicorn then ends by the signal, as a killed process
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = subprocess.run([sys.executable, "-m", "tunesmith.cli", "serve", runs["full"], "--api_key_env", "TS_NOT_SET"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "tunesmith serve: error: command line: environment variable TS_NOT_SET (api_key_env) is not set or empty"]


def test_generate_on_token_streams_every_token_and_stops_rows_alone(runs):
    """The one decoding path's hook: every new token of every row, in order; a row stopped by the caller ends there
    while the others of its batch go on, and their outputs equal an unhooked run's."""
    from tunesmith.generate import generate
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(runs["full"])
    prompts = [tok(t)["input_ids"] for t in ("the cat sat on", "what is the color of the sky", "one two")]
    plain = generate(model, tok, prompts, max_new_tokens=8)
    seen = {i: [] for i in range(3)}

    def on_token(i, token):
        seen[i].append(token)
        return i == 1 and len(seen[i]) == 3  # stop prompt 1 after three tokens

    hooked = generate(model, tok, prompts, max_new_tokens=8, on_token=on_token)
    for i in (0, 2):
        assert hooked[i] == plain[i]
        assert seen[i][:len(plain[i]["output_ids"])] == plain[i]["output_ids"]
    assert hooked[1]["output_ids"] == plain[1]["output_ids"][:3] == seen[1] and not hooked[1]["truncated"]


def test_a_client_that_hangs_up_frees_its_rows(server):
    """A streamed request whose client disconnects stops being decoded at the next step."""
    engine = server.server.engines["judge"]
    before = engine.generated
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"model": "judge", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                  "max_tokens": 900}))
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while b"tie." not in seen:  # decoding has begun
        seen += resp.read1(256)
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 60
    while (engine.busy or engine.waiting or engine.generated == before) and time.time() < deadline:
        time.sleep(0.05)
    assert 0 < engine.generated - before < 900
