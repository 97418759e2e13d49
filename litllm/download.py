"""Download a model from the Hugging Face hub: only the files litllm reads."""
from __future__ import annotations

from pathlib import Path

from litllm.errors import UserError
from litllm.tokenizer import TOKENIZER_FILES

# weights as safetensors only (never pickles), plus config, tokenizer and generation settings
ALLOW_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", *TOKENIZER_FILES]


def download(
    repo_id: str,
    out_dir: Path | None = None,
    revision: str | None = None,
    access_token: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Fetch a model repository from the Hugging Face hub into checkpoints/REPO_ID, with progress bars.

    Args:
        repo_id: the hub repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        out_dir: where to put it (default: checkpoints/REPO_ID).
        revision: a branch, tag or commit of the repository.
        access_token: a hub token for gated models (default: the HF_TOKEN environment variable).
        overwrite: download again into an out_dir that already holds a checkpoint.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:  # the hub's own rules for names, checked before anything is fetched
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"'{repo_id}' is not a hub repository name (expected NAMESPACE/NAME, e.g. "
                        f"HuggingFaceTB/SmolLM2-135M-Instruct): {str(error).split('.')[0]}") from None
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints") / repo_id
    if (out_dir / "config.json").is_file() and not overwrite:
        print(f"{out_dir} already holds a checkpoint; keeping it (pass --overwrite true to download again)")
        return out_dir
    try:
        snapshot_download(repo_id, local_dir=out_dir, revision=revision, token=access_token,
                          allow_patterns=ALLOW_PATTERNS)
    except (HfHubHTTPError, OSError) as e:  # offline, unknown repo, gated without a token
        reason = str(e).strip().splitlines()[0]
        raise UserError(
            f"could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {reason}); "
            "check the name and your network or HF_TOKEN, or import a local GGUF with "
            "`litllm convert from_gguf FILE.gguf --out_dir DIR`"
        ) from None
    print(f"Saved {repo_id} to {out_dir}")
    return out_dir
