"""Serving throughput: the same requests sent one after another, then all at once, to one `litllm serve`.

    python benchmarks/serve.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Starts the server on a free local port, sends `--requests` greedy chat completions sequentially and then
concurrently (the server decodes concurrent requests together), prints one table and appends it to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from common import append_results, machine

TOPICS = ["a steam engine", "photosynthesis", "the water cycle", "a bicycle's gears", "volcanoes", "the internet",
          "vaccines", "tides", "a refrigerator", "rainbows", "bread baking", "earthquakes", "a compass",
          "solar panels", "the human heart", "airplane wings"]


def start_server(checkpoint_dir: Path, max_batch_size: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "litllm", "serve", str(checkpoint_dir), "--port", str(port),
                                    "--max_batch_size", str(max_batch_size), "--max_seq_len", "1024"],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"the server exited:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    sys.exit(f"the server did not answer /health:\n{log_path.read_text()}")


def run(client: openai.OpenAI, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> dict:
    def ask(prompt: str) -> tuple[str, int, float]:
        start = time.perf_counter()
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0)
        return response.choices[0].message.content, response.usage.completion_tokens, time.perf_counter() - start

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(ask, prompts))
    else:
        results = [ask(prompt) for prompt in prompts]
    seconds = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return {"answers": [r[0] for r in results], "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mean_latency": sum(r[2] for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()

    prompts = [f"Explain in detail how {TOPICS[i % len(TOPICS)]} works." for i in range(args.requests)]
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    process, url = start_server(args.checkpoint_dir, max_batch_size=args.requests, log_path=log_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        run(client, model, prompts[:1], 4, concurrent=False)  # warm-up
        sequential = run(client, model, prompts, args.max_tokens, concurrent=False)
        concurrent = run(client, model, prompts, args.max_tokens, concurrent=True)
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        assert health["running"] == 0, health
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)

    same = sum(a == b for a, b in zip(sequential["answers"], concurrent["answers"]))
    header = ["requests sent", "completion tokens", "wall s", "total tokens/s", "mean latency s"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for name, result in (("one after another", sequential), (f"{args.requests} at once", concurrent)):
        lines.append(f"| {name} | {result['tokens']} | {result['seconds']:.1f} | {result['tokens_per_s']:.1f} | "
                     f"{result['mean_latency']:.2f} |")
    table = "\n".join(lines)
    ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
    print(table)
    print(f"concurrent / sequential throughput: {ratio:.2f}x; greedy answers equal: {same}/{args.requests}")
    append_results(
        title=f"Serving, {args.checkpoint_dir.name}, {args.requests} requests, {args.max_tokens} max tokens each",
        command="python " + " ".join(sys.argv),
        table=table,
        notes=f"{machine()}; one `litllm serve` process (--max_batch_size {args.requests}, float32), greedy chat "
              f"completions through the `openai` client after one warm-up request. Concurrent throughput is "
              f"**{ratio:.2f}x** the sequential one (the server decodes the concurrent requests together); greedy "
              f"answers equal between the two runs: {same}/{args.requests}.",
    )


if __name__ == "__main__":
    main()
