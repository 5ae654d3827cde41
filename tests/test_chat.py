"""`tunesmith chat`: streamed answers equal to `generate`'s; single-turn for instruction templates, multi-turn for chat
templates; /reset and /exit; a LoRA adapter directory through the real command with piped stdin."""
import io
import shutil
import subprocess
import sys

import pytest

from tunesmith.data.formats import Example, Turn
from tunesmith.data.templates import get_template, save_template
from tunesmith.data.tokenize import encode_prompt
from tunesmith.generate import generate
from tunesmith.models import load_model_and_tokenizer
from tunesmith.serve.chat import ChatConfig, chat


def answer(model_dir, template_name, turns, max_new_tokens, system=None):
    model, tok = load_model_and_tokenizer(model_dir)
    template = get_template(template_name, tok)
    ex = Example(turns=[Turn(p, r) for p, r in turns], system=system)
    return generate(model, tok, [encode_prompt(tok, template, ex)], max_new_tokens=max_new_tokens)[0]["output"]


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-model") / "m"
    shutil.copytree(tiny_model_dir, d)
    from transformers import AutoTokenizer

    save_template(get_template("chat", AutoTokenizer.from_pretrained(d)), d)
    return str(d)


def run_chat(model_dir, lines, **over):
    out = io.StringIO()
    chat(ChatConfig(model_name_or_path=model_dir, dtype="float32", **over), stdin=io.StringIO("".join(lines)),
         stdout=out)
    return out.getvalue()


def test_instruction_template_answers_each_message_as_a_new_prompt(templated_model_dir):
    got = run_chat(templated_model_dir, ["the cat sat\n", "what is the color of sky\n", "/exit\n", "never read\n"],
                   max_new_tokens=6, system="be short")
    expected = "".join(answer(templated_model_dir, "alpaca", [(p, None)], 6, system="be short") + "\n"
                       for p in ("the cat sat", "what is the color of sky"))
    assert got == expected


def test_chat_template_is_multi_turn_and_reset_starts_over(chat_model, monkeypatch):
    from tunesmith.serve import engine

    seen = []
    real = engine.chat_prompt_ids
    monkeypatch.setattr(engine, "chat_prompt_ids", lambda served, messages: seen.append(messages) or
                        real(served, messages))
    got = run_chat(chat_model, ["one two\n", "three\n", "/reset\n", "three\n"], max_new_tokens=5)
    first = answer(chat_model, "chat", [("one two", None)], 5)
    second = answer(chat_model, "chat", [("one two", first), ("three", None)], 5)
    fresh = answer(chat_model, "chat", [("three", None)], 5)
    assert got == f"{first}\n{second}\n(conversation reset)\n{fresh}\n"
    assert seen == [[{"role": "user", "content": "one two"}],
                    [{"role": "user", "content": "one two"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "three"}],
                    [{"role": "user", "content": "three"}]]


@pytest.mark.slow  # a fresh Python process imports torch and transformers (~20 s on 2 busy cores)
def test_the_chat_command_on_a_lora_adapter_with_piped_stdin(tiny_model_dir, tmp_path):
    from conftest import save_lora_adapter

    out = save_lora_adapter(tiny_model_dir, tmp_path / "adapter", template="qa")
    r = subprocess.run([sys.executable, "-m", "tunesmith.cli", "chat", "--model_name_or_path", str(out),
                        "--max_new_tokens", "5", "--dtype", "float32"],
                       input="what is the color of sky\n/exit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "template 'qa': single-turn" in r.stderr
    assert r.stdout == answer(str(out), "qa", [("what is the color of sky", None)], 5) + "\n"
