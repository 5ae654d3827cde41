"""The model side of `tunesmith chat` and `tunesmith serve`: a loaded model with its prompt template, requests turned
into prompt token ids exactly as training rendered them, and one worker thread per model that batches waiting
requests into shared forward passes.

Decoding is :func:`tunesmith.generate.generate` (the one decoding path: batched HF generation, the model's EOS ids),
with its ``on_token`` hook streaming every new token out as it is made. The worker takes the oldest waiting request
and every other waiting request that can share its decoding settings (greedy with greedy; sampling with the same
temperature / top_p / top_k / repetition penalty), up to ``max_batch_size`` sequences, and decodes them as one batch;
each row stops on its own (EOS, its ``max_tokens``, a stop string, a client that went away). A request that arrives
while a batch runs waits for the next batch; when the worker wakes for a request it waits up to ``batch_wait``
seconds (default 10 ms) for others of the same burst, unless a full batch is already waiting. A sampled request
with a ``seed`` runs in a batch of its own, so the same seed and prompt give the same sample (as ``tunesmith generate
--do_sample true --seed S`` does for one prompt).

The waiting list is bounded (``max_queue`` requests): beyond it :meth:`Engine.submit` raises :class:`Busy` (the
server answers 503) instead of queueing without end.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import UserError

log = logging.getLogger("tunesmith.serve")


class RequestError(ValueError):
    """A request the model cannot serve (the server answers 400 with this message)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Busy(RuntimeError):
    """The waiting list is full (the server answers 503 with Retry-After)."""


# ---------------------------------------------------------------- the served model


@dataclass
class Served:
    """A model ready to answer: weights, tokenizer, prompt template (None: plain completions only), name."""

    name: str
    path: str
    model: object
    tokenizer: object
    template: object | None
    context: int | None  # the model's context length in tokens, when it declares one

    @property
    def template_spec(self) -> str | None:
        return self.template.spec() if self.template is not None else None


def context_length(model, tokenizer) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def load_served(path: str, name: str | None = None, dtype: str = "auto", template: str = "",
                device: str = "auto") -> Served:
    """Load a full model, a LoRA adapter directory (base + adapter) or a merged model with the prompt template it was
    trained with (``tunesmith_template.json``; else the tokenizer's chat template; ``template`` overrides)."""
    import torch

    from tunesmith.data.templates import (
        TEMPLATE_FILE,
        ChatTemplate,
        get_template,
        load_saved_template,
    )
    from tunesmith.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        model = model.to(device)
    model.eval()
    if template:
        tmpl = get_template(template, tokenizer)
    elif (Path(path) / TEMPLATE_FILE).exists():
        tmpl = load_saved_template(path, tokenizer)
    elif getattr(tokenizer, "chat_template", None):
        tmpl = ChatTemplate(tokenizer)
    else:
        tmpl = None
    return Served(name or Path(path.rstrip("/")).name, path, model, tokenizer, tmpl, context_length(model, tokenizer))


# ---------------------------------------------------------------- requests -> prompt ids


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content[{j}]: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")


def messages_to_example(messages):
    """OpenAI chat messages -> the Example tunesmith trains on: an optional system message first, then user and
    assistant turns in turn, ending with a user message. A first user message may carry alpaca's ``input``."""
    from tunesmith.data.formats import Example, Turn

    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    system, turns, pending, input_ = None, [], None, None
    for j, m in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role in ("system", "developer"):
            if j != 0:
                raise RequestError(f"{where}: a system message may only come first", "messages")
            system = _text(m.get("content"), where)
        elif role == "user":
            if pending is not None:
                raise RequestError(f"{where}: two user messages in a row", "messages")
            pending = _text(m.get("content"), where)
            extra = m.get("input")
            if extra is not None:
                if not isinstance(extra, str):
                    raise RequestError(f"{where}.input must be a string", "messages")
                if turns:
                    raise RequestError(f"{where}: only the first user message may carry an 'input'", "messages")
                input_ = extra or None
        elif role == "assistant":
            if pending is None:
                raise RequestError(f"{where}: an assistant message must follow a user message", "messages")
            turns.append(Turn(pending, _text(m.get("content"), where)))
            pending = None
        else:
            raise RequestError(f"{where}: role {role!r} is not supported (system, user, assistant)", "messages")
    if pending is None:
        raise RequestError("the last message must be a user message", "messages")
    turns.append(Turn(pending, None))
    return Example(turns=turns, system=system, input=input_)


