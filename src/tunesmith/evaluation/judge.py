"""Pairwise judging of two generation files, prompt by prompt (`tunesmith judge`).

Judges (all answer "1", "2" or "tie" for one instruction and two answers):

* ``endpoint``: any OpenAI-compatible chat-completions server (hosted, vLLM, llama.cpp). The API key is read from the
  environment variable named by ``api_key_env`` (whitespace around it removed; a key a header cannot carry is refused
  without showing it) and is never logged or written anywhere: whatever the server sends back (error bodies,
  replies, redirect targets) is redacted — the key raw, JSON-escaped, URL-encoded or base64-encoded — before it
  reaches a log line, ``judgements.jsonl`` or an error message, and redirects are not followed, so the key is only
  ever sent to ``base_url``'s host (a redirect stops the step, naming where it points: set ``base_url`` to that
  address); a ``base_url`` with a user name or password is refused. ``timeout`` bounds each request's whole time
  (connect, send, the entire reply; a watchdog closes the socket at the deadline) and a reply over
  :data:`MAX_REPLY_BYTES` is refused. Retries with exponential backoff; a reply that cannot be parsed (or whose
  content is not text) is retried too, then counted unjudged.
* ``local``: a local causal LM run with transformers (greedy, a few tokens).
* ``python``: any callable ``f(instruction, output_1, output_2) -> "1" | "2" | "tie"`` (``module:function``).
* ``sheet_export`` / ``sheet_import``: a human sheet. Export writes shuffled, blinded pairs as CSV (to fill in) and
  HTML (to read); the side order is kept in a key file; import reads the filled CSV.

Judges see the prompt as the generation file holds it: the instruction, and below it the Alpaca ``input`` when there
is one (as AlpacaEval shows Alpaca prompts). Every machine judge is asked twice per prompt, once in each answer
order, and a side wins only if preferred in both (see :func:`tunesmith.evaluation.winrate.combine_orders`).
Verdicts are cached on disk (one JSON line appended per verdict), so a rerun asks only what is missing. A prompt
whose judge call still fails after the retries is counted "unjudged" (never a tie); if ``max_consecutive_failures``
prompts fail in a row the step stops with an error, after writing the judgements obtained so far.
"""
from __future__ import annotations

import csv
import hashlib
import html
import http.client
import importlib
import json
import logging
import os
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from tunesmith.config import field
from tunesmith.errors import UserError, at
from tunesmith.evaluation.genfile import Generation, pair_generations, read_generations
from tunesmith.evaluation.winrate import combine_orders, format_summary, win_rate
from tunesmith.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger("tunesmith.judge")

SYSTEM_PROMPT = ("You are a careful, impartial judge. You compare two answers to the same instruction and pick the one "
                 "that follows the instruction better: more helpful, correct, relevant and clear. The order in which "
                 "the answers are shown and their length must not sway you.")
USER_PROMPT = ("## Instruction\n{instruction}\n\n## Answer 1\n{output_1}\n\n## Answer 2\n{output_2}\n\n"
               "Which answer is better? Reply with exactly one of: 1, 2, tie.")
_VERDICT = re.compile(r"^\W*(?:answer\s*)?(1|2|tie)\b", re.IGNORECASE)
_MARKER = re.compile(r"\{(instruction|output_1|output_2)\}")


