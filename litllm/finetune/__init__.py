"""Fine-tuning scripts: full.py (every weight), lora.py (LoRA/DoRA, QLoRA with --quantize), dpo.py (preference pairs)."""
