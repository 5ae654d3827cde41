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

from tunesmith.data.templates import FormatTemplate, Template


def _literal(text: str) -> str:
    """A Jinja string literal holding ``text`` exactly."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f"'{escaped}'"


def _concat(*parts: str) -> str:
    """A Jinja expression joining literal texts and variable names (``("lit", text)`` or ``("var", name)``)."""
    return " ~ ".join(_literal(value) if kind == "lit" else value for kind, value in parts if kind == "var" or value)


CONTENT = "message['content']"


def _gen(middle: str) -> str:
    """The generation prompt's end: the answer's lead-in without the single trailing space the answer owns."""
    return middle[:-1] if middle.endswith(" ") else middle


def jinja_template(template: Template, tokenizer) -> str | None:
    """The chat template that renders ``template`` (None for ``chat``: the tokenizer's own template is kept).

    Built from the template's split layout (``prefix``, ``middle``, ``suffix``, ``with_input``): a user turn renders
    ``prefix + prompt`` (``prefix + prompt + before_input + input`` with an input), an assistant turn
    ``middle + content + suffix + EOS`` (``after_input`` in place of ``middle`` after an input)."""
    from tunesmith.data.tokenize import adds_bos

    if not isinstance(template, FormatTemplate):
        return None
    eos = " ~ eos_token" if template.appends_eos else ""
    plain = (f"{{%- set ns.lead = {_literal(template.middle)} -%}}{{%- set ns.gen = {_literal(_gen(template.middle))} "
             f"-%}}{{{{- {_concat(('lit', template.prefix), ('var', 'prompt'))} -}}}}")
    if template.with_input is not None:
        prefix, before_input, after_input, _ = template.with_input
        with_input = (f"{{%- set ns.lead = {_literal(after_input)} -%}}{{%- set ns.gen = {_literal(_gen(after_input))} "
                      + "-%}{{- " + _concat(("lit", prefix), ("var", "prompt"), ("lit", before_input), ("var", "input"))
                      + " -}}")
    else:  # no place for an input: it follows the instruction after a blank line
        with_input = "{%- set prompt = prompt ~ '\\n\\n' ~ input -%}" + plain
    lines = [
        f"{{#- tunesmith prompt format: {template.spec()!r}, rendered as in training (docs/serve.md) -#}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set convo = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set convo = messages -%}{%- endif -%}",
        f"{{%- set ns = namespace(lead={_literal(template.middle)}, gen={_literal(_gen(template.middle))}, "
        "first=true) -%}",
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
        f"{{%- else -%}}{plain}",
        "{%- endif -%}",
        f"{{%- elif message['role'] == 'assistant' -%}}"
        f"{{{{- {_concat(('var', 'ns.lead'), ('var', CONTENT), ('lit', template.suffix))}{eos} -}}}}",
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
