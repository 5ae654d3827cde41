"""The training prompt format as a Jinja ``chat_template``, so that every runtime that reads the tokenizer's chat
template (``apply_chat_template``, vLLM, TGI, llama.cpp's converter, ``tunesmith serve``) prompts a saved model exactly
as tunesmith trained it.

:func:`jinja_template` turns a format template (alpaca with and without input, instruction_response, qa, a custom
format string) into a template that renders, for OpenAI-style messages, the very text tunesmith's
:class:`~tunesmith.data.templates.FormatTemplate` renders for the same conversation:

* a ``system`` message (first only) goes before the first prompt, separated by a blank line, as in training;
* each ``user`` message renders the format up to the end of its prompt; an ``assistant`` message renders the rest of
  the format (the response marker's lead-in), its content and the EOS token the training appended;
* ``add_generation_prompt`` renders the lead-in of the answer — the generation prompt tunesmith trains and generates
  with (a single trailing space belongs to the answer, as in training);
* alpaca's optional input: an ``input`` key on the first user message (``{"role": "user", "content": INSTRUCTION,
  "input": INPUT}``) selects the with-input format;
* BOS is written when the tokenizer's own encoding starts with it (tunesmith adds it in training then too).

The ``chat`` template is the tokenizer's own chat template already: it is saved unchanged.

Portability: the template uses only ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``raise_exception``, ``namespace`` and string literals inside expressions (never raw text between tags), so the
whitespace options runtimes apply (``trim_blocks``, ``lstrip_blocks``) cannot change what it renders.
"""
from __future__ import annotations

import re

from tunesmith.data.templates import FormatTemplate, Template

_MARKER = re.compile(r"\{(prompt|input)\}")


def _literal(text: str) -> str:
    """A Jinja string literal holding ``text`` exactly."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f"'{escaped}'"


def _expr(text: str) -> str:
    """``text`` (with {prompt} / {input} markers) as a Jinja expression over the variables ``prompt`` and ``input``."""
    parts, pos = [], 0
    for m in _MARKER.finditer(text):
        if m.start() > pos:
            parts.append(_literal(text[pos:m.start()]))
        parts.append(m.group(1))
        pos = m.end()
    if pos < len(text):
        parts.append(_literal(text[pos:]))
    return " ~ ".join(parts) or "''"


def _pieces(fmt: str) -> tuple[str, str, str]:
    """(user part, answer lead-in, generation prompt) of a format string: the user part ends with its last prompt or
    input marker; the lead-in runs from there to ``{response}``; the generation prompt is the lead-in without one
    trailing space (it belongs to the answer)."""
    end = fmt.index("{response}")
    last = max(m.end() for m in _MARKER.finditer(fmt[:end]))
    user, lead = fmt[:last], fmt[last:end]
    head = FormatTemplate._split(fmt)
    return user, lead, head[last:]


def jinja_template(template: Template, tokenizer) -> str | None:
    """The chat template that renders ``template`` (None for ``chat``: the tokenizer's own template is kept)."""
    from tunesmith.data.tokenize import adds_bos

    if not isinstance(template, FormatTemplate):
        return None
    user, lead, gen = _pieces(template.fmt)
    eos = " ~ eos_token" if template.appends_eos else ""
    if template.fmt_with_input:
        user_in, lead_in, gen_in = _pieces(template.fmt_with_input)
        with_input = (f"{{%- set ns.lead = {_literal(lead_in)} -%}}{{%- set ns.gen = {_literal(gen_in)} -%}}"
                      f"{{{{- {_expr(user_in)} -}}}}")
    else:  # the input goes below the prompt, separated by a blank line
        with_input = f"{{%- set prompt = prompt ~ '\\n\\n' ~ input -%}}{{{{- {_expr(user)} -}}}}"
    lines = [
        f"{{#- tunesmith prompt format: {template.spec()!r} (rendered as in training; see tunesmith docs/serve.md) -#}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set convo = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set convo = messages -%}{%- endif -%}",
        f"{{%- set ns = namespace(lead={_literal(lead)}, gen={_literal(gen)}, first=true) -%}}",
        "{{- bos_token -}}" if adds_bos(tokenizer) else "",
        "{%- for message in convo -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set prompt = message['content'] -%}{%- set input = '' -%}",
        "{%- if ns.first -%}",
        "{%- if system -%}{%- set prompt = system ~ '\\n\\n' ~ prompt -%}{%- endif -%}",
        "{%- if message['input'] is defined and message['input'] -%}{%- set input = message['input'] -%}{%- endif -%}",
        "{%- set ns.first = false -%}",
        "{%- endif -%}",
        f"{{%- if input -%}}{with_input}",
        f"{{%- else -%}}{{%- set ns.lead = {_literal(lead)} -%}}{{%- set ns.gen = {_literal(gen)} -%}}"
        f"{{{{- {_expr(user)} -}}}}",
        "{%- endif -%}",
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{- ns.lead ~ message['content']{eos} -}}}}",
        "{%- else -%}{{- raise_exception('this prompt format has roles system (first), user and assistant; got ' "
        "~ message['role']) -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- ns.gen -}}{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def save_with_chat_template(template: Template, directory, tokenizer=None) -> None:
    """Save ``tokenizer`` into ``directory`` with ``template``'s chat template (the tokenizer object is left as it
    was). Without ``tokenizer``, the tokenizer already saved in ``directory`` is rewritten; a directory without one is
    left alone."""
    from pathlib import Path

    if tokenizer is None:
        if not isinstance(template, FormatTemplate) or not (Path(directory) / "tokenizer_config.json").exists():
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    jinja = jinja_template(template, tokenizer)
    if jinja is None:  # template 'chat': the tokenizer's own chat template is the training format
        tokenizer.save_pretrained(directory)
        return
    previous = tokenizer.chat_template
    tokenizer.chat_template = jinja
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = previous
