"""litllm's lm-eval backend against lm-eval's own `hf` backend (transformers) on the same checkpoint dirs.

The local tasks in tests/eval_tasks/ (ARC-Easy multiple choice, a perplexity task, a generate_until task) run
offline; their relative data_files are read from that folder, so lm-eval runs inside it here.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from litllm.errors import UserError
from litllm.evaluate import LitLLM, main
from litllm.lora import LoRAConfig, LoRALinear, apply_lora, save_adapter

TASK_DIR = Path(__file__).parent / "eval_tasks"
ARC, PPL, GENERATE = "litllm_test_arc_easy", "litllm_test_ppl", "litllm_test_arc_easy_generate"


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    previous = os.getcwd()
    os.chdir(TASK_DIR)
    try:
        yield TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # lm-eval's own tasks: not needed
    finally:
        os.chdir(previous)


def evaluate(lm, task_manager, tasks, limit):
    """lm-eval's evaluator on `lm`: (results, per-sample records), each by task name."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager, log_samples=True,
                              bootstrap_iters=0)
    return results["results"], results["samples"]


def responses(samples, task):
    """Per document, its requests' answers: (loglikelihood, is_greedy) pairs, a rolling loglikelihood, or text."""
    return [[resp[0] for resp in sample["resps"]] for sample in sorted(samples[task], key=lambda s: s["doc_id"])]


def assert_loglikelihoods_close(ours, theirs, atol, ulps=0):
    """Equal within `atol`, or within `ulps` float32 units in the last place of the value (a float32 sum of
    hundreds of log-probs keeps only so many bits: -379.17 is stored in steps of 3e-5)."""
    assert len(ours) == len(theirs)
    for doc_ours, doc_theirs in zip(ours, theirs):
        for a, b in zip(doc_ours, doc_theirs, strict=True):
            a, b = (a, b) if isinstance(a, float) else (a[0], b[0])
            ulp = float(np.spacing(np.float32(abs(b))))
            assert abs(a - b) <= max(atol, ulps * ulp), (a, b)


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_dir, task_manager):
    """The tasks on SmolLM2 (float32, CPU): hf backend at batch size 1, litllm at 1 and 8. Few documents, as
    the hf side scores every choice as a whole sequence: 6 questions, 4 documents to score and to answer."""
    from lm_eval.models.huggingface import HFLM

    def run(lm, tasks):
        return {task: evaluate(lm, task_manager, [task], limit=6 if task == ARC else 4) for task in tasks}

    hf = HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", batch_size=1)
    runs = {"hf": run(hf, [ARC, PPL, GENERATE]), "hf_model": hf}
    ours = LitLLM(smollm2_dir, batch_size=1)
    runs["litllm"] = run(ours, [ARC, PPL, GENERATE])
    ours.batch_size = 8  # generation runs one request at a time: batch size is no matter there
    runs["litllm_bs8"] = run(ours, [ARC, PPL])
    runs["model"] = ours
    for name, lm in (("hf_float64", HFLM), ("litllm_float64", LitLLM)):  # the oracle for float32's rounding
        runs[name] = run(lm(pretrained=str(smollm2_dir), dtype="float64", device="cpu", batch_size=1), [PPL])
    return runs


@pytest.mark.slow
def test_multiple_choice_equals_hf_backend(smollm2_runs):
    (ours, our_samples), (theirs, their_samples) = smollm2_runs["litllm"][ARC], smollm2_runs["hf"][ARC]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[ARC][metric] == theirs[ARC][metric]
    assert_loglikelihoods_close(responses(our_samples, ARC), responses(their_samples, ARC), atol=1e-4)
    greedy = [[is_greedy for _, is_greedy in doc] for doc in responses(our_samples, ARC)]
    assert greedy == [[is_greedy for _, is_greedy in doc] for doc in responses(their_samples, ARC)]


