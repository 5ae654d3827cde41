"""Shared fixtures: a tokenizer trained on the spot and a tiny Llama built from a config — all offline."""
import json
import os
import random

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized training data is cached in the datasets cache (tunesmith.data.prepare): keep the tests' out of the user's.
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE = __import__("tempfile").mkdtemp(prefix="tunesmith-tests-datasets-")

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _root_log_handlers_restored():
    """A command run in-process calls logging.basicConfig with pytest's captured stderr of that test; later tests
    would log into the closed capture ("--- Logging error ---"). Put the root logger's handlers back after each test."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


def pytest_sessionfinish(session, exitstatus):
    __import__("shutil").rmtree(_DATASETS_CACHE, ignore_errors=True)


def fails(capsys, argv, pattern, progress=False):
    """``tunesmith ARGV`` exits 2 with one error line ``tunesmith CMD: ...`` matching ``pattern`` and no traceback;
    ``progress``: lines before it (progress, data summaries) are allowed. Returns the error line."""
    import re

    from tunesmith.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert lines and "Traceback" not in err and (len(lines) == 1 or progress), err
    assert lines[-1].startswith("tunesmith ") and re.search(pattern, lines[-1]), err
    return lines[-1]


def free_port() -> int:
    """A TCP port nobody listens on now: torchrun's --master_port (other sessions run torchrun at the same time, so a
    fixed port collides), or an endpoint that must refuse connections."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

class QuietHandler(BaseHTTPRequestHandler):
    """A request handler for the tests' local HTTP servers: no request log on stderr; ``reply`` sends a whole
    response."""

    def log_message(self, *a):
        pass

    def reply(self, code: int, data: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalServer:
    """A real HTTP server for tests: a :class:`QuietHandler` subclass served on 127.0.0.1 (a free port) in a daemon
    thread until ``close()``; ``url`` as ``http://HOST:PORT/PATH``."""

    def start(self, handler, host: str = "127.0.0.1", path: str = "/v1") -> None:
        import threading

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}{path}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("the a cat dog sat on mat red blue green what is color of sky sea grass answer question please tell me "
         "about one two three four five six seven eight nine ten yes no it was big small happy sad run jump "
         "write short story list facts compare name born in city year work hobby").split()


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


def build_tokenizer(path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = make_corpus() + ["### Instruction: ### Response: ### Input: Below is an instruction that describes a "
                              "task. Please answer the following question. Q: A: user assistant system"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path, vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny Llama and its tokenizer (no pad token: tunesmith adds one)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(path)
    build_model(path, len(tok))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def alpaca_rows(n: int = 32, seed: int = 1):
    rng = random.Random(seed)
    colors = ["red", "blue", "green"]
    rows = []
    for i in range(n):
        c = colors[i % 3]
        rows.append({"instruction": f"what is the color of {rng.choice(['sky', 'sea', 'grass'])} {i % 5}",
                     "input": "" if i % 2 else "tell me",
                     "output": f"the answer is {c} {c} {rng.choice(WORDS)}"})
    return rows


@pytest.fixture
def alpaca_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())


def sft_config(model_dir, data, out, **over):
    cfg = dict(model_name_or_path=model_dir, dataset=data, output_dir=str(out), template="alpaca", max_length=128,
               per_device_train_batch_size=4, num_train_epochs=1, learning_rate=3e-3, logging_steps=1,
               save_strategy="no", report_to="none", seed=0, use_cpu=True, train_loss_eval_samples=8,
               disable_tqdm=True, dataloader_num_workers=0)
    cfg.update(over)
    return cfg


@pytest.fixture
def templated_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a saved alpaca template, as a tunesmith run leaves its output directory."""
    import shutil

    from tunesmith.data.templates import get_template, save_template

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    save_template(get_template("alpaca"), d)
    return str(d)


class ScaledLogits(torch.nn.Module):
    """A model whose logits are not a plain projection of its last hidden state (logit scaling or soft-capping, as
    some models have): the lean-logits paths must fall back to the model's own logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 4.0
        return out


def save_lora_adapter(base_dir, out, template: str = "alpaca", seed: int = 1) -> str:
    """A LoRA adapter directory of the model at ``base_dir``, as a tunesmith run saves one (template, chat template),
    with random non-zero B matrices so that it changes the model's answers (no training needed)."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.data.templates import get_template
    from tunesmith.models import load_model_and_tokenizer, save_model_dir

    model, tok = load_model_and_tokenizer(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    save_model_dir(peft_model, tok, out, template=get_template(template, tok))
    return str(out)