def render_prompt(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """Fill the three markers in one pass (other braces in the template or the texts are left alone)."""
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    return _MARKER.sub(lambda m: values[m.group(1)], template)


def read_prompt_template(path: str | Path | None) -> str:
    """The judge's user-prompt template: the built-in one, or a text file with {instruction}, {output_1} and
    {output_2} that asks for a reply starting with 1, 2 or tie."""
    if not path:
        return USER_PROMPT
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the judge prompt ({e.__class__.__name__})") from None
    missing = [m for m in ("{instruction}", "{output_1}", "{output_2}") if m not in text]
    if missing:
        raise UserError(f"{path}: the judge prompt lacks the marker {missing[0]}")
    return text


class JudgeFailure(Exception):
    """One judge call failed (after the judge's own retries): that prompt is counted unjudged."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class JudgeStepError(UserError):
    """The judge cannot work at all (bad key, wrong URL, too many failures in a row): the step stops."""


def parse_verdict(reply: str) -> str:
    m = _VERDICT.match(reply.strip())
    if not m:
        raise JudgeFailure(f"unparseable judge reply {reply.strip()[:80]!r}")
    return m.group(1).lower()


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- judges

MAX_REPLY_BYTES = 1 << 20  # a verdict is a few bytes; an error page a few KB: a larger reply is refused unread
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\/")


def check_base_url(base_url: str) -> None:
    """A ``base_url`` must be http(s), and carry no user name or password (``user:secret@host``): tunesmith would
    send and echo it. Refused without showing what was before the '@'."""
    rest = base_url.split("//", 1)[1] if "//" in base_url else base_url
    if "@" in re.split(r"[/?#]", rest, maxsplit=1)[0]:
        raise UserError("base_url holds a user name or password before '@' (not shown); remove it and give the key "
                        "through api_key_env")
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"base_url must start with http:// or https://, got {base_url!r}")


def read_api_key(api_key_env: str) -> str:
    """The API key from the environment variable ``api_key_env``, surrounding whitespace removed (keys read from
    files end in a newline). A key an HTTP header cannot carry is a one-line error that does not show the key."""
    key = (os.environ.get(api_key_env) or "").strip()
    if not key:
        raise UserError(f"environment variable {api_key_env} (api_key_env) is not set; set it to the API key, "
                        f"or pass --api_key_env '' for a server without a key")
    for i, c in enumerate(key):
        if not (32 <= ord(c) < 127 or c == "\t"):
            what = ("a line break" if c in "\r\n" else "a control character" if ord(c) < 32 or ord(c) == 127
                    else "a non-ASCII character")
            raise UserError(f"environment variable {api_key_env} (api_key_env): the key holds {what} at character "
                            f"{i + 1} of {len(key)}, which an HTTP header cannot carry; check what the variable holds "
                            f"(the key is not shown)")
    return key


def key_forms(key: str) -> list[str]:
    """The forms in which a server may echo ``key``: as sent, JSON-escaped (also with '\\/'), URL-encoded, and
    base64 (standard and URL-safe alphabets, with or without padding, and — for a key inside a longer encoded text
    such as a whole header — the part of the encoding that depends on the key alone, at each of the three byte
    offsets). Longest first, so a longer form is replaced before a shorter one inside it."""
    import base64
    from urllib.parse import quote, quote_plus

    raw = key.encode()
    forms = {key, json.dumps(key)[1:-1], json.dumps(key)[1:-1].replace("/", "\\/"), quote(key, safe=""),
             quote(key), quote_plus(key)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(raw).decode()
        forms |= {whole, whole.rstrip("=")}
        for offset in range(3):
            encoded = encode(b"\0" * offset + raw).decode()
            core = encoded[4 if offset else 0: 4 * ((offset + len(raw)) // 3)]
            if len(core) >= 8:
                forms.add(core)
    return sorted((f for f in forms if f), key=len, reverse=True)


class EndpointJudge:
    """OpenAI-compatible ``POST {base_url}/chat/completions``. The key goes to that URL only (no redirects); each
    request, from connecting to the last byte of the reply, takes at most ``timeout`` seconds, and a reply larger
    than :data:`MAX_REPLY_BYTES` is refused."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, temperature: float = 0.0, max_tokens: int = 8,
                 user_prompt: str = USER_PROMPT):
        check_base_url(base_url)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries, self.backoff = model, timeout, max_retries, backoff
        self.temperature, self.max_tokens, self.user_prompt = temperature, max_tokens, user_prompt
        self._key = read_api_key(api_key_env) if api_key_env else None
        self._forms: tuple[str | None, list[str]] = (None, [])
        self.id = _sha("endpoint", self.url, model, temperature, max_tokens, SYSTEM_PROMPT, user_prompt)

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` in every form a server may echo it (see :func:`key_forms`;
        JSON ``\\uXXXX`` / ``\\/`` escapes and URL %-escapes are decoded first, so partly escaped echoes are caught
        too). Apply it to whole server texts BEFORE shortening them, so no fragment of the key survives a cut."""
        if not self._key:
            return text
        from urllib.parse import unquote

        if self._forms[0] != self._key:
            self._forms = (self._key, key_forms(self._key))
        for _ in range(3):  # escapes within escapes
            decoded = _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else "/", text)
            decoded = unquote(decoded) if "%" in decoded else decoded
            if decoded == text:
                break
            text = decoded
        for form in self._forms[1]:
            text = text.replace(form, "***")
        return text

    def _body(self, raw: bytes) -> str:
        return self.redact(raw[:65536].decode("utf-8", "replace")).strip()

    def _connection(self):
        """An HTTP(S) connection to the endpoint (through the environment's proxy, as urllib would use it) and the
        request target."""
        import ssl
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        https = parts.scheme == "https"
        host, port = parts.hostname, parts.port or (443 if https else 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        proxy = urllib.request.getproxies().get(parts.scheme)
        context = ssl.create_default_context() if https else None
        if proxy and not urllib.request.proxy_bypass(host):
            pp = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            auth = {}
            if pp.username:
                import base64

                token = base64.b64encode(f"{pp.username}:{pp.password or ''}".encode()).decode()
                auth = {"Proxy-Authorization": f"Basic {token}"}
            if https:
                conn = http.client.HTTPSConnection(pp.hostname, pp.port or 8080, timeout=self.timeout,
                                                   context=context)
                conn.set_tunnel(host, port, headers=auth)
                return conn, target, {}
            conn = http.client.HTTPConnection(pp.hostname, pp.port or 8080, timeout=self.timeout)
            return conn, self.url, auth
        if https:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context), target, {}
        return http.client.HTTPConnection(host, port, timeout=self.timeout), target, {}

    def _exchange(self, body: bytes, headers: dict) -> tuple[int, object, bytes]:
        """POST ``body``; (status, headers, reply body). The whole exchange — connect, send, the status line and
        headers, the body — must end within ``timeout`` seconds: a watchdog shuts the socket at the deadline (a
        server that sends one byte a second would otherwise never time out: socket timeouts are per read)."""
        import socket
        import threading

        conn, target, extra = self._connection()
        expired = threading.Event()

        def expire():
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("POST", target, body=body, headers=headers | extra)
            resp = conn.getresponse()
            raw = resp.read(MAX_REPLY_BYTES + 1)
            if len(raw) > MAX_REPLY_BYTES:
                raise JudgeFailure(f"the reply is larger than {MAX_REPLY_BYTES} bytes; refused")
            if resp.length:  # the server hung up before the Content-Length it promised
                raise http.client.IncompleteRead(raw, resp.length)
            return resp.status, resp.headers, raw
        except (http.client.HTTPException, OSError, ValueError) as e:
            if expired.is_set():
                raise JudgeFailure(f"timed out: no complete reply within {self.timeout:g} s") from None
            raise JudgeFailure(f"{type(e).__name__}: {self.redact(str(e))[:200]}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        status, reply_headers, raw = self._exchange(body, headers)
        if status >= 300:
            detail = self._body(raw)
            if status < 400:  # never followed: the key must not travel to another address
                where = self.redact(str(reply_headers.get("Location", "?")))[:200]
                raise JudgeStepError(f"judge endpoint {self.url}: HTTP {status} redirects to {where}; tunesmith "
                                     f"does not follow redirects (the API key would go along): set base_url to "
                                     f"the final address")
            if status in (401, 403, 404):  # the same request will never work: stop the step
                raise JudgeStepError(f"judge endpoint {self.url}: HTTP {status} ({detail[:200]})")
            retry_after = None
            try:  # 429 / 503 servers may say how long to wait (seconds form only)
                retry_after = float(reply_headers.get("Retry-After", ""))
            except (TypeError, ValueError):
                pass
            raise JudgeFailure(f"HTTP {status} ({detail[:100]})", retry_after)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeFailure(f"malformed response body {self._body(raw)[:80]!r}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise JudgeFailure(f"reply content is {type(content).__name__}, not text "
                               f"({self.redact(json.dumps(content, ensure_ascii=False))[:80]})")
        return self.redact(content)

    def __call__(self, instruction: str, output_1: str, output_2: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": render_prompt(self.user_prompt, instruction, output_1, output_2)}]
        reason, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            try:
                return parse_verdict(self._post(messages))
            except JudgeFailure as e:
                reason, retry_after = self.redact(str(e)), e.retry_after
            if attempt < self.max_retries:
                delay = max(self.backoff * 2 ** attempt, min(retry_after or 0.0, 60.0))
                log.warning("judge call failed (%s); retry %d/%d in %.1fs", reason, attempt + 1, self.max_retries,
                            delay)
                time.sleep(delay)
        raise JudgeFailure(f"{reason} (after {self.max_retries} retries)")


class LocalJudge:
    """A causal LM judge run with transformers: greedy, a few new tokens, same prompt as the endpoint judge."""

    def __init__(self, model_path: str, max_new_tokens: int = 4, model=None, tokenizer=None,
                 user_prompt: str = USER_PROMPT):
        if model is None:
            from tunesmith.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(model_path)
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        self.user_prompt = user_prompt
        self.id = _sha("local", str(model_path), max_new_tokens, SYSTEM_PROMPT, user_prompt)

    def __call__(self, instruction: str, output_1: str, output_2: str) -> str:
        import torch

        user = render_prompt(self.user_prompt, instruction, output_1, output_2)
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
                add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = self.tokenizer(f"{SYSTEM_PROMPT}\n\n{user}\nVerdict:")["input_ids"]
        input_ids = torch.tensor([list(ids)], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return parse_verdict(self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))


class PythonJudge:
    """Wrap ``f(instruction, output_1, output_2)`` returning "1"/"2"/"tie" (1/2/0 accepted)."""

    def __init__(self, fn: Callable | str):
        if isinstance(fn, str):
            module, _, name = fn.partition(":")
            if not name:
                raise UserError(f"python_judge must look like 'module:function', got {fn!r}")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise UserError(f"python_judge {fn!r}: cannot import ({e})") from None
        self.fn = fn
        self.id = _sha("python", getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))

    def __call__(self, instruction: str, output_1: str, output_2: str) -> str:
        try:
            v = self.fn(instruction, output_1, output_2)
        except Exception as e:  # a judge bug on one prompt: that prompt is unjudged, the rest go on
            raise JudgeFailure(f"python judge raised {type(e).__name__}: {e}") from None
        v = {1: "1", 2: "2", 0: "tie"}.get(v, v) if not isinstance(v, bool) else v
        if v not in ("1", "2", "tie"):
            raise JudgeFailure(f"python judge returned {v!r}; expected '1', '2' or 'tie'")
        return v


# ---------------------------------------------------------------- cache

RESULT_FILES = ("judgements.jsonl", "winrate.json")
PARTIAL_FILES = ("judgements.partial.jsonl",)
SHEET_FILES = ("sheet.csv", "sheet.html", "sheet_key.json")


def check_cache_file(path: str | Path) -> None:
    """An existing verdict cache must be one (lines of ``{"key", "verdict"}``; a torn last line is fine): verdicts
    are appended to it, so a user's file given as ``cache`` is refused before any work."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and set(row) == {"key", "verdict"}
        except ValueError:
            ok = i == len(lines) - 1  # a line torn by a kill
        if not ok:
            raise UserError(f"{path}:{i + 1}: 'cache' is not a judge cache (lines of key and verdict); verdicts "
                            f"would be appended to it: choose another file")


class VerdictCache:
    """Append-only JSONL of verdicts keyed by (judge, instruction, answer 1, answer 2). Each verdict is one line
    written with a single ``write`` on an O_APPEND descriptor and fsynced; a torn last line (crash) is ignored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["key"]] = row["verdict"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, verdict: str) -> None:
        self.data[key] = verdict
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"key": key, "verdict": verdict}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the judging loop

def judge_pairs(pairs: list[tuple[Generation, Generation]], judge: Callable, cache: VerdictCache | None = None,
                both_orders: bool = True, max_consecutive_failures: int = 5, progress: bool = True,
                on_row: Callable[[dict], None] | None = None, workers: int = 1) -> list[dict]:
    """Judge every pair; returns one row per prompt with ``outcome`` in A / B / tie / unjudged.

    With ``both_orders=False`` A is always shown first (position bias not controlled). ``workers`` > 1 asks that
    many prompts at once (threads; results are still taken, cached and counted in prompt order)."""
    from concurrent.futures import ThreadPoolExecutor

    judge_id = getattr(judge, "id", None) or _sha("callable", repr(judge))
    redact = getattr(judge, "redact", None) or (lambda text: text)  # nothing a server sent may carry the key out
    rows, fails_in_a_row = [], 0

    def ask(instruction, first, second):
        key = _sha(judge_id, instruction, first, second)
        if cache is not None and (hit := cache.get(key)) is not None:
            return hit, None
        try:
            v = judge(instruction, first, second)
        except JudgeFailure as e:
            return None, redact(str(e))
        if cache is not None:
            cache.put(key, v)
        return v, None

    def judge_one(item):
        a, b = item
        v1, err1 = ask(a.prompt, a.output, b.output)
        v2, err2 = ask(a.prompt, b.output, a.output) if both_orders and v1 is not None else (None, None)
        return a, b, v1, v2, err1 or err2

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(judge_one, pairs) if pool else map(judge_one, pairs)
        for i, (a, b, v1, v2, err) in enumerate(results):
            if both_orders:
                outcome = combine_orders(v1, v2)
            else:
                outcome = {"1": "A", "2": "B", "tie": "tie", None: "unjudged"}[v1]
            row = {"index": i, "instruction": a.instruction, **({"input": a.input} if a.input else {}),
                   "outcome": outcome, "verdict_a_first": v1, "verdict_b_first": v2 if both_orders else None,
                   "loc_a": a.loc, "loc_b": b.loc}
            if outcome == "unjudged":
                row["reason"] = err
                fails_in_a_row += 1
                log.warning("prompt %d unjudged: %s", i, err)
            else:
                fails_in_a_row = 0
            rows.append(row)
            if on_row:
                on_row(row)
            if progress:
                print(f"\rjudged {i + 1}/{len(pairs)}", end="", file=sys.stderr, flush=True)
            if max_consecutive_failures and fails_in_a_row >= max_consecutive_failures:
                raise JudgeStepError(f"the judge failed on {fails_in_a_row} prompts in a row (last: {err}); "
                                     f"{len(rows) - fails_in_a_row} judgements kept")
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if progress:
            print(file=sys.stderr)
    return rows


# ---------------------------------------------------------------- human sheets

SHEET_FIELDS = ["id", "instruction", "answer_1", "answer_2", "verdict"]


def export_sheet(pairs: list[tuple[Generation, Generation]], out_dir: str | Path, seed: int = 0) -> dict:
    """Write ``sheet.csv`` (fill the ``verdict`` column with 1, 2 or tie), ``sheet.html`` (for reading) and
    ``sheet_key.json`` (which side is answer 1; keep it away from the raters). Pairs and sides are shuffled."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    rows, key = [], {}
    for n, i in enumerate(order, 1):
        a, b = pairs[i]
        a_first = rng.random() < 0.5
        sid = f"q{n:04d}"
        key[sid] = {"index": i, "answer_1": "A" if a_first else "B", "instruction": a.instruction,
                    **({"input": a.input} if a.input else {})}
        rows.append({"id": sid, "instruction": a.prompt, "answer_1": a.output if a_first else b.output,
                     "answer_2": b.output if a_first else a.output, "verdict": ""})
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SHEET_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "sheet.csv", buf.getvalue(), command="judge")
    cells = "".join(
        f"<tr><td>{r['id']}</td><td>{html.escape(r['instruction'])}</td><td>{html.escape(r['answer_1'])}</td>"
        f"<td>{html.escape(r['answer_2'])}</td></tr>\n" for r in rows)
    atomic_write_text(out_dir / "sheet.html", (
        "<!doctype html><meta charset='utf-8'><title>tunesmith judging sheet</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;white-space:pre-wrap;border:1px solid #ccc;"
        "padding:6px;max-width:40em}</style>"
        "<h1>Which answer is better?</h1><p>For each id, write <b>1</b>, <b>2</b> or <b>tie</b> in the "
        "<code>verdict</code> column of <code>sheet.csv</code>. Judge helpfulness and correctness; ignore the order."
        "</p><table><tr><th>id</th><th>instruction</th><th>answer 1</th><th>answer 2</th></tr>\n"
        f"{cells}</table>\n"), command="judge")
    atomic_write_json(out_dir / "sheet_key.json", key, command="judge")
    return {"sheet": str(out_dir / "sheet.csv"), "html": str(out_dir / "sheet.html"),
            "key": str(out_dir / "sheet_key.json"), "n": len(rows)}


def import_sheet(sheet: str | Path, key_path: str | Path) -> list[dict]:
    """Read a filled sheet; rows with an empty verdict are "unjudged". Returns rows in the original prompt order."""
    sheet, key_path = Path(sheet), Path(key_path)
    try:
        key = json.loads(key_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{key_path}: sheet key not found (it is written next to sheet.csv by sheet_export)") from None
    except ValueError as e:
        raise UserError(f"{key_path}: invalid JSON ({e})") from None
    try:
        with open(sheet, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("id", "verdict") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{at(sheet, 1, missing[0])}: column missing")
            raw = [(reader.line_num, r) for r in reader]
    except FileNotFoundError:
        raise UserError(f"{sheet}: sheet not found") from None
    rows, seen = {}, set()
    for line, r in raw:
        sid = (r.get("id") or "").strip()
        if sid not in key:
            raise UserError(f"{at(sheet, line, 'id')}: unknown id {sid!r} (not in {key_path.name})")
        if sid in seen:
            raise UserError(f"{at(sheet, line, 'id')}: duplicate id {sid!r}")
        seen.add(sid)
        v = (r.get("verdict") or "").strip().lower()
        if v not in ("", "1", "2", "tie"):
            raise UserError(f"{at(sheet, line, 'verdict')}: expected 1, 2, tie or empty, got {v!r}")
        k = key[sid]
        if v == "":
            outcome = "unjudged"
        elif v == "tie":
            outcome = "tie"
        else:
            outcome = k["answer_1"] if v == "1" else ("B" if k["answer_1"] == "A" else "A")
        rows[k["index"]] = {"index": k["index"], "instruction": k["instruction"],
                            **({"input": k["input"]} if k.get("input") else {}), "outcome": outcome,
                            "sheet_id": sid, "verdict": v or None}
    for sid, k in key.items():
        if sid not in seen:
            rows[k["index"]] = {"index": k["index"], "instruction": k["instruction"], "outcome": "unjudged",
                                "sheet_id": sid, "verdict": None, "reason": "row missing from sheet"}
    return [rows[i] for i in sorted(rows)]


# ---------------------------------------------------------------- CLI

@dataclass
class JudgeConfig:
    a: str = field("", "generations of model A (JSONL from `tunesmith generate`, or "
                       "alpaca_eval JSON); the win rate is A's")
    b: str = field("", "generations of model B (same prompts)")
    output_dir: str = field("", "where judgements.jsonl, winrate.json and the cache go")
    judge: Literal["endpoint", "local", "python", "sheet_export", "sheet_import"] = field(
        "endpoint", "endpoint | local | python | sheet_export | sheet_import")
    base_url: str = field("", "endpoint: e.g. https://api.openai.com/v1 or "
                              "http://127.0.0.1:8000/v1")
    model: str = field("", "endpoint: model name; local: model directory")
    api_key_env: str = field("OPENAI_API_KEY", "endpoint: NAME of the environment variable holding the API key ('' for "
                                               "none); the key itself is never logged or saved")
    timeout: float = field(60.0, "endpoint: seconds per request, all of it (connect, send, "
                                 "the whole reply)")
    max_retries: int = field(4, "endpoint: retries per call (exponential backoff)")
    backoff: float = field(1.0, "endpoint: first retry delay in seconds (doubles; a "
                                "server's Retry-After, up to 60 s, wins if longer)")
    judge_prompt: str = field("", "endpoint/local: text file with the user prompt, "
                                  "holding {instruction}, {output_1}, {output_2}; the "
                                  "reply must start with 1, 2 or tie")
    python_judge: str = field("", "python: 'module:function' taking (instruction, "
                                  "answer_1, answer_2) and returning '1', '2' or 'tie'")
    sheet: str = field("", "sheet_import: the filled sheet.csv (key: sheet_key.json "
                           "next to it)")
    both_orders: bool = field(True, "ask each prompt in both answer orders")
    max_consecutive_failures: int = field(5, "stop after this many unjudged prompts "
                                             "in a row (0: never)")
    cache: str = field("", "verdict cache file (default OUTPUT_DIR/judge_cache.jsonl)")
    workers: int = field(1, "prompts judged at once (threads; for endpoints)")
    n_bootstrap: int = field(2000, "bootstrap resamples for the interval")
    confidence: float = field(0.95, "interval level")
    seed: int = field(0, "seed for the bootstrap and the sheet shuffle")
    name_a: str = field("", "display name of A (default: its 'generator' field)")
    name_b: str = field("", "display name of B")
    overwrite: bool = field(False, "replace existing output files that this command did "
                                  "not write (never an input)")

    def __post_init__(self):
        for key in ("output_dir",) + (() if self.judge == "sheet_import" else ("a", "b")):
            if not getattr(self, key):
                raise UserError(f"'{key}' is required")
        if self.judge == "endpoint" and not (self.base_url and self.model):
            raise UserError("judge endpoint needs 'base_url' and 'model'")
        if self.judge == "endpoint":
            check_base_url(self.base_url)
            if self.api_key_env:
                read_api_key(self.api_key_env)  # a missing or malformed key is refused before any work
        if self.judge == "local" and not self.model:
            raise UserError("judge local needs 'model' (a model directory)")
        if self.judge == "python" and not self.python_judge:
            raise UserError("judge python needs 'python_judge' (module:function)")
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        from tunesmith import checks

        checks.number("timeout", self.timeout, low=0, high=3600, low_open=True, why="seconds per request")
        checks.number("max_retries", self.max_retries, low=0, high=100)
        checks.number("backoff", self.backoff, low=0, high=600)
        checks.non_negative("max_consecutive_failures", self.max_consecutive_failures, why="0 = never stop")
        checks.at_least("n_bootstrap", self.n_bootstrap, 1)
        checks.number("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True)
        checks.seed("seed", self.seed)
        if self.judge == "sheet_import" and not self.sheet:
            raise UserError("judge sheet_import needs 'sheet' (the filled sheet.csv)")
        from tunesmith.rundir import check_output_dir, check_output_file

        files = {"sheet_export": SHEET_FILES, "sheet_import": RESULT_FILES}.get(self.judge,
                                                                                  RESULT_FILES + PARTIAL_FILES)
        inputs = {"a": self.a, "b": self.b, "sheet": self.sheet, "judge_prompt": self.judge_prompt,
                  "model": self.model if self.judge == "local" else ""}
        check_output_dir(self.output_dir, command="judge", files=files, inputs=inputs, overwrite=self.overwrite)
        if self.judge not in ("sheet_export", "sheet_import"):
            cache = self.cache or str(Path(self.output_dir) / "judge_cache.jsonl")
            if self.cache:
                check_output_file(self.cache, "cache", inputs=inputs, command="judge", overwrite=True)
            check_cache_file(cache)


def make_judge(cfg: JudgeConfig):
    if cfg.judge == "endpoint":
        return EndpointJudge(cfg.base_url, cfg.model, cfg.api_key_env or None, cfg.timeout, cfg.max_retries,
                             cfg.backoff, user_prompt=read_prompt_template(cfg.judge_prompt))
    if cfg.judge == "local":
        return LocalJudge(cfg.model, user_prompt=read_prompt_template(cfg.judge_prompt))
    return PythonJudge(cfg.python_judge)


def run(cfg: JudgeConfig) -> dict:
    """Judge and write ``judgements.jsonl`` + ``winrate.json`` into ``output_dir``. Returns the win-rate summary."""
    out = Path(cfg.output_dir)
    if cfg.judge == "sheet_import":
        rows = import_sheet(cfg.sheet, Path(cfg.sheet).with_name("sheet_key.json"))
        name_a, name_b = cfg.name_a or "A", cfg.name_b or "B"
    else:
        gen_a, gen_b = read_generations(cfg.a), read_generations(cfg.b)
        pairs = pair_generations(gen_a, gen_b)
        name_a, name_b = cfg.name_a or gen_a[0].generator, cfg.name_b or gen_b[0].generator
        if name_a == name_b:
            name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
        if cfg.judge == "sheet_export":
            info = export_sheet(pairs, out, cfg.seed)
            print(f"wrote {info['n']} pairs to {info['sheet']} (fill 'verdict') and {info['html']}; "
                  f"keep {info['key']} from the raters")
            return info
        judge = make_judge(cfg)
        cache = VerdictCache(cfg.cache or out / "judge_cache.jsonl")
        rows: list[dict] = []
        try:
            judge_pairs(pairs, judge, cache, cfg.both_orders, cfg.max_consecutive_failures, on_row=rows.append,
                        workers=cfg.workers)
        except JudgeStepError:
            atomic_write_jsonl(out / "judgements.partial.jsonl", rows, command="judge")
            print(f"judgements obtained so far: {out / 'judgements.partial.jsonl'} (and the cache; a rerun "
                  f"resumes)", file=sys.stderr)
            raise
    summary = win_rate([r["outcome"] for r in rows], cfg.n_bootstrap, cfg.confidence, cfg.seed)
    summary.update(name_a=name_a, name_b=name_b, judge=cfg.judge, judge_model=cfg.model or cfg.python_judge or None,
                   both_orders=cfg.both_orders if cfg.judge != "sheet_import" else False)
    atomic_write_jsonl(out / "judgements.jsonl", rows, command="judge")
    atomic_write_json(out / "winrate.json", summary, command="judge")
    print(format_summary(summary, name_a, name_b))
    if summary["n"] == 0:
        raise JudgeStepError(f"no prompt could be judged ({summary['unjudged']} unjudged); see "
                             f"{out / 'judgements.jsonl'}")
    return summary


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(JudgeConfig, argv, "judge", "Compare two generation files prompt by prompt with a judge and "
                                                 "report win rates with bootstrap intervals.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(cfg)
    return 0


__all__ = ["EndpointJudge", "LocalJudge", "PythonJudge", "VerdictCache", "judge_pairs", "export_sheet",
           "import_sheet", "JudgeConfig", "run", "cli", "parse_verdict", "JudgeFailure", "JudgeStepError"]
