"""Serving throughput and latency: `tunesmith serve` vs a sequential loop vs `transformers serve`, in one run.

One model (a Llama built from a config, random weights, saved by tunesmith with its alpaca template, so its tokenizer
carries the chat template every server applies), one set of chat prompts, greedy decoding with ``max_tokens`` new
tokens per request. Each server runs in its own process on a free loopback port; C client threads (1, 4, 16) each
send requests one after another (a closed loop) until ``--per-client`` requests each are answered. Reported per
server and C: generated tokens/s (the ``usage.completion_tokens`` of all answers / wall time) and request latency
percentiles. The sequential loop is the same requests answered one at a time in-process by
``tunesmith.generate.generate`` (no server, no batching): the best a one-at-a-time server could do.

Peers: ``transformers serve MODEL`` (transformers' own OpenAI-compatible server, offline on a local directory) with
its default decoding and with ``--continuous-batching``, where they start.

    python bench/bench_serve.py                 # ~7 min on 2 busy cores
    python bench/bench_serve.py --quick         # smoke check, < 1 min (figures meaningless)

Targets (issue 21): at 16 clients, >= 4x the sequential loop's tokens/s and >= the peer's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_v, "1")
# One intra-op thread in every process (this one and the servers), as the other benches: on a shared machine, threads
# spinning against other load make the figures meaningless. OMP_NUM_THREADS=2 python bench/bench_serve.py to change.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = [f"w{i}" for i in range(600)]


def build_model(path: Path, hidden: int, layers: int) -> None:
    from bench_generate import build

    from tunesmith.data.templates import get_template
    from tunesmith.models import save_model_dir

    model, tok = build(hidden, layers)
    model.config.max_position_embeddings = 2048
    save_model_dir(model, tok, path, template=get_template("alpaca"))


def prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 48))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: dict) -> dict:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return json.loads(data)


def load(port: int, model: str, texts: list[str], clients: int, per_client: int, new: int) -> dict:
    """C closed-loop clients; returns tokens/s and latency percentiles."""
    latencies, tokens = [], []
    lock = threading.Lock()

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for k in range(per_client):
            text = texts[(c * per_client + k) % len(texts)]
            t = time.perf_counter()
            out = post(conn, {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": new,
                              "temperature": 0})
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                tokens.append(out["usage"]["completion_tokens"])
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(latencies), "tokens": sum(tokens), "wall_s": wall,
            "tok_per_s": sum(tokens) / wall, "p50_s": q[49], "p90_s": q[89], "p99_s": q[98]}


class Process:
    """A server in its own process; ready when a first request is answered."""

    def __init__(self, argv: list[str], port: int, model: str, log: Path, env: dict | None = None):
        self.port, self.model, self.log = port, model, log
        self.proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))

    def wait_ready(self, timeout: float = 300) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                post(conn, {"model": self.model, "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4,
                            "temperature": 0})
                return True
            except (OSError, RuntimeError, http.client.HTTPException):
                time.sleep(1)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def sequential(path: Path, texts: list[str], n: int, new: int) -> dict:
    """The same requests answered one at a time in this process (no server, no batching)."""
    from tunesmith.generate import generate
    from tunesmith.serve.engine import chat_prompt_ids, load_served

    served = load_served(str(path), dtype="float32", device="cpu")
    ids = [chat_prompt_ids(served, [{"role": "user", "content": t}]) for t in texts[:n]]
    generate(served.model, served.tokenizer, [ids[0]], max_new_tokens=4)  # warm-up
    latencies, tokens = [], 0
    start = time.perf_counter()
    for p in ids:
        t = time.perf_counter()
        tokens += generate(served.model, served.tokenizer, [p], batch_size=1, max_new_tokens=new)[0]["new_tokens"]
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    del served
    q = statistics.quantiles(latencies, n=100)
    return {"clients": 1, "requests": n, "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "p50_s": q[49], "p90_s": q[89], "p99_s": q[98]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    ap.add_argument("--quick", action="store_true", help="tiny model, few requests: a smoke check")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.new, args.per_client = 64, 2, 8, 2
    levels = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    path = work / "model"
    build_model(path, args.hidden, args.layers)
    texts = prompts(max(levels) * args.per_client)
    rows = []
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, random weights; {args.new} new tokens per "
          f"request, greedy; {args.per_client} requests per client; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    seq = sequential(path, texts, max(8, 2 * args.per_client), args.new)
    rows.append({"server": "sequential loop", **seq})
    print(f"sequential loop: {seq['tok_per_s']:.1f} tok/s", flush=True)

    servers = [("tunesmith serve", [sys.executable, "-m", "tunesmith.cli", "serve", str(path), "--port", "{port}",
                                    "--max_batch_size", "16", "--log_level", "warning", "--dtype", "float32",
                                    "--preferences_dir", ""], "model", {})]
    exe = shutil.which("transformers")
    if not args.no_peer and exe:
        for cb in (False, True):
            name = "transformers serve" + (" --continuous-batching" if cb else "")
            argv = [exe, "serve", str(path), "--port", "{port}", "--device", "cpu", "--dtype", "float32"]
            servers.append((name, argv + (["--continuous-batching"] if cb else []), str(path), {}))
    elif not args.no_peer:
        print("peer skipped: no `transformers` command (pip install 'transformers[serving]')")
    for name, argv, model, env in servers:
        port = free_port()
        log = work / f"{name.replace(' ', '_').replace('-', '')}.log"
        proc = Process([a.replace("{port}", str(port)) for a in argv], port, model, log, env)
        try:
            if not proc.wait_ready():
                tail = log.read_text(errors="replace")[-600:]
                print(f"{name}: did not start offline; its log ends:\n{tail}")
                rows.append({"server": name, "error": "did not start", "log_tail": tail})
                continue
            for c in levels:
                try:
                    r = load(port, model, texts, c, args.per_client, args.new)
                except Exception as e:  # a peer that fails under load is reported, not fatal
                    print(f"{name} at {c} clients failed: {e}")
                    rows.append({"server": name, "clients": c, "error": str(e)[:200]})
                    continue
                rows.append({"server": name, **r})
                print(f"{name:<44} {c:>2} clients: {r['tok_per_s']:8.1f} tok/s  p50 {r['p50_s']:.2f} s  "
                      f"p90 {r['p90_s']:.2f} s  p99 {r['p99_s']:.2f} s", flush=True)
        finally:
            proc.stop()

    print("\n| server | clients | requests | tokens | tok/s | × sequential | p50 s | p90 s | p99 s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['server']} | {r.get('clients', '')} | — | — | — | — | {r['error'][:60]} | | |")
            continue
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_per_s']:.1f} | "
              f"{r['tok_per_s'] / seq['tok_per_s']:.2f} | {r['p50_s']:.2f} | {r['p90_s']:.2f} | {r['p99_s']:.2f} |")
    ours = {r["clients"]: r for r in rows if r["server"] == "tunesmith serve" and "error" not in r}
    top = max(levels)
    if top in ours:
        print(f"\nat {top} clients: tunesmith serve = {ours[top]['tok_per_s'] / seq['tok_per_s']:.2f}x the sequential "
              "loop (target >= 4)")
        for r in rows:
            if r["server"].startswith("transformers") and r.get("clients") == top and "error" not in r:
                print(f"at {top} clients: tunesmith serve = {ours[top]['tok_per_s'] / r['tok_per_s']:.2f}x "
                      f"{r['server']} (target >= 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
