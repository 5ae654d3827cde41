"""Prompt templates. A template turns an Example into text segments, each marked trained (a response) or not.

Named templates: ``alpaca`` (with and without input), ``instruction_response``
(``### Instruction: {prompt}\\n\\n### Response: {response}``), ``qa``
(``Please answer the following question. Q: {prompt} A: {response}``), and ``chat`` (the tokenizer's own chat
template). A custom format string with ``{prompt}`` once, then ``{response}`` once (and optionally ``{input}``
between them) is accepted too; it is split once at those markers and the user's text is inserted between the pieces,
never substituted into (a prompt or input holding ``{response}`` is kept as written). Other braces are plain text.
``auto`` is resolved against the data (:func:`resolve_template`): ``chat`` for conversational data when the tokenizer
has a chat template, ``alpaca`` otherwise; what is saved with a model is the resolved template, never ``auto``.

The same template renders training examples and generation prompts, and it is saved beside a trained model
(``tunesmith_template.json``) so generation, evaluation and SPIN use exactly what training used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tunesmith.data.formats import Example
from tunesmith.errors import UserError

TEMPLATE_FILE = "tunesmith_template.json"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n{response}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n{response}"
)
FORMAT_STRINGS = {
    "instruction_response": "### Instruction: {prompt}\n\n### Response: {response}",
    "qa": "Please answer the following question. Q: {prompt} A: {response}",
}
NAMES = ("alpaca", "instruction_response", "qa", "chat")
CHOICES = ("auto",) + NAMES

Segments = list[tuple[str, bool]]  # (text, trained)


class Template:
    """Base: ``segments(example)`` -> [(text, trained)]. A turn whose response is None ends at the response start."""

    name: str
    appends_eos = True  # plain templates append the tokenizer's EOS after every response (trained)
    writes_bos = False  # tunesmith adds BOS where the tokenizer's own encoding starts with it

    def segments(self, example: Example) -> Segments:
        raise NotImplementedError

    def spec(self) -> str:
        return self.name


_MARKER = re.compile(r"\{(prompt|input|response)\}")


def split_format(name: str, fmt: str) -> tuple[str, ...]:
    """Split a format string once at its markers: ``(prefix, middle, suffix)`` around ``{prompt}`` and
    ``{response}``, or ``(prefix, before_input, after_input, suffix)`` when ``{input}`` sits between them. Any other
    arrangement is a one-line error. Everything else in the string (literal braces too) is text, kept as written."""
    pieces = _MARKER.split(fmt)
    markers, literals = pieces[1::2], tuple(pieces[0::2])
    if "response" not in markers:
        raise UserError(f"template {name!r}: the response marker '{{response}}' is absent")
    if "prompt" not in markers:
        raise UserError(f"template {name!r}: the prompt marker '{{prompt}}' is absent")
    if markers not in (["prompt", "response"], ["prompt", "input", "response"]):
        raise UserError(f"template {name!r}: a template must contain {{prompt}} once, then {{response}} once, in "
                        f"that order ({{input}} at most once, between them); it has {', '.join(markers)}")
    if literals[-1].strip():
        raise UserError(f"template {name!r}: '{{response}}' must come last")
    return literals[:-1] + ("",)  # whitespace after {response} is dropped: the response ends the text


class FormatTemplate(Template):
    """A format string with {prompt} and {response} (and optionally {input}); multi-turn repeats it per turn.

    The string is split once (:func:`split_format`) and the user's text is inserted between the pieces, so text that
    itself contains ``{prompt}`` or ``{response}`` (code, templates) is never rewritten. A turn renders as
    ``prefix + prompt + middle + response + suffix``; ``with_input`` holds alpaca's ``(prefix, before_input,
    after_input, suffix)`` used when an example has an input. A single trailing space of ``middle`` belongs to the
    response ("A: yes" -> prompt "... A:", response " yes"), so a generation prompt ends on a word."""

    def __init__(self, name: str, fmt: str, fmt_with_input: str | None = None):
        self.name, self.fmt, self.fmt_with_input = name, fmt, fmt_with_input
        layout = split_format(name, fmt)
        # Without an input, an {input} marker renders as nothing: its two sides join into one middle.
        self.prefix, self.middle, self.suffix = layout[0], "".join(layout[1:-1]), layout[-1]
        self.with_input = split_format(name, fmt_with_input) if fmt_with_input else (layout if len(layout) == 4
                                                                                     else None)
        if self.with_input is not None and len(self.with_input) != 4:
            raise UserError(f"template {name!r}: the with-input format has no {{input}} marker")

    def segments(self, example: Example) -> Segments:
        out: Segments = []
        for i, turn in enumerate(example.turns):
            prompt = turn.prompt
            if i == 0 and example.system:
                prompt = f"{example.system}\n\n{prompt}"
            if i == 0 and example.input and self.with_input is not None:
                prefix, before_input, after_input, _ = self.with_input
                head, middle = prefix + prompt + before_input + example.input, after_input
            else:
                if i == 0 and example.input:  # no place for an input: it follows the instruction
                    prompt = f"{prompt}\n\n{example.input}"
                head, middle = self.prefix + prompt, self.middle
            spacer = " " if middle.endswith(" ") else ""
            out.append((head + middle[: len(middle) - len(spacer)], False))
            if turn.response is not None:
                out.append((spacer + turn.response + self.suffix, True))
        return out

    def spec(self) -> str:
        return self.name if self.name in NAMES else self.fmt


class ChatTemplate(Template):
    """The tokenizer's own chat template; every assistant message (with its end-of-turn text) is trained."""

    name = "chat"
    appends_eos = False
    writes_bos = True  # a chat template writes BOS itself where the model wants one (``{{ bos_token }}``), as
    # apply_chat_template assumes: adding it again would train and prompt with two

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat': the tokenizer has no chat template (choose alpaca, "
                            "instruction_response, qa or a format string)")
        self.tokenizer = tokenizer

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, example: Example) -> Segments:
        messages = [{"role": "system", "content": example.system}] if example.system else []
        out: Segments = []
        rendered = ""
        for turn in example.turns:
            prompt_text = turn.prompt if not (example.input and not out) else f"{turn.prompt}\n\n{example.input}"
            messages.append({"role": "user", "content": prompt_text})
            prefix = self._render(messages, True)
            if not prefix.startswith(rendered):
                raise UserError("template 'chat': the chat template is not prefix-stable (an earlier turn renders "
                                "differently once later turns are added), so responses cannot be masked reliably")
            out.append((prefix[len(rendered):], False))
            rendered = prefix
            if turn.response is None:
                break
            messages.append({"role": "assistant", "content": turn.response})
            full = self._render(messages, False)
            if not full.startswith(prefix):
                raise UserError("template 'chat': the rendered answer does not extend the generation prompt; "
                                "this chat template cannot be used for response-only training")
            out.append((full[len(prefix):], True))
            rendered = full
        return out


