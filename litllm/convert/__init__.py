"""`litllm convert`: checkpoints between formats, one module per command.

from_gguf.py: a llama.cpp GGUF file -> a Hugging Face model dir (what litllm and transformers load).
to_gguf.py: a model dir, or a LoRA adapter merged first -> one GGUF file (f16, bf16, q8_0).
merge_lora.py: a LoRA adapter folded into its base -> a full Hugging Face model dir.
gguf_pre_tokenizers.py: the pre-tokenizer names llama.cpp knows, each rebuilt with `tokenizers` (used both ways).
"""
