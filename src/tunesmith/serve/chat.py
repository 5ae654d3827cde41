"""`tunesmith chat`: talk to a model in the terminal, its answer streamed token by token.

The prompt is rendered with the template the model was trained with, exactly as ``tunesmith generate`` renders it.
A ``chat`` template keeps the conversation (multi-turn); an instruction template (alpaca, instruction_response, qa, a
format string) answers each message as a new prompt (single-turn: what it was trained on). ``/reset`` starts over,
``/exit`` (or end of input) leaves; Ctrl-C stops the answer being written. Works on a full model, a LoRA adapter
directory (its base is loaded from ``adapter_config.json``) and a merged model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tunesmith.errors import UserError
from tunesmith.generate import check_decoding


@dataclass
class ChatConfig:
    model_name_or_path: str = field(default="", metadata={"help": "a model directory (a tunesmith run, a LoRA "
                                                                   "adapter, a merged model, any causal LM)"})
    template: str = field(default="", metadata={"help": "prompt template (default: the one the model was saved "
                                                        "with)"})
    system: str = field(default="", metadata={"help": "a system message put before the first prompt"})
    max_new_tokens: int = field(default=256, metadata={"help": "answer budget in tokens"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "the NEFTune paper uses 1.2 with greedy"})
    seed: int = field(default=0, metadata={"help": "random seed (sampling), set once for the session"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one), cpu, cuda, cuda:1, ..."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("'model_name_or_path' is required")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        check_decoding(self.temperature, self.top_p, self.top_k, self.repetition_penalty, 0)
        if self.do_sample and self.temperature == 0:
            self.do_sample = False


def chat(cfg: ChatConfig, stdin=None, stdout=None) -> None:
    import torch

    from tunesmith.generate import _eos_ids
    from tunesmith.serve.engine import (
        Job,
        Params,
        RequestError,
        chat_prompt_ids,
        decode,
        load_served,
    )

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    served = load_served(cfg.model_name_or_path, dtype=cfg.dtype, template=cfg.template, device=cfg.device)
    if served.template is None:
        raise UserError(f"{cfg.model_name_or_path}: no prompt template (no tunesmith_template.json, no chat template "
                        "in the tokenizer); pass --template")
    multi = served.template.name == "chat"
    eos = set(_eos_ids(served.model, served.tokenizer))
    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    tty = stdin.isatty()
    print(f"tunesmith chat: {served.name} (template {served.template.spec()!r}: "
          f"{'multi-turn' if multi else 'single-turn, each message a new prompt'}; /reset starts over, /exit leaves)",
          file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    system = list(history)
    while True:
        if tty:
            print("you> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            print(file=stdout)
            return
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = list(system)
            print("(conversation reset)", file=stdout, flush=True)
            continue
        messages = (history if multi else list(system)) + [{"role": "user", "content": text}]
        try:
            ids = chat_prompt_ids(served, messages)
        except RequestError as e:
            print(f"(cannot prompt the model: {e})", file=stdout, flush=True)
            continue
        room = (served.context - len(ids)) if served.context else cfg.max_new_tokens
        if room < 1:
            print(f"(the conversation has {len(ids)} tokens, the model's context is {served.context}: /reset)",
                  file=stdout, flush=True)
            continue
        params = Params(max_tokens=min(cfg.max_new_tokens, room), temperature=cfg.temperature if cfg.do_sample
                        else 0.0, top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)

        def show(event):
            if event is not None and event[1]:
                print(event[1], end="", file=stdout, flush=True)

        job = Job([ids], 1, params, served.tokenizer, show)
        try:
            decode(served, [job], eos)
            job.close()
        except KeyboardInterrupt:
            job.cancel()
            print(" [stopped]", end="", file=stdout)
        answer = job.choices[0].text
        print(file=stdout, flush=True)
        if multi:
            history = messages + [{"role": "assistant", "content": answer}]


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(ChatConfig, argv, "chat", "Talk to a model in the terminal with its training prompt template; "
                                              "answers stream as they are generated. /reset starts over, /exit "
                                              "leaves.", positional=None)
    if cfg is None:
        return 0
    chat(cfg)
    return 0
