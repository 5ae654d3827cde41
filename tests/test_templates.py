"""Templates render by splitting the format string once: the user's text is inserted, never rewritten."""
import pytest

from tunesmith.data.formats import Example, Turn
from tunesmith.data.templates import get_template
from tunesmith.errors import UserError


def render(template, example):
    return "".join(text for text, _ in template.segments(example))


def test_alpaca_input_with_markers_is_kept_verbatim():
    code = "print(f'{prompt} and {response}')"
    ex = Example(turns=[Turn("explain this code", "It prints.")], input=code)
    text = render(get_template("alpaca"), ex)
    assert "### Input:\n" + code + "\n\n### Response:\n" in text
    assert text.count("explain this code") == 1


@pytest.mark.parametrize("name", ["alpaca", "instruction_response", "qa", "{prompt} => {response}"])
def test_prompt_and_response_with_markers_are_kept_verbatim(name):
    prompt, response = "use {input} or {prompt} or {response}", "{response} {prompt} {{x}}"
    ex = Example(turns=[Turn(prompt, response)], system="sys {prompt}")
    pieces = get_template(name).segments(ex)
    assert prompt in pieces[0][0] and "sys {prompt}" in pieces[0][0]
    assert pieces[1][0].endswith(response) and pieces[1][1]


@pytest.mark.parametrize("fmt", [
    "{response} then {prompt} A: {response}",   # response twice, and before the prompt
    "Q: {prompt} {prompt} A: {response}",       # prompt twice
    "A: {response} Q: {prompt}",                # wrong order
    "Q: {prompt} A: {response} {response}",
])
def test_template_needs_prompt_once_then_response_once(fmt):
    with pytest.raises(UserError, match=r"\{prompt\} once, then \{response\} once"):
        get_template(fmt)


def test_literal_braces_keep_working():
    t = get_template('{"q": "{prompt}", "a": {response}')
    assert render(t, Example(turns=[Turn("x {y}", "1")])) == '{"q": "x {y}", "a": 1'
    t = get_template("{{json}} Q: {prompt} A: {response}")
    assert render(t, Example(turns=[Turn("p", "r")])) == "{{json}} Q: p A: r"


def test_layout_is_exposed_for_chat_templates():
    t = get_template("qa")
    assert (t.prefix, t.middle, t.suffix) == ("Please answer the following question. Q: ", " A: ", "")
    t = get_template("alpaca")
    assert t.prefix.endswith("### Instruction:\n") and t.middle == "\n\n### Response:\n"
    assert t.with_input[2] == "\n\n### Response:\n" and t.with_input[1] == "\n\n### Input:\n"