def chat_prompt_ids(served: Served, messages) -> list[int]:
    """The prompt token ids of a conversation: the training template's generation prompt (``encode_prompt``)."""
    from tunesmith.data.tokenize import encode_prompt

    if served.template is None:
        raise RequestError(f"model {served.name!r} has no prompt template (no tunesmith_template.json and no chat "
                           "template in its tokenizer); use /v1/completions", "messages")
    example = messages_to_example(messages)
    try:
        return encode_prompt(served.tokenizer, served.template, example)
    except UserError as e:
        raise RequestError(str(e), "messages") from None


def text_prompt_ids(served: Served, prompt: str) -> list[int]:
    """A raw completion prompt, encoded as the tokenizer encodes text (BOS where it adds one)."""
    ids = served.tokenizer(prompt)["input_ids"]
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    return list(ids)


# ---------------------------------------------------------------- streaming text


class Detokenizer:
    """Incremental decoding: the text each new token adds, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def text(self) -> str:
        return self.decode(self.ids)


@dataclass
class Params:
    """Decoding settings of one request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self):
        """Requests with equal keys share a batch; a seeded sample runs alone (None)."""
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty)


class Choice:
    """One generated sequence: its tokens, its text, what was sent, why it ended."""

    def __init__(self, index: int, prompt_ids: list[int], detok: Detokenizer):
        self.index, self.prompt_ids, self.detok = index, prompt_ids, detok
        self.tokens = 0  # generated tokens, EOS included
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text handed out
        self.finish_reason: str | None = None


