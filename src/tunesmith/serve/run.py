"""`tunesmith serve`: an OpenAI-compatible server (and a web page) for one or more trained models.

    tunesmith serve --model_name_or_path RUN [--port 8000]
    tunesmith serve RUN_SFT RUN_NEFTUNE          # two models: chat with either, compare them side by side at /

Safe defaults: it listens on 127.0.0.1 only (``--host 0.0.0.0`` to open it, ideally with a key); ``--api_key_env
NAME`` makes every API call need ``Authorization: Bearer $NAME`` (the key is read from that environment variable,
compared in constant time and never logged); request bodies, waiting requests and sequences per batch are bounded.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import field
from tunesmith.errors import UserError

log = logging.getLogger("tunesmith.serve")


@dataclass
class ServeConfig:
    model_name_or_path: list[str] = field([], "model directories to serve (a tunesmith run, a LoRA adapter, a merged "
                                              "model, any causal LM); also taken as bare arguments")
    served_model_name: list[str] | None = field(None, "the names clients ask for, one per model (default: each "
                                                      "directory's name)")
    host: str = field("127.0.0.1", "address to listen on (default loopback only)")
    port: int = field(8000, "port (0: any free port; the address is printed)")
    api_key_env: str = field("", "NAME of an environment variable holding the API key "
                                 "clients must send as a bearer token ('' : no key)")
    template: str = field("", "prompt template for every model (default: the one each "
                              "was saved with)")
    dtype: str = field("auto", "auto, float32, bfloat16, float16")
    device: str = field("auto", "auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    max_new_tokens: int = field(256, "answer budget for a request that sets no "
                                     "max_tokens (capped by the context)")
    max_batch_size: int = field(16, "sequences decoded together per model")
    max_queue: int = field(64, "requests waiting per model; more get 503 + Retry-After")
    batch_wait: float = field(0.01, "seconds the worker waits for more requests of a burst "
                                     "before decoding (0: start at once)")
    max_body_bytes: int = field(1 << 20, "largest request body (413 beyond)")
    preferences_dir: str = field("tunesmith-preferences", "where the web page's blind comparisons go "
                                                          "(A_vs_B/judgements.jsonl, the judge's format)")
    log_level: str = field("info", "uvicorn log level: debug, info, warning, error")

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("'model_name_or_path' is required (tunesmith serve RUN, or --model_name_or_path RUN)")
        if self.served_model_name is not None and len(self.served_model_name) != len(self.model_name_or_path):
            raise UserError(f"served_model_name has {len(self.served_model_name)} names for "
                            f"{len(self.model_name_or_path)} models")
        if not 0 <= self.port < 65536:
            raise UserError(f"port must be in 0..65535, got {self.port}")
        for key in ("max_new_tokens", "max_batch_size", "max_queue", "max_body_bytes"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.batch_wait <= 10:
            raise UserError(f"batch_wait must be in [0, 10] seconds, got {self.batch_wait}")
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise UserError(f"log_level must be debug, info, warning, error or critical, got {self.log_level!r}")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise UserError(f"environment variable {self.api_key_env} (api_key_env) is not set or empty")

    def names(self) -> list[str]:
        if self.served_model_name:
            names = list(self.served_model_name)
        else:
            names = [Path(p.rstrip("/")).name or p for p in self.model_name_or_path]
        if len(set(names)) != len(names):
            names = [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        return names


def build_server(cfg: ServeConfig, served=None):
    """The :class:`~tunesmith.serve.app.Server` for ``cfg`` (``served``: models already loaded, for tests)."""
    from tunesmith.serve.app import Server
    from tunesmith.serve.engine import Engine, load_served

    if served is None:
        served = [load_served(path, name, cfg.dtype, cfg.template, cfg.device)
                  for path, name in zip(cfg.model_name_or_path, cfg.names())]
    engines = {s.name: Engine(s, cfg.max_batch_size, cfg.max_queue, cfg.batch_wait) for s in served}
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return Server(engines, api_key=key, max_body_bytes=cfg.max_body_bytes, default_max_tokens=cfg.max_new_tokens,
                  preferences_dir=cfg.preferences_dir or None)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Background:
    """A server running in a thread of this process (tests, benchmarks): ``.url``, ``.stop()``."""

    def __init__(self, server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = server
        config = uvicorn.Config(server.app(), log_level=log_level, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started and self.thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)
        self.sock.close()


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    if not is_loopback(cfg.host) and not cfg.api_key_env:
        print(f"tunesmith serve: warning: listening on {cfg.host} without an API key: anyone who can reach this "
              "address can use the models (set --api_key_env NAME)", file=sys.stderr)
    sock = bind(cfg.host, cfg.port)  # before loading: a taken port fails fast
    server = build_server(cfg)
    url = url_of(sock)
    for name, engine in server.engines.items():
        s = engine.served
        print(f"tunesmith serve: {name} <- {s.path} (template {s.template_spec!r}, context {s.context}, "
              f"{next(s.model.parameters()).device})", file=sys.stderr)
    print(f"tunesmith serve: OpenAI API at {url}/v1 · web page at {url}/ · "
          f"{'bearer key from $' + cfg.api_key_env if cfg.api_key_env else 'no API key'} · Ctrl-C stops",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app(), log_level=cfg.log_level, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(ServeConfig, argv, "serve", "Serve models over an OpenAI-compatible HTTP API (chat and text "
                                                "completions, streaming, batched decoding) with a web page for chat "
                                                "and blind side-by-side comparison.", positional="model_name_or_path")
    if cfg is None:
        return 0
    serve(cfg)
    return 0
