"""Normalise records of any supported format into one shape: ``Example`` (turns of prompt -> response).

Formats (``dataset_format``; ``auto`` detects from the keys of the first record):
  alpaca             instruction, input (optional), output
  prompt_completion  prompt, completion   (strings, or TRL-style lists of chat messages)
  messages           messages: [{role: system|user|assistant, content}]
  sharegpt           conversations: [{from: system|human|user|gpt|assistant, value}]
  text               text  (plain language modelling: every token is trained)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.load import Record
from tunesmith.errors import UserError

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "text")


@dataclass
class Turn:
    prompt: str
    response: str | None


@dataclass
class Example:
    turns: list[Turn] = field(default_factory=list)
    system: str | None = None
    input: str | None = None  # alpaca's optional input, kept apart for the alpaca template
    text: str | None = None  # plain-text examples
    loc: str = ""

    def for_generation(self) -> "Example":
        """The same conversation up to (and without) its last response."""
        turns = self.turns[:-1] + [Turn(self.turns[-1].prompt, None)]
        return Example(turns=turns, system=self.system, input=self.input, loc=self.loc)


def detect_format(data: dict, loc: str) -> str:
    keys = set(data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise UserError(f"{loc}: cannot detect the data format from keys {sorted(keys)}; expected one of: "
                    "instruction/output (alpaca), prompt/completion, messages, conversations (sharegpt), text — "
                    "or set dataset_format")


def _string(data: dict, key: str, loc: str, required: bool = True) -> str | None:
    if key not in data or data[key] is None:
        if required:
            raise UserError(f"{loc}: field '{key}' is missing")
        return None
    value = data[key]
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{key}' must be a string, got {type(value).__name__}")
    return value


ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant"}


def _chat(messages, loc: str, key: str, role_key: str, content_key: str, require_response: bool) -> Example:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{loc}: field '{key}' must be a non-empty list of messages")
    system, turns, pending = None, [], None
    for j, m in enumerate(messages):
        where = f"{loc}: field '{key}[{j}]"
        if not isinstance(m, dict):
            raise UserError(f"{where}' must be an object with '{role_key}' and '{content_key}'")
        role = ROLE_ALIASES.get(str(m.get(role_key, "")).lower())
        content = m.get(content_key)
        if role is None:
            raise UserError(f"{where}.{role_key}' is {m.get(role_key)!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise UserError(f"{where}.{content_key}' must be a string")
        if role == "system":
            if j != 0:
                raise UserError(f"{where}': a system message may only come first")
            system = content
        elif role == "user":
            if pending is not None:
                raise UserError(f"{where}': two user messages in a row")
            pending = content
        else:
            if pending is None:
                raise UserError(f"{where}': an assistant message must follow a user message")
            turns.append(Turn(pending, content))
            pending = None
    if pending is not None:
        if require_response:
            raise UserError(f"{loc}: field '{key}' ends with a user message that has no assistant answer")
        turns.append(Turn(pending, None))
    if not turns:
        raise UserError(f"{loc}: field '{key}' has no user message")
    return Example(turns=turns, system=system, loc=loc)


def to_example(record: Record, fmt: str, require_response: bool = True) -> Example:
    d, loc = record.data, record.loc
    if fmt == "alpaca":
        instruction = _string(d, "instruction", loc)
        extra = _string(d, "input", loc, required=False) or None
        output = _string(d, "output", loc, required=require_response)
        return Example(turns=[Turn(instruction, output)], input=extra, system=_string(d, "system", loc, False), loc=loc)
    if fmt == "prompt_completion":
        if isinstance(d.get("prompt"), list):  # conversational prompt/completion
            completion = d.get("completion")
            if completion is None and not require_response:
                return _chat(d["prompt"], loc, "prompt", "role", "content", False)
            if not isinstance(completion, list):
                raise UserError(f"{loc}: field 'completion' must be a list of messages when 'prompt' is one")
            return _chat(d["prompt"] + completion, loc, "prompt", "role", "content", require_response)
        prompt = _string(d, "prompt", loc)
        return Example(turns=[Turn(prompt, _string(d, "completion", loc, required=require_response))], loc=loc)
    if fmt == "messages":
        return _chat(d.get("messages"), loc, "messages", "role", "content", require_response)
    if fmt == "sharegpt":
        return _chat(d.get("conversations"), loc, "conversations", "from", "value", require_response)
    if fmt == "text":
        return Example(text=_string(d, "text", loc), loc=loc)
    raise UserError(f"unknown dataset_format '{fmt}' (choose auto, {', '.join(FORMATS)})")


def to_examples(records: list[Record], dataset_format: str = "auto", require_response: bool = True) -> list[Example]:
    if dataset_format not in ("auto",) + FORMATS:
        raise UserError(f"unknown dataset_format '{dataset_format}' (choose auto, {', '.join(FORMATS)})")
    fmt = detect_format(records[0].data, records[0].loc) if dataset_format == "auto" else dataset_format
    return [to_example(r, fmt, require_response) for r in records]
