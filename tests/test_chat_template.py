"""The prompt format travels: every saved model's tokenizer carries a chat_template that renders the training template.

For every template (alpaca with and without input, instruction_response, qa, custom format strings, chat), the saved
tokenizer's ``apply_chat_template(..., add_generation_prompt=True)`` gives exactly the token ids tunesmith generates
from (``encode_prompt``), and a conversation ending in an answer gives exactly the ids tunesmith trains on, ending in
the EOS at which generation stops."""
import json

import jinja2.sandbox
import pytest

from tunesmith.data.formats import Example, Turn
from tunesmith.data.templates import get_template, save_template
from tunesmith.data.tokenize import encode, encode_prompt

CUSTOM = [
    "Q: {prompt}\nA: {response}",
    "{prompt}{response}",
    "<<{prompt}>> it's \"quoted\" \\ back\\slash {{braces}} {% raw %} é ✓\t=> {response}",
    "User said:\n\n{prompt}\n\nAssistant:\n\n{response}",
    "Task: {prompt}\nContext: {input}\nAnswer: {response}",
]
TEMPLATES = ["alpaca", "instruction_response", "qa", "chat"] + CUSTOM

EXAMPLES = {
    "single": Example(turns=[Turn("what is the color of the sky", "blue")]),
    "system": Example(turns=[Turn("tell me a story", "the cat sat on a mat.")], system="be short"),
    "input": Example(turns=[Turn("compare the two", "the red one is big")], input="red dog, blue cat"),
    "system+input": Example(turns=[Turn("name it", "sea")], input="blue and big", system="answer in one word"),
    "multi": Example(turns=[Turn("one two three", "four"), Turn("and then", "five six"), Turn("last?", "yes")],
                     system="count"),
    "multi+input": Example(turns=[Turn("read this", "ok"), Turn("what color", "green grass")], input="the grass"),
}


def messages_of(example: Example, with_last_answer: bool) -> list[dict]:
    msgs = [{"role": "system", "content": example.system}] if example.system else []
    for i, turn in enumerate(example.turns):
        user = {"role": "user", "content": turn.prompt}
        if i == 0 and example.input:
            user["input"] = example.input
        msgs.append(user)
        if i < len(example.turns) - 1 or with_last_answer:
            msgs.append({"role": "assistant", "content": turn.response})
    return msgs


def chat_messages(example: Example, with_last_answer: bool) -> list[dict]:
    """The chat template has no input field: the input goes below the prompt, as tunesmith renders it."""
    msgs = messages_of(example, with_last_answer)
    for m in msgs:
        if "input" in m:
            m["content"] = f"{m['content']}\n\n{m.pop('input')}"
    return msgs


