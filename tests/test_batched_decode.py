"""Several sequences decoded together in one KV cache, each at its own position, equal each decoded alone."""
import pytest
import torch

from hf_models import save_tiny_hf_model
from litllm.checkpoint import load_model
from litllm.decode import generate_tokens

NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["llama", "mistral-sliding", "qwen3"])
def model(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    save_tiny_hf_model(request.param, out_dir)
    return load_model(out_dir)


def alone(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of batch-1 `generate_tokens`, and the full forward's logits (NEW_TOKENS, vocab) behind them."""
    tokens = list(generate_tokens(model, prompt, NEW_TOKENS))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0]
    return tokens, logits[len(prompt) - 1:-1]


@torch.no_grad()
def test_rows_decoded_together_equal_each_sequence_alone(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 6, 4)]
    model.setup_kv_cache(batch_size=4, max_seq_len=32)
    logits_of = {i: [] for i in range(len(prompts))}
    next_token = torch.zeros(4, dtype=torch.long)  # (rows,) the token each row feeds next
    position = torch.zeros(4, dtype=torch.long)  # (rows,) where that token goes

    def prefill(i: int, row: int) -> None:
        prompt = torch.tensor([prompts[i]])
        logits = model(prompt, torch.arange(prompt.size(1))[None], cache_rows=slice(row, row + 1))
        record(i, row, logits[0, -1], prompt.size(1))

    def record(i: int, row: int, logits: torch.Tensor, next_position: int) -> None:
        logits_of[i].append(logits)
        next_token[row], position[row] = logits.argmax(), next_position

    row_of = {0: 0, 1: 1, 2: 2}  # prompt -> cache row
    for i, row in row_of.items():
        prefill(i, row)
    # row 3 is idle and holds a stale token far ahead of the others: it must not disturb them
    next_token[3], position[3] = 5, 20
    while any(len(logits_of[i]) < NEW_TOKENS for i in row_of):
        logits = model(next_token[:, None], position[:, None])[:, -1]  # (rows, vocab), every row at its own position
        for i, row in row_of.items():
            if len(logits_of[i]) < NEW_TOKENS:
                record(i, row, logits[row], int(position[row]) + 1)
        if len(logits_of[0]) == 4 and 0 in row_of:
            # sequence 0 leaves after 4 tokens; sequence 3, shorter than what row 0 cached, joins mid-flight
            del row_of[0]
            row_of[3] = 0
            prefill(3, 0)
    model.clear_kv_cache()

    for i, prompt in enumerate(prompts):
        tokens, expected = alone(model, prompt)
        got = torch.stack(logits_of[i])
        assert got.argmax(-1).tolist() == tokens[:len(got)]
        torch.testing.assert_close(got, expected[:len(got)], atol=1e-5, rtol=0)
    assert [len(logits_of[i]) for i in range(4)] == [4, NEW_TOKENS, NEW_TOKENS, NEW_TOKENS]
