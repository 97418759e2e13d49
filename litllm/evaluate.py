"""lm-evaluation-harness over the litllm model: the `litllm` lm-eval backend and `litllm evaluate`.

`LitLLM` is an lm-eval `LM` registered as model `litllm` (`lm_eval --model litllm --model_args pretrained=DIR`
works once this module is imported). It runs litllm's own GPT, no conversion to transformers, and tokenizes as
lm-eval's `hf` backend does (lm_eval/api/model.py `TemplateLM`, lm_eval/models/huggingface.py `HFLM`), so the
numbers are the `hf` backend's up to float32 rounding.

Multiple-choice questions score several continuations of one context. Here a question is one row: its longest
answer whole, then each other answer only from where it parts from that one (after the context, and often after
its first words), at its own positions, attending to the shared part and to itself (a tree of branches, not a
batch of copies): a 4-choice question costs one whole answer plus what the three others add, instead of four whole
sequences, in one pass. Questions of any lengths share a pass, right-padded, longest first. Only the scored
positions go through the output layer and log-softmax (a 49k-word vocabulary makes that a fifth of a small
model's work), and a position shared by several answers is scored once.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from litllm.checkpoint import check_checkpoint_dir, inference_dtype, load_model, parse_device
from litllm.decode import OneTokenStep, generate_tokens, inference_linears, stream_text
from litllm.errors import UserError
from litllm.lora import load_adapter
from litllm.memory import keep_freed_memory, weights_on_huge_pages
from litllm.model import GPT, fuse_projections
from litllm.tokenizer import Tokenizer
from litllm.training.losses import token_logprobs

# generation_kwargs a task may set that litllm's sampler understands (lm-eval normalizes max_new_tokens & co.
# into max_gen_toks, and do_sample/temperature into each other)
_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@register_model("litllm")
class LitLLM(TemplateLM):
    """An lm-eval model over a Hugging Face checkpoint dir, run by litllm.

    `adapter` is a LoRA adapter dir (PEFT format); its layers stay separate from the base weights (not merged),
    so what is evaluated is exactly what training produced. `batch_size` is the number of rows of a forward pass:
    batch_size questions (each with all its answers), or batch_size documents.
    """

    def __init__(
        self,
        pretrained: str | Path,
        adapter: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size must be a positive integer, not {batch_size!r} (litllm has no 'auto')")
        checkpoint_dir = check_checkpoint_dir(pretrained)
        self._device = parse_device(device)
        self.model: GPT = load_model(checkpoint_dir, dtype=inference_dtype(dtype, self._device), device=self._device)
        if adapter is not None:
            load_adapter(self.model, Path(adapter), base_checkpoint=checkpoint_dir)
        fuse_projections(self.model)
        inference_linears(self.model)
        weights_on_huge_pages(self.model)
        self.decode_step = OneTokenStep(self.model)  # generate_until's
        self.tokenizer = Tokenizer(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        self.adapter = adapter
        self.batch_size = int(batch_size)
        self._max_length = max_length or self.model.config.max_seq_len

    # ------------------------------------------------------------------------------ what lm-eval asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM.prefix_token_id: the token an empty context (and each rolling window) is conditioned on
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        # HFLM: the config's max_position_embeddings
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # HFLM's default for tasks that name none

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM.tok_encode: the tokenizer's own special tokens unless told otherwise, and none when the text
        already starts with the prefix token's text (a chat-templated prompt that writes its own BOS)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM.apply_chat_template: the checkpoint's template; without a generation prompt the last message is
        continued (transformers' continue_final_message), and a template that rejects system messages is
        rendered without them."""
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except UserError:
            return self._render_chat([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render_chat(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            return rendered
        # transformers' continue_final_message: cut the text after the final message, keeping its own spacing
        final = chat_history[-1]["content"]
        start = rendered.rindex(final.strip())
        if rendered[start:start + len(final.lstrip())] == final:
            return rendered[:start + len(final.lstrip())]
        return rendered[:start + len(final.strip())]

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.embed_tokens.weight.dtype),
            "adapter": str(self.adapter) if self.adapter else None,
        }

    # ------------------------------------------------------------------------------------------ scoring

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in HFLM's windows: the first conditioned on the prefix token, each
        later one on as much preceding text as fits (lm_eval.utils.get_rolling_token_windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(string),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is the continuation the greedy one) per (key, context, continuation).

        The model input is HFLM's: (context + continuation)[-(max_length + 1):][:-1], i.e. too long a request
        loses tokens on the left. Requests are grouped by what precedes their continuation in that input.
        """
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            tokens = (context + continuation)[-(self.max_length + 1):]
            by_context.setdefault(tuple(tokens[:len(tokens) - len(continuation)]), []).append((index, tokens))
        groups = []
        for context, members in by_context.items():
            members.sort(key=lambda member: -len(member[1]))  # the first is the longest
            group = []
            for index, tokens in members:
                shared = _common_prefix_len(members[0][1][:-1], tokens[:-1])
                # a request joins its group's row only if it shares at least a third of its input with the first:
                # an answer that shares only the context adds its own tokens to the row, so the row grows with
                # the group; a rolling window shares one token with the other documents of its context and runs
                # in a row of its own
                if 3 * shared >= len(tokens) - 1:
                    group.append(_Request(index, tokens, len(context), shared))
                else:
                    groups.append([_Request(index, tokens, len(context), len(tokens) - 1)])
            groups.append(group)
        # longest row first, as lm-eval sorts: a too-large batch fails at once, and the rows of a pass have about
        # one length, so little of it is padding
        groups.sort(key=lambda group: (-_row_len(group), group[0].tokens))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for index, result in self._score_groups(groups):
            results[index] = result
            if requests[index][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
            progress.update(1)
        progress.close()
        return results

    def _score_groups(self, groups: list[list[_Request]]) -> Iterator[tuple[int, tuple[float, bool]]]:
        """(request index, its score) for each request of `groups`, batch_size groups a pass.

        A group is one row of a pass: its first (longest) request's input, then, for every other request, the
        tokens past the prefix it shares with the first (a branch), at their own positions. A branch token attends
        to the first's tokens before the fork and to its own branch up to itself, so every request's tokens see
        exactly its own input, as if it ran alone. A request's log-probs up to the fork are read at the first's
        positions, and each (position, target) is scored once. Rows are right-padded; a real token never attends
        to a pad, and pads are never scored. (The numbers can still move in the last float32 bit with the pass's
        shape, as matmul kernels pick their blocking by size.)
        """
        device = self.device
        for first in range(0, len(groups), self.batch_size):
            batch = groups[first:first + self.batch_size]
            rows = [_branched_row(group) for group in batch]
            input_ids = _right_padded([row.ids for row in rows], device)
            if any(row.branched for row in rows):
                position_ids = _right_padded([row.positions for row in rows], device)
                branches = _right_padded([row.branches for row in rows], device, pad=-1)
                forks = _right_padded([row.forks for row in rows], device).unsqueeze(2)  # (B, T, 1)
                # token i sees token j before or at its position on its own branch, or on the trunk before its fork
                same_branch, trunk = branches.unsqueeze(2) == branches.unsqueeze(1), branches.unsqueeze(1) == 0
                attention_mask = (position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)) & (
                    same_branch | trunk & (position_ids.unsqueeze(1) < forks))  # (B, T, T)
                hidden = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    return_hidden=True)
            else:  # every row is one request: a plain causal pass
                hidden = self.model(input_ids, return_hidden=True)  # (batch, longest, hidden_size)
            columns: dict[tuple[int, int, int], int] = {}  # (row, index in the row, target) -> its column in `scored`
            picks = {request.index: [columns.setdefault((r, rows[r].where[request.index][position],
                                                         request.tokens[position + 1]), len(columns))
                                     for position in range(request.context_len - 1, len(request.tokens) - 1)]
                     for r, group in enumerate(batch) for request in group}
            row_numbers, indices, targets = zip(*columns)
            scored = self._token_logprobs(hidden[row_numbers, indices], targets)  # (2, len(columns))
            for index, picked in picks.items():
                logprobs, greedy = scored[:, picked]
                # summed in float32, as HFLM sums its float32 log-probs (over hundreds of tokens the rounding of
                # the sum alone reaches 1e-4)
                yield index, (float(logprobs.sum()), bool(greedy.all()))

    def _token_logprobs(self, hidden: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """For hidden states (N, hidden_size) and N target ids, a (2, N) float32 tensor (float64 for a float64 model):
        log p of each target, and 1 where it is the argmax. Log-softmax in float32 over the full vocabulary, as HFLM;
        256 positions at a time, so that no pass holds all its logits at once (49k-word logits of 1024 positions:
        200 MB, and as much again for their log-softmax)."""
        logprobs, greedy = token_logprobs(self.model.lm_head, hidden, torch.tensor(targets, device=hidden.device),
                                          chunk_size=256)
        return torch.stack([logprobs, greedy.to(logprobs.dtype)]).cpu()

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each request (greedy unless the task samples) until a stop string of the task, the EOS text
        (lm-eval adds it to `until`), a stop token of the checkpoint, or `max_gen_toks` new tokens."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos_text = self.tokenizer.decode([self.eot_token_id])
        outputs = []
        for context, gen_kwargs in tqdm([req.args for req in requests], disable=disable_tqdm,
                                        desc="Running generate_until requests"):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            unknown = sorted(set(kwargs) - _GENERATION_KEYS)
            if unknown:
                raise UserError(f"generation_kwargs {unknown} are not supported by litllm "
                                f"(supported: {', '.join(sorted(_GENERATION_KEYS))})")
            until = handle_stop_sequences(kwargs["until"], eos=eos_text)
            max_gen_toks = kwargs["max_gen_toks"]
            # HFLM: the context is cut on the left to leave room for max_gen_toks new tokens
            prompt_ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
            sampling = kwargs["do_sample"]
            tokens = generate_tokens(self.model, prompt_ids, max_gen_toks,
                                     temperature=kwargs["temperature"] if sampling else 0.0,
                                     top_k=kwargs.get("top_k") if sampling else None,
                                     top_p=kwargs.get("top_p", 1.0) if sampling else 1.0,
                                     stop_ids=self.tokenizer.stop_ids, decode_step=self.decode_step)
            text = "".join(stream_text(self.tokenizer, tokens, until))
            tokens.close()  # a stop string can end the text before the token stream ends: free the KV cache now
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs


@dataclass
class _Request:
    """One loglikelihood request: the model reads tokens[:-1] and is scored on tokens[context_len:]. The first
    `shared` tokens of tokens[:-1] are its group's first request's too (for the first: all of them)."""
    index: int
    tokens: list[int]
    context_len: int
    shared: int


@dataclass
class _BranchedRow:
    """A group's requests in one row: ids at their positions, the branch of each (0: the first request's input,
    the trunk) and where that branch forks from the trunk, and per request index the row index of each of its
    input positions."""
    ids: list[int]
    positions: list[int]
    branches: list[int]
    forks: list[int]
    where: dict[int, list[int]]

    @property
    def branched(self) -> bool:
        return max(self.branches) > 0


def _branched_row(group: list[_Request]) -> _BranchedRow:
    trunk = group[0].tokens[:-1]
    row = _BranchedRow(list(trunk), list(range(len(trunk))), [0] * len(trunk), [0] * len(trunk), {})
    for branch, request in enumerate(group):  # the first adds no tokens: it is the trunk
        rest = request.tokens[request.shared:-1]
        start = len(row.ids)
        row.ids += rest
        row.positions += range(request.shared, request.shared + len(rest))
        row.branches += [branch] * len(rest)
        row.forks += [request.shared] * len(rest)
        row.where[request.index] = list(range(request.shared)) + list(range(start, start + len(rest)))
    return row


def _row_len(group: list[_Request]) -> int:
    """The length of a group's row: the first's input, and what every other request adds past its fork."""
    return sum(len(request.tokens) - 1 - request.shared for request in group) + len(group[0].tokens) - 1


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _right_padded(rows: list[list[int]], device: torch.device, pad: int = 0) -> torch.Tensor:
    """(len(rows), longest row), padded with `pad` on the right: pads are never attended to nor scored."""
    width = max(map(len, rows))
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)


# ---------------------------------------------------------------------------------------------- CLI


def main(
    checkpoint_dir: Path,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: Path | None = None,
    apply_chat_template: bool = False,
    adapter: Path | None = None,
    out_dir: Path = Path("out/evaluate"),
    log_samples: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    seed: int = 1234,
) -> dict:
    """Evaluate a checkpoint with lm-evaluation-harness tasks; print the results table and save lm-eval's JSON.

    Args:
        checkpoint_dir: a Hugging Face model directory.
        tasks: comma-separated lm-eval task or group names (`hellaswag,arc_easy`; `lm-eval ls tasks` lists them),
            or task YAML files.
        num_fewshot: examples in each prompt (default: the task's own number, else 0).
        limit: evaluate only the first N documents of each task (a fraction below 1: that share of them).
        batch_size: sequences per forward pass. It changes speed, not the numbers.
        include_path: a folder of your own lm-eval task YAMLs. A relative `data_files` path in them is read
            relative to this folder.
        apply_chat_template: render prompts with the checkpoint's chat template (for instruct models).
        adapter: a LoRA adapter directory (PEFT format) to evaluate on top of the checkpoint (not merged).
        out_dir: results_<date>.json (and samples_<task>_<date>.jsonl with --log_samples) are written here.
        log_samples: also save every document's prompt, model answers and scores.
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on GPU).
        device: cpu or cuda (default: cuda when available).
        seed: seed of python, numpy, torch and the few-shot sampler.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    checkpoint_dir = check_checkpoint_dir(checkpoint_dir).resolve()
    if not tasks:
        raise UserError("name the tasks to run: --tasks arc_easy,hellaswag (`lm-eval ls tasks` lists them)")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include_path {include_path}: no such folder of task YAMLs")
        include_path = Path(include_path).resolve()
    # absolute, as tasks load from inside include_path (see _working_dir)
    out_dir = Path(out_dir).resolve()
    task_names = [Path(t).resolve().as_posix() if Path(t).is_file() else t for t in tasks.split(",") if t.strip()]
    model_args = {"pretrained": str(checkpoint_dir), "dtype": dtype, "device": device,
                  "adapter": str(Path(adapter).resolve()) if adapter else None}
    model_args = {key: value for key, value in model_args.items() if value is not None}
    # lm-eval's own ~15,000 tasks take seconds to index: only when --include_path does not hold every task asked for
    task_manager = include_path and TaskManager(include_path=str(include_path), include_defaults=False,
                                                metadata=model_args)
    if not task_manager or not all(t in task_manager.all_tasks for t in task_names):
        task_manager = TaskManager(include_path=str(include_path) if include_path else None, metadata=model_args)
    unknown = [t for t in task_names if t not in task_manager.all_tasks and not Path(t).is_file()]
    if unknown:
        listing = f"lm-eval ls tasks --include_path {include_path}" if include_path else "lm-eval ls tasks"
        raise UserError(f"unknown task(s) {', '.join(unknown)}: list the tasks with `{listing}`"
                        + ("" if include_path else " (and give your own task YAMLs with --include_path DIR)"))
    if parse_device(device).type == "cpu":  # each batch's logits are large new tensors: reuse the memory freed
        keep_freed_memory()
    tracker = EvaluationTracker(output_path=str(out_dir / "results.json"))
    with _working_dir(include_path):
        results = simple_evaluate(
            model="litllm", model_args=model_args, tasks=task_names, num_fewshot=num_fewshot, limit=limit,
            batch_size=batch_size, log_samples=log_samples, evaluation_tracker=tracker,
            apply_chat_template=apply_chat_template, task_manager=task_manager, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    written = sorted(out_dir.glob(f"*{tracker.date_id}*"))
    if not any(path.name.startswith("results_") for path in written):
        raise UserError(f"could not write the results under {out_dir}; is the folder writable?")
    print(f"Saved {', '.join(str(path) for path in written)}")
    return results


@contextmanager
def _working_dir(folder: Path | None) -> Iterator[None]:
    """Run inside `folder`, if given: lm-eval hands a task's relative `data_files` to `datasets` unchanged, which
    reads it relative to the working directory, so this makes them relative to the task folder."""
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


if __name__ == "__main__":
    from litllm.cli import run

    run(main)