@pytest.mark.slow
def test_perplexity_equals_hf_backend(smollm2_runs):
    """Two English and two Korean documents of 60 to 200 tokens.

    In float64 both backends compute the same numbers. In float32 each rounds its own way: a document's products of
    more than 256 rows run on another kernel than transformers' on some CPUs (model.linear), which sums in another
    order; the float64 run is the oracle that shows litllm's float32 log-likelihoods as close to the exact ones as
    lm-eval hf's own float32 ones, give or take the matmul blocking's few bits (as across batch sizes, below)."""
    exact = responses(smollm2_runs["hf_float64"][PPL][1], PPL)
    assert_loglikelihoods_close(responses(smollm2_runs["litllm_float64"][PPL][1], PPL), exact, atol=1e-9)
    (ours, our_samples), (theirs, their_samples) = smollm2_runs["litllm"][PPL], smollm2_runs["hf"][PPL]
    ours_ll, theirs_ll = responses(our_samples, PPL), responses(their_samples, PPL)
    for doc_ours, doc_theirs, doc_exact in zip(ours_ll, theirs_ll, exact, strict=True):
        for a, b, e in zip(doc_ours, doc_theirs, doc_exact, strict=True):
            assert abs(a - e) <= abs(b - e) + 8 * float(np.spacing(np.float32(abs(e)))), (a, b, e)
    # each aggregate is exp or a multiple of (summed log-likelihood / words or bytes): it may differ by exactly what
    # the documents' float32 log-likelihoods differ by, and no more
    drift = sum(abs(a - b) for doc_ours, doc_theirs in zip(ours_ll, theirs_ll) for a, b in zip(doc_ours, doc_theirs))
    texts = [sample["doc"]["text"] for sample in our_samples[PPL]]
    words, n_bytes = sum(len(re.split(r"\s+", text)) for text in texts), sum(len(text.encode()) for text in texts)
    for metric, units in (("word_perplexity,none", words), ("byte_perplexity,none", n_bytes)):
        assert abs(math.log(ours[PPL][metric] / theirs[PPL][metric])) <= drift / units * (1 + 1e-3) + 1e-12
    assert abs(ours[PPL]["bits_per_byte,none"] - theirs[PPL]["bits_per_byte,none"]) <= \
        drift / (n_bytes * math.log(2)) * (1 + 1e-3) + 1e-12


@pytest.mark.slow
def test_batch_size_does_not_change_results(smollm2_runs):
    """At batch size 8 two questions' continuations, and all documents, share forward passes. Padding cannot
    change a row (see LitLLM._score_groups); only float32 rounding moves with the matmul shapes."""
    for task in (ARC, PPL):
        (bs1, bs1_samples), (bs8, bs8_samples) = smollm2_runs["litllm"][task], smollm2_runs["litllm_bs8"][task]
        # the same float32 sums, accumulated in matmuls blocked for other shapes: equal to a few bits
        assert_loglikelihoods_close(responses(bs1_samples, task), responses(bs8_samples, task), atol=1e-4, ulps=8)
        if task == ARC:
            assert bs1[ARC]["acc,none"] == bs8[ARC]["acc,none"]
            assert bs1[ARC]["acc_norm,none"] == bs8[ARC]["acc_norm,none"]


@pytest.mark.slow
def test_generate_until_stops_at_stop_sequences_as_hf_backend(smollm2_runs):
    from litllm.decode import generate_tokens

    our_samples, their_samples = smollm2_runs["litllm"][GENERATE][1], smollm2_runs["hf"][GENERATE][1]
    ours = responses(our_samples, GENERATE)
    assert ours == responses(their_samples, GENERATE)
    model = smollm2_runs["model"]
    cut = 0
    for sample, (text,) in zip(sorted(our_samples[GENERATE], key=lambda s: s["doc_id"]), ours):
        assert "\n" not in text and "." not in text
        # the same greedy tokens without stop strings: our answer is that text up to the first stop
        prompt = model.tok_encode(sample["arguments"][0][0])
        tokens = list(generate_tokens(model.model, prompt, 24, stop_ids=model.tokenizer.stop_ids))
        free = model.tokenizer.decode(tokens, skip_special_tokens=True)
        stops = [i for i in (free.find("\n"), free.find(".")) if i >= 0]
        assert text == free[:min(stops, default=len(free))]
        cut += bool(stops)
    assert cut > 0, "no answer reached a stop sequence: the test would not notice one being ignored"


@pytest.mark.slow
def test_chat_template_prompts_equal_hf_backend(smollm2_runs):
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Question: 2+2?"},
               {"role": "assistant", "content": "Answer: "}]
    ours, hf = smollm2_runs["model"], smollm2_runs["hf_model"]
    assert ours.apply_chat_template(history[:2]) == hf.apply_chat_template(history[:2])
    assert ours.apply_chat_template(history, add_generation_prompt=False) == \
        hf.apply_chat_template(history, add_generation_prompt=False)
    prompt = ours.apply_chat_template(history[:2])
    assert ours.tok_encode(prompt) == hf.tok_encode(prompt)


