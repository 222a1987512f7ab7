"""Benchmark: `glmdeploy serve` over HTTP against the same model called in-process.

Starts `glmdeploy serve` (a real process on a free loopback port), once with
`runtime.batch_size=1` (one sequence at a time) and once with `runtime.batch_size=16` (concurrent
requests batched), and loads the same deployment in this process. For 1, 4 and 16 concurrent
clients (threads sharing one `openai` client, no retries), each level sends the same N greedy
completions of `--max-tokens` tokens; in-process, the same N prompts go through
`glmdeploy.generate` one after another on one thread. Levels are interleaved (in-process, then
server) so that load on the machine affects both alike. Prints a Markdown table: requests/s and
generated tokens/s on each side, the server's median latency, and server ÷ in-process (at batch
size 1 the server's overhead: HTTP, JSON, tokenising, streaming bookkeeping; below 1 is slower;
at 16, what batching buys). Greedy outputs are checked to be identical on both sides.

Both sides run torch with `--threads` intra-op threads (default 1: the tiny model gains nothing
from more, and on a busy machine two threads can be many times slower than one).

    python benchmarks/serve.py [--requests 32] [--max-tokens 32] [--threads 1] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import torch

import glmdeploy

LEVELS = (1, 4, 16)
BATCH_SIZES = (1, 16)


def start_server(
    overrides: list[str], threads: int, run_dir: str
) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "glmdeploy", "serve", *overrides, "--port", "0",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)  # fmt: skip
    ready: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("serving "):
                ready.put(line.split(" on ", 1)[1].strip())

    threading.Thread(target=read, daemon=True).start()
    return process, ready.get(timeout=180)


def in_process(loaded: Any, prompts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
    started = time.perf_counter()
    results = [glmdeploy.generate(loaded, p, max_new_tokens=max_tokens) for p in prompts]
    seconds = time.perf_counter() - started
    texts = [r.text[0] if r.text else "" for r in results]
    return seconds, sum(r.new_tokens for r in results), texts


def over_http(
    client: openai.OpenAI, model: str, prompts: list[str], max_tokens: int, clients: int
) -> tuple[float, int, list[str], list[float]]:
    latencies: list[float] = []

    def ask(prompt: str) -> Any:
        t = time.perf_counter()
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0)  # fmt: skip
        latencies.append(time.perf_counter() - t)
        return answer

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - started
    tokens = sum(a.usage.completion_tokens for a in answers)
    return seconds, tokens, [a.choices[0].text for a in answers], latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    parser.add_argument("overrides", nargs="*", help="deployment overrides (default: the tiny GLM)")
    args = parser.parse_args()
    overrides = ["gpus=cpu", *args.overrides]
    torch.set_num_threads(args.threads)
    loaded = glmdeploy.load([*overrides, "runtime.batch_size=1"])  # generate: one sequence
    model = loaded.planned.deployment.model.name if loaded.planned else "?"
    prompts = [f"Request {i}: the capital of France is" for i in range(args.requests)]
    rows, same = [], True
    for batch in BATCH_SIZES:
        server = [*overrides, f"runtime.batch_size={batch}", "runtime.max_queued_requests=16"]
        with tempfile.TemporaryDirectory() as run_dir:
            process, url = start_server(server, args.threads, run_dir)
            try:
                client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
                in_process(loaded, prompts[:2], args.max_tokens)  # warm-up, both sides
                over_http(client, model, prompts[:2], args.max_tokens, 2)
                for clients in LEVELS:
                    local = in_process(loaded, prompts, args.max_tokens)
                    http = over_http(client, model, prompts, args.max_tokens, clients)
                    same = same and http[2] == local[2] and http[1] == local[1]
                    rows.append((batch, clients, len(prompts) / http[0], http[1] / http[0],
                                 statistics.median(http[3]), len(prompts) / local[0],
                                 local[1] / local[0], local[0] / http[0]))  # fmt: skip
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    print(f"model {model}, {args.requests} requests × {args.max_tokens} new tokens (greedy) per "
          f"level, torch threads {args.threads}; outputs identical on both sides: "
          f"{'yes' if same else 'NO'}\n")  # fmt: skip
    print("| runtime.batch_size | clients | server req/s | server tok/s | server p50 latency s "
          "| in-process req/s | in-process tok/s | server ÷ in-process |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for b, c, rps, tps, p50, lrps, ltps, ratio in rows:
        print(f"| {b} | {c} | {rps:.1f} | {tps:.0f} | {p50:.3f} | {lrps:.1f} | {ltps:.0f} "
              f"| {ratio:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