def bos_tokenizer(path):
    """A Llama-style tokenizer whose own encoding starts with BOS (the saved template must write it)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module", params=["plain", "bos"])
def tokenizer(request, tiny_model_dir):
    from transformers import AutoTokenizer

    if request.param == "bos":
        return bos_tokenizer(tiny_model_dir)
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", TEMPLATES + ["chat+bos"])
def test_saved_chat_template_gives_the_training_tokens(name, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.data.tokenize import adds_bos

    if name == "chat+bos":  # a Llama-3-style chat template that writes BOS itself: never two BOS
        tokenizer = __import__("copy").deepcopy(tokenizer)
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
        name = "chat"
    template = get_template(name, tokenizer)
    save_template(template, tmp_path, tokenizer)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert adds_bos(saved) == adds_bos(tokenizer)
    assert json.loads((tmp_path / "tunesmith_template.json").read_text())["template"] == template.spec()
    if name != "chat":
        assert saved.chat_template != tokenizer.chat_template  # the training format replaced the base's template
    to_messages = chat_messages if name == "chat" else messages_of
    for label, ex in EXAMPLES.items():
        prompt = saved.apply_chat_template(to_messages(ex, False), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        assert list(prompt) == encode_prompt(tokenizer, template, ex), (name, label)
        full = saved.apply_chat_template(to_messages(ex, True), tokenize=True, return_dict=False)
        trained = encode(tokenizer, template, ex, max_length=10_000)
        assert list(full) == trained["input_ids"], (name, label)
        # the trained sequence ends where generation stops: the last trained token is EOS
        assert full[-1] == tokenizer.eos_token_id and trained["labels"][-1] == tokenizer.eos_token_id, (name, label)
        assert full[:len(prompt)] == prompt, (name, label)
        assert full.count(tokenizer.bos_token_id) == (full[0] == tokenizer.bos_token_id), (name, label)


def test_the_text_is_the_training_text(tiny_tokenizer, tmp_path):
    """Token identity is not luck of the tokenizer: the rendered text is the training segments joined."""
    from transformers import AutoTokenizer

    for name in ["alpaca", "instruction_response", "qa"] + CUSTOM:
        template = get_template(name, tiny_tokenizer)
        save_template(template, tmp_path, tiny_tokenizer)
        saved = AutoTokenizer.from_pretrained(tmp_path)
        for ex in EXAMPLES.values():
            segments = template.segments(ex)
            text = "".join(t + (tiny_tokenizer.eos_token if trained else "") for t, trained in segments)
            assert saved.apply_chat_template(messages_of(ex, True), tokenize=False) == text
            gen = "".join(t + (tiny_tokenizer.eos_token if trained else "")
                          for t, trained in template.segments(ex.for_generation()))
            assert saved.apply_chat_template(messages_of(ex, False), tokenize=False, add_generation_prompt=True) == gen
            # a runtime's Jinja without transformers' whitespace options renders the same text
            plain = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(saved.chat_template)
            assert plain.render(messages=messages_of(ex, True), eos_token=saved.eos_token, bos_token="",
                                add_generation_prompt=False) == text


def test_without_generation_prompt_the_answer_lead_in_is_left_out(tiny_tokenizer, tmp_path):
    template = get_template("alpaca")
    save_template(template, tmp_path, tiny_tokenizer)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    without = saved.apply_chat_template(msgs, tokenize=False)
    with_gen = saved.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert with_gen == without + "\n\n### Response:\n" and without.endswith("### Instruction:\nhi")
    with pytest.raises(Exception, match="roles"):
        saved.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_the_tokenizer_object_is_not_changed(tiny_tokenizer, tmp_path):
    before = tiny_tokenizer.chat_template
    save_template(get_template("qa"), tmp_path, tiny_tokenizer)
    assert tiny_tokenizer.chat_template == before
    # the chat template is saved unchanged
    save_template(get_template("chat", tiny_tokenizer), tmp_path / "chat", tiny_tokenizer)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "chat").chat_template == before


def test_saved_models_carry_it_sft_lora_and_merge(tiny_model_dir, alpaca_file, tmp_path):
    """A real run (LoRA SFT with a custom format) and its merge both carry the chat template; the served prompt of a
    generated answer ends where generation stopped."""
    from conftest import sft_config
    from transformers import AutoTokenizer

    from tunesmith.cli import main
    from tunesmith.generate import _eos_ids, generate
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.recipes.sft.run import SFTConfig, train

    fmt = "Q: {prompt}\nA: {response}"
    out = tmp_path / "lora"
    train(SFTConfig(**sft_config(tiny_model_dir, alpaca_file, out, template=fmt, use_peft=True, lora_r=4,
                                 max_steps=1)))
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    msgs = [{"role": "user", "content": "what is the color of sky", "input": "tell me"}]
    for d in (out, tmp_path / "merged"):
        model, tok = load_model_and_tokenizer(str(d))
        saved = AutoTokenizer.from_pretrained(d)
        template = get_template(fmt)
        ex = Example.from_prompt("what is the color of sky", input="tell me")
        prompt = saved.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(prompt) == encode_prompt(tok, template, ex)
        [res] = generate(model, tok, [list(prompt)], max_new_tokens=6)
        answered = saved.apply_chat_template(msgs + [{"role": "assistant", "content": res["output"]}],
                                             tokenize=True, return_dict=False)
        assert answered[:len(prompt)] == prompt and answered[-1] in _eos_ids(model, tok)


def test_save_model_dir_template_for_any_recipe(tiny_model_dir, tmp_path):
    """The one save path (SPIN, DPO and SFT all go through it) writes both the template file and the chat
    template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models import save_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_model_dir(model, tok, tmp_path / "m", template=get_template("instruction_response"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True) == "### Instruction: hi\n\n### Response:"
    assert (tmp_path / "m" / "tunesmith_template.json").exists()