def resolve_template(name: str, tokenizer, conversational: bool) -> Template:
    """:func:`get_template`, with ``auto`` resolved: the tokenizer's chat template for ``conversational`` data when
    it has one, alpaca otherwise."""
    if name == "auto":
        name = "chat" if conversational and getattr(tokenizer, "chat_template", None) else "alpaca"
    return get_template(name, tokenizer)


def get_template(name: str, tokenizer=None) -> Template:
    if name == "auto":
        raise UserError("template 'auto' is resolved against the data (tunesmith.data.source.template_for)")
    if name == "alpaca":
        return FormatTemplate("alpaca", ALPACA_NO_INPUT, ALPACA_WITH_INPUT)
    if name in FORMAT_STRINGS:
        return FormatTemplate(name, FORMAT_STRINGS[name])
    if name == "chat":
        return ChatTemplate(tokenizer)
    if "{" in name:
        return FormatTemplate("custom", name)
    raise UserError(f"unknown template '{name}' (choose {', '.join(CHOICES)}, or a format string with "
                    "{prompt} and {response})")


def save_template(template: Template, directory: str | Path, tokenizer=None) -> None:
    """Write ``tunesmith_template.json`` and make the tokenizer files in ``directory`` carry the template as their
    ``chat_template`` (:mod:`tunesmith.data.chat_template`), so other runtimes prompt the model as it was trained.
    ``tokenizer``: the tokenizer to save there (default: the one already saved in ``directory``, if any)."""
    from tunesmith.data.chat_template import save_with_chat_template
    from tunesmith.io import atomic_write_json

    save_with_chat_template(template, directory, tokenizer)
    atomic_write_json(Path(directory) / TEMPLATE_FILE, {"template": template.spec()})


def load_saved_template(model_dir: str | Path, tokenizer) -> Template:
    path = Path(model_dir) / TEMPLATE_FILE
    if not path.exists():
        raise UserError(f"{model_dir}: no {TEMPLATE_FILE} (not trained by tunesmith); pass template explicitly")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))["template"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: malformed template file") from None
    return get_template(spec, tokenizer)