class Job:
    """One request: one or more choices decoded together. ``on_event((index, text, finish_reason))`` receives every
    piece of text as it is decoded (from the worker thread) and ``None`` when the job is over; :attr:`error` is set
    when decoding failed."""

    def __init__(self, prompts: list[list[int]], n: int, params: Params, tokenizer,
                 on_event: Callable[[tuple | None], None] | None = None):
        self.params, self.on_event = params, on_event or (lambda event: None)
        self.choices = [Choice(i * n + j, p, Detokenizer(tokenizer)) for i, p in enumerate(prompts) for j in range(n)]
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def prompt_tokens(self) -> int:
        seen, total = set(), 0
        for c in self.choices:  # n choices of one prompt count its tokens once
            if id(c.prompt_ids) not in seen:
                seen.add(id(c.prompt_ids))
                total += len(c.prompt_ids)
        return total

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, choice: Choice, final: bool) -> None:
        text = choice.text
        end = len(text)
        if not final and self._hold:  # keep back a tail that may be the start of a stop string
            for k in range(min(self._hold, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.params.stop):
                    end = len(text) - k
                    break
        if end > choice.sent or final:
            piece = text[choice.sent:end]
            choice.sent = max(choice.sent, end)
            self.on_event((choice.index, piece, choice.finish_reason if final else None))

    def _finish(self, choice: Choice, reason: str) -> None:
        choice.finish_reason = reason
        full = choice.detok.text()
        if full.startswith(choice.text):  # what the detokenizer still held back
            choice.text = full
        self._emit(choice, final=True)

    def feed(self, choice: Choice, token: int, eos: set[int]) -> bool:
        """Take one new token; True when the choice is over."""
        if choice.finish_reason is not None:
            return True
        choice.tokens += 1
        if self.cancelled:
            choice.finish_reason = "cancelled"
            return True
        if token in eos:
            self._finish(choice, "stop")
            return True
        choice.text += choice.detok.add(token)
        if self.params.stop:
            start = max(0, choice.sent - self._hold)
            hits = [i for i in (choice.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                choice.text = choice.text[:min(hits)]
                choice.finish_reason = "stop"
                self._emit(choice, final=True)
                return True
        if choice.tokens >= self.params.max_tokens:
            self._finish(choice, "length")
            return True
        self._emit(choice, final=False)
        return False

    def close(self, error: BaseException | None = None) -> None:
        self.error = error
        for c in self.choices:
            if c.finish_reason is None and error is None:
                self._finish(c, "length")
        self.done.set()
        self.on_event(None)


# ---------------------------------------------------------------- the worker


class Engine:
    """One model, one worker thread, a bounded waiting list."""

    def __init__(self, served: Served, max_batch_size: int = 16, max_queue: int = 64, batch_wait: float = 0.01):
        from tunesmith.generate import _eos_ids

        if max_batch_size < 1 or max_queue < 1:
            raise UserError("max_batch_size and max_queue must be at least 1")
        if batch_wait < 0:
            raise UserError(f"batch_wait must be >= 0, got {batch_wait}")
        self.served, self.max_batch_size, self.max_queue = served, max_batch_size, max_queue
        self.batch_wait = batch_wait
        self.eos = set(_eos_ids(served.model, served.tokenizer))
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.batches = 0  # decoded batches (for tests and logs)
        self.largest_batch = 0
        self.generated = 0  # tokens generated, all requests
        self.busy = False  # a batch is being decoded
        self.thread = threading.Thread(target=self._loop, name=f"tunesmith-serve-{served.name}", daemon=True)
        self.thread.start()

    def job(self, prompts: list[list[int]], n: int, params: Params, on_event=None) -> Job:
        return Job(prompts, n, params, self.served.tokenizer, on_event)

    def submit(self, job: Job) -> Job:
        if len(job.choices) > self.max_batch_size:
            raise RequestError(f"this request asks for {len(job.choices)} sequences; the server decodes at most "
                               f"{self.max_batch_size} at once (max_batch_size)", "n")
        with self.cond:
            if self.closing:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"{len(self.waiting)} requests are waiting (max_queue); retry shortly")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def close(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.closing = True
            for job in self.waiting:
                job.cancel()
            self.cond.notify_all()
        self.thread.join(timeout)

    def _take(self) -> list[Job]:
        first = self.waiting.popleft()
        batch, rows, key = [first], len(first.choices), first.params.batch_key()
        if key is not None:
            for job in list(self.waiting):
                if job.params.batch_key() == key and rows + len(job.choices) <= self.max_batch_size:
                    self.waiting.remove(job)
                    batch.append(job)
                    rows += len(job.choices)
        return batch

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closing:
                    self.cond.wait()
                if not self.waiting:
                    return
                # Requests often come in bursts (clients answered by the last batch ask again at once): wait a
                # moment for the burst, unless a full batch is already waiting.
                deadline = time.monotonic() + self.batch_wait
                while (not self.closing and sum(len(j.choices) for j in self.waiting) < self.max_batch_size
                       and (left := deadline - time.monotonic()) > 0):
                    self.cond.wait(left)
                batch = self._take()
                self.busy = True
            try:
                self._run(batch)
            finally:
                self.busy = False

    def _run(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if not j.cancelled]
        for j in jobs:
            if j.cancelled:
                j.close()
        if not live:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, sum(len(j.choices) for j in live))
        error = None
        try:
            decode(self.served, live, self.eos, lambda: self.closing)
        except Exception as e:  # a failed batch fails its requests, never the worker
            log.exception("generation failed")
            error = e
        for job in live:
            job.close(error)
            self.generated += job.completion_tokens


def decode(served: Served, jobs: list[Job], eos: set[int], closing: Callable[[], bool] = lambda: False) -> None:
    """Decode ``jobs`` (equal batch keys) as one batch with :func:`tunesmith.generate.generate`, each new token fed to
    its job as it comes. Sampling without a seed continues the global random stream (``seed=None``)."""
    from tunesmith.generate import generate

    rows = [(job, c) for job in jobs for c in job.choices]
    p = jobs[0].params

    def on_token(i: int, token: int) -> bool:
        job, choice = rows[i]
        if closing():
            job.cancel()
        return job.feed(choice, token, eos)

    generate(served.model, served.tokenizer, [c.prompt_ids for _, c in rows], batch_size=len(rows),
             max_new_tokens=max(job.params.max_tokens for job in jobs), do_sample=not p.greedy,
             temperature=p.temperature or 1.0, top_p=p.top_p, top_k=p.top_k,
             repetition_penalty=p.repetition_penalty, seed=p.seed if not p.greedy else 0, on_token=on_token)
