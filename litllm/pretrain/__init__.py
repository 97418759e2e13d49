"""Pretraining: pretrain.py (from scratch with a named config, or continued from a checkpoint, optionally LoRA)."""