def test_contexts_of_different_lengths_in_one_batch_equal_one_at_a_time_and_hf(tiny_chat_model_dir):
    """Three questions of 7, 3 and 5 context tokens, one row each in one pass: the longest answer whole, then each
    other answer's tokens past where it parts from that one, at its own positions, seeing only its own input. The
    other answers: one sharing a token with the longest, one that is its prefix, a single token, and a shorter one
    of another question that shares only the context."""
    from lm_eval.models.huggingface import HFLM

    questions = [
        ([101, 102, 103, 104, 105, 106, 107], [[201, 202, 203, 204], [201, 310, 311, 312], [201, 202], [401]]),
        ([108, 109, 110], [[501, 502, 503], [521, 522, 523, 524, 525, 526]]),
        ([111, 112, 113, 114, 115], [[601]]),
    ]
    requests = [(None, context, answer) for context, answers in questions for answer in answers]
    ours = LitLLM(tiny_chat_model_dir, batch_size=4)
    passes = []
    forward = ours.model.forward
    ours.model.forward = lambda input_ids, *args, **kwargs: passes.append(tuple(input_ids.shape)) or forward(
        input_ids, *args, **kwargs)
    batched = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    # the longest row: question 1's 7 + 4 - 1 input tokens, and 310, 311 of the answer that parts after 201
    assert passes == [(3, 12)]
    ours.batch_size = 1
    one_at_a_time = [ours._loglikelihood_tokens([request], disable_tqdm=True)[0] for request in requests]
    hf = HFLM(pretrained=str(tiny_chat_model_dir), dtype="float32", device="cpu", batch_size=1)
    theirs = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    assert_loglikelihoods_close([batched], [one_at_a_time], atol=1e-5)
    assert_loglikelihoods_close([batched], [theirs], atol=1e-5)
    assert [greedy for _, greedy in batched] == [greedy for _, greedy in theirs]


def test_rolling_windows_equal_hf_backend(tiny_chat_model_dir, task_manager):
    """A 16-token context splits every document into several windows, each scored after the text before it."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_chat_model_dir), dtype="float32", device="cpu", batch_size=1, max_length=16)
    ours = LitLLM(tiny_chat_model_dir, batch_size=4, max_length=16)
    _, their_samples = evaluate(hf, task_manager, [PPL], limit=5)
    _, our_samples = evaluate(ours, task_manager, [PPL], limit=5)
    assert_loglikelihoods_close(responses(our_samples, PPL), responses(their_samples, PPL), atol=1e-4)


def test_adapter_evaluates_unmerged_as_peft(tiny_chat_model_dir, task_manager, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from litllm.checkpoint import load_model

    config = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    model = apply_lora(load_model(tiny_chat_model_dir), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the adapter changes the scores
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter_dir = save_adapter(model, config, tmp_path / "adapter", base_checkpoint=tiny_chat_model_dir)

    ours = LitLLM(tiny_chat_model_dir, adapter=adapter_dir, batch_size=4)
    assert any(isinstance(module, LoRALinear) for module in ours.model.modules())  # not merged
    peft = HFLM(pretrained=str(tiny_chat_model_dir), peft=str(adapter_dir), dtype="float32", device="cpu",
                batch_size=1)
    base = LitLLM(tiny_chat_model_dir, batch_size=4)
    _, our_samples = evaluate(ours, task_manager, [ARC], limit=6)
    _, peft_samples = evaluate(peft, task_manager, [ARC], limit=6)
    _, base_samples = evaluate(base, task_manager, [ARC], limit=6)
    assert_loglikelihoods_close(responses(our_samples, ARC), responses(peft_samples, ARC), atol=1e-4)
    with pytest.raises(AssertionError):  # and the adapter did change them
        assert_loglikelihoods_close(responses(our_samples, ARC), responses(base_samples, ARC), atol=1e-2)


def test_cli_writes_results_and_samples(tiny_chat_model_dir, tmp_path):
    out_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "litllm", "evaluate", str(tiny_chat_model_dir), "--tasks", ARC,
         "--include_path", str(TASK_DIR), "--limit", "4", "--batch_size", "4", "--num_fewshot", "1",
         "--out_dir", str(out_dir), "--log_samples", "true"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "acc_norm" in result.stdout and ARC in result.stdout  # lm-eval's table
    (results_file,) = out_dir.glob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"][ARC]["sample_len"] == 4 and results["n-shot"][ARC] == 1
    assert results["config"]["model"] == "litllm"
    (samples_file,) = out_dir.glob(f"samples_{ARC}_*.jsonl")
    assert len(samples_file.read_text().splitlines()) == 4
    assert str(results_file) in result.stdout


def test_unknown_task_is_a_user_error(tiny_chat_model_dir):
    with pytest.raises(UserError, match="unknown task.*no_such_task.*lm-eval ls tasks"):
        main(tiny_chat_model_dir, tasks=f"{ARC},no_such_task", include_path=TASK_DIR)
