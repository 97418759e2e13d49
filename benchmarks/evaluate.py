"""lm-eval task time: litllm's backend vs lm-eval's `hf` backend (transformers), same checkpoint, task, dtype, batch.

    python benchmarks/evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Three shapes of request: ARC-Easy (500 questions, a short context and 4 short answers), PIQA (500 questions, 2 long
answers that often share their first words), both from the shared data/eval folder, and perplexity
(loglikelihood_rolling over whole documents cut from a local text). Per task each backend lives in a fresh process
of its own (so each has its own peak RSS), and the two take turns on the whole task, hf-litllm-litllm-hf, so that
on a shared machine both see about the same load. Checks that every document gets the same acc and acc_norm from
both, prints one table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from common import append_results, machine

ROOT = Path(__file__).parent.parent
PERPLEXITY_TASK = "litllm_bench_perplexity"
BACKENDS = {"hf": "lm-eval hf (transformers)", "litllm": "litllm"}

_lm = None  # the backend of this worker process (see load_backend)
_task_manager = None


def load_backend(backend: str, checkpoint_dir: Path, include_paths: list[Path], batch_size: int) -> None:
    """Worker start: load the model once, and time every call lm-eval makes into it."""
    global _lm, _task_manager
    import torch
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    os.chdir(include_paths[0])  # a task's relative data_files are read relative to the working directory
    _task_manager = TaskManager(include_path=[str(path) for path in include_paths], include_defaults=False)
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        _lm = HFLM(pretrained=str(checkpoint_dir), dtype="float32", device="cpu", batch_size=batch_size)
    else:
        from litllm.evaluate import LitLLM
        from litllm.memory import keep_freed_memory

        keep_freed_memory()  # as `litllm evaluate` on CPU
        _lm = LitLLM(checkpoint_dir, dtype="float32", device="cpu", batch_size=batch_size)
    _lm.seconds = 0.0
    for method in ("loglikelihood", "loglikelihood_rolling"):
        setattr(_lm, method, _timed(getattr(_lm, method)))


def _timed(method):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            _lm.seconds += time.perf_counter() - start
    return timed


def run_task(task: str, limit: int | None) -> tuple[float, dict, list[dict]]:
    """Seconds spent inside the backend on the first `limit` documents of `task`, lm-eval's metrics, and each
    document's acc and acc_norm."""
    from lm_eval import simple_evaluate

    _lm.seconds = 0.0
    results = simple_evaluate(model=_lm, tasks=[task], limit=limit, task_manager=_task_manager, bootstrap_iters=0,
                              log_samples=True)
    per_document = [{"doc_id": s["doc_id"], **{m: s[m] for m in ("acc", "acc_norm") if m in s}}
                    for s in results["samples"][task]]
    return _lm.seconds, results["results"][task], sorted(per_document, key=lambda d: d["doc_id"])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def write_perplexity_task(text_file: Path, n_docs: int, doc_chars: int, out_dir: Path) -> None:
    """A wikitext-like task: `n_docs` documents of about `doc_chars` characters, cut from `text_file` at blank lines."""
    docs, current = [], []
    for paragraph in (p.strip() for p in text_file.read_text().split("\n\n") if p.strip()):
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
        if len(docs) == n_docs:
            break
    (out_dir / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    (out_dir / "perplexity.yaml").write_text(
        f"task: {PERPLEXITY_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out_dir / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--include_path", type=Path, default=ROOT.parent / "shared" / "data" / "eval",
                        help="folder of the multiple-choice task YAMLs (litllm's shared data/eval)")
    parser.add_argument("--tasks", default=f"litllm_arc_easy_500,litllm_piqa_500,{PERPLEXITY_TASK}")
    parser.add_argument("--perplexity_text", type=Path, default=ROOT / "data" / "tiny_shakespeare.txt")
    parser.add_argument("--perplexity_docs", type=int, default=40)
    parser.add_argument("--perplexity_doc_chars", type=int, default=4000)
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend and task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_append", action="store_true", help="print the table only")
    args = parser.parse_args()

    checkpoint_dir = args.checkpoint_dir.resolve()
    perplexity_dir = Path(tempfile.mkdtemp(prefix="litllm-bench-ppl-"))
    write_perplexity_task(args.perplexity_text.resolve(), args.perplexity_docs, args.perplexity_doc_chars,
                          perplexity_dir)
    include_paths = [args.include_path.resolve(), perplexity_dir]
    rows = []
    for task in args.tasks.split(","):
        # fresh processes per task: each row's peak RSS is that task's
        workers = {backend: ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                                                initializer=load_backend,
                                                initargs=(backend, checkpoint_dir, include_paths, args.batch_size))
                   for backend in BACKENDS}
        for worker in workers.values():  # warm-up: the dataset is prepared and the kernels are loaded before timing
            worker.submit(run_task, task, 2).result()
        seconds, runs = {backend: [] for backend in BACKENDS}, {}
        for repeat in range(args.repeats):
            for backend in list(BACKENDS)[::1 if repeat % 2 == 0 else -1]:  # hf, litllm, litllm, hf, ...
                spent, metrics, per_document = workers[backend].submit(run_task, task, args.limit).result()
                seconds[backend].append(spent)
                runs[backend] = (metrics, per_document)
                print(task, backend, f"{spent:.1f} s", file=sys.stderr)
        rss = {backend: worker.submit(peak_rss_gb).result() for backend, worker in workers.items()}
        for worker in workers.values():
            worker.shutdown()
        (hf, hf_documents), (ours, our_documents) = runs["hf"], runs["litllm"]
        for metric in ("acc", "acc_norm"):
            differ = [h["doc_id"] for h, o in zip(hf_documents, our_documents) if h.get(metric) != o.get(metric)]
            assert not differ, f"{task} {metric} differs on documents {differ}"
        if "word_perplexity,none" in hf:
            drift = ours["word_perplexity,none"] / hf["word_perplexity,none"] - 1
            assert abs(drift) < 1e-4, f"{task} word perplexity: litllm {ours} != hf {hf}"
        rows.append((task, seconds, {"hf": hf, "litllm": ours}, rss))

    header = ["task", "backend", "seconds (runs)", "docs/s", "acc", "acc_norm", "word perplexity", "peak RSS GB",
              "speed-up"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for task, seconds, metrics, rss in rows:
        mean = {backend: sum(runs) / len(runs) for backend, runs in seconds.items()}
        for backend, name in BACKENDS.items():
            m = metrics[backend]
            scores = [f"{m[key]:.4f}" if key in m else "-" for key in ("acc,none", "acc_norm,none",
                                                                      "word_perplexity,none")]
            runs = ", ".join(f"{run:.1f}" for run in seconds[backend])
            lines.append(f"| {task} | {name} | {mean[backend]:.1f} ({runs}) | {m['sample_len'] / mean[backend]:.2f} | "
                         f"{' | '.join(scores)} | {rss[backend]:.2f} | {mean['hf'] / mean[backend]:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_results(
            title=f"lm-eval multiple choice and perplexity, {checkpoint_dir.name}, batch {args.batch_size}",
            command="python " + " ".join(sys.argv),
            table=table,
            notes=f"{machine()}; float32, CPU, 0-shot. Each backend in its own process, loaded once; per task the two "
                  f"took turns on the whole task, hf-litllm-litllm-hf ({args.repeats} runs each, seconds their mean), "
                  "so both saw about the same load; seconds are those spent inside the backend's "
                  "loglikelihood(_rolling) calls, after a 2-document warm-up. Peak RSS: each process's ru_maxrss, "
                  "model loading included (fresh processes per task). "
                  f"The perplexity task is {args.perplexity_docs} documents of about {args.perplexity_doc_chars} "
                  f"characters cut from {args.perplexity_text.name} at blank lines. Every document's acc and acc_norm "
                  "asserted equal between the backends, and the word perplexities within 1e-4.",
        )


if __name__ == "__main__":
    main()
