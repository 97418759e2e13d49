"""litllm: a hackable toolkit to pretrain, fine-tune, evaluate, export and serve LLMs."""

__all__ = ["LLM", "RewardModel"]


def __getattr__(name: str):
    # imported on first use, so `litllm --help` and submodule imports stay fast
    if name == "LLM":
        from litllm.api import LLM

        return LLM
    if name == "RewardModel":
        from litllm.reward import RewardModel

        return RewardModel
    raise AttributeError(f"module 'litllm' has no attribute '{name}'")
