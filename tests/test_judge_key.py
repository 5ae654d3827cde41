"""Issue 18.2: the judge's key never leaves (whatever form a server echoes it in), and --timeout bounds a whole
request. A real HTTP server on 127.0.0.1."""
import base64
import json
import logging
import time
import urllib.parse

import pytest
from conftest import LocalServer, QuietHandler

from tunesmith.cli import main
from tunesmith.evaluation import judge as J

KEY = "sk-test/SECRET+0123456789abcdef=="  # '/' and '+' make the JSON, URL and base64 forms differ from the raw key


def b64_forms(data: bytes) -> list[str]:
    return [base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode().rstrip("=")]


# Every form a server may echo the key in: JSON with \/ escaping, every character \u-escaped, URL-encoded, base64 of
# the header (so the key sits at an offset inside the encoded blob) and of the key alone.
ECHOES = {
    "json_slash": json.dumps(KEY).replace("/", "\\/")[1:-1],
    "json_unicode": "".join(f"\\u{ord(c):04x}" for c in KEY),
    "json_unicode_upper": "".join(f"\\u{ord(c):04X}" for c in KEY),
    "url": urllib.parse.quote(KEY, safe=""),
    "url_plus": urllib.parse.quote_plus(KEY),
    "b64_header": b64_forms(f"Authorization: Bearer {KEY}".encode())[0],
    "b64_bearer": b64_forms(f"Bearer {KEY}".encode())[1],
    "b64_key": b64_forms(KEY.encode())[0],
    "b64_key_offset": b64_forms(b"xy" + KEY.encode() + b"z")[0],
}


def leaks(text: str) -> list[str]:
    """Pieces of the key (12 characters of the raw key) or whole echoes found in ``text``."""
    found = [KEY[i:i + 12] for i in range(len(KEY) - 11) if KEY[i:i + 12] in text]
    return found + [name for name, form in ECHOES.items() if form in text]


class EchoServer(LocalServer):
    """Answers every chat request with the echo named in the instruction (an error page or a reply), or, for
    DRIBBLE, one byte a second; HUGE sends a body of several megabytes."""

    def __init__(self):
        self.auth = []
        me = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                me.auth.append(self.headers.get("Authorization"))
                user = body["messages"][-1]["content"]
                if "DRIBBLE" in user:
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:
                        pass
                    return
                if "HUGE" in user:
                    data = b"x" * (5 << 20)
                    return self.reply(200, data)
                for name, form in ECHOES.items():
                    if f"ECHO_{name} " in user:
                        if "ERROR" in user:  # an error page carrying the echo as raw bytes
                            return self.reply(500, ('{"error": "bad key ' + form + '"}').encode())
                        return self.reply(200, json.dumps({"choices": [{"message": {
                            "role": "assistant", "content": f"your key: {form}"}}]}).encode())
                self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": "1"}}]})
                           .encode())

        self.start(Handler)


@pytest.fixture
def server():
    s = EchoServer()
    yield s
    s.close()


def gens(tmp_path, name, instructions):
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"instruction": i, "output": f"{name} answer", "generator": name}) + "\n"
                         for i in instructions))
    return str(p)


def argv(tmp_path, url, instructions, *extra):
    return ["judge", "--a", gens(tmp_path, "a", instructions), "--b", gens(tmp_path, "b", instructions),
            "--output_dir", str(tmp_path / "out"), "--base_url", url, "--model", "m", "--api_key_env", "TS_KEY",
            "--backoff", "0.01", "--timeout", "5", "--max_retries", "1", "--max_consecutive_failures", "0", *extra]


def test_a_key_read_from_a_file_with_its_newline_works(tmp_path, server, monkeypatch):
    monkeypatch.setenv("TS_KEY", f"  {KEY}\n")
    assert main(argv(tmp_path, server.url, ["q1"])) == 0
    assert set(server.auth) == {f"Bearer {KEY}"}


@pytest.mark.parametrize("bad", [f"{KEY[:10]}\n{KEY[10:]}", f"{KEY}ключ", f"{KEY[:5]}\x07{KEY[5:]}", f"{KEY}\x7f"])
def test_a_key_that_cannot_be_a_header_is_one_line_that_does_not_show_it(tmp_path, server, monkeypatch, capsys,
                                                                         bad):
    monkeypatch.setenv("TS_KEY", bad)
    capsys.readouterr()
    assert main(argv(tmp_path, server.url, ["q1"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TS_KEY" in err and "Traceback" not in err, err
    assert not leaks(err) and bad.strip() not in err and KEY[:10] not in err
    assert server.auth == []


def test_every_echoed_form_of_the_key_is_redacted(tmp_path, server, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TS_KEY", KEY)
    instructions = [f"q ECHO_{name} " for name in ECHOES] + [f"q ERROR ECHO_{name} " for name in ECHOES]
    assert main(argv(tmp_path, server.url, instructions)) == 2  # nothing could be judged
    out = capsys.readouterr()
    rows = [json.loads(x) for x in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert all(r["outcome"] == "unjudged" for r in rows) and sum("***" in r["reason"] for r in rows) == len(rows)
    texts = [out.out, out.err, caplog.text] + [p.read_text() for p in (tmp_path / "out").iterdir() if p.is_file()]
    for text in texts:
        assert not leaks(text), (leaks(text), text[:2000])


def test_userinfo_in_base_url_is_refused_without_echoing_it(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("TS_KEY", KEY)
    url = server.url.replace("http://", "http://judge:PA55W0RD-S3CRET@")
    capsys.readouterr()
    assert main(argv(tmp_path, url, ["q1"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base_url" in err and "PA55W0RD" not in err, err
    assert server.auth == []


def test_timeout_bounds_the_whole_request(server, monkeypatch):
    monkeypatch.setenv("TS_KEY", KEY)
    judge = J.EndpointJudge(server.url, "m", "TS_KEY", timeout=1.0, max_retries=0)
    start = time.monotonic()
    with pytest.raises(J.JudgeFailure, match=r"timed out: no complete reply within 1 s"):
        judge("q DRIBBLE", "a", "b")  # the server sends one byte a second for 100 s
    assert time.monotonic() - start < 10


def test_a_reply_larger_than_the_cap_is_refused(server, monkeypatch):
    monkeypatch.setenv("TS_KEY", KEY)
    judge = J.EndpointJudge(server.url, "m", "TS_KEY", timeout=30, max_retries=0)
    with pytest.raises(J.JudgeFailure, match=r"larger than"):
        judge("q HUGE", "a", "b")


def test_redact_covers_every_form():
    judge = J.EndpointJudge("http://127.0.0.1:9/v1", "m", None)
    judge._key = KEY
    for name, form in ECHOES.items():
        assert not leaks(judge.redact(f"before {form} after")), name
    assert judge.redact("nothing secret here") == "nothing secret here"
