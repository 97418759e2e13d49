"""Training data: fine-tuning formats (Alpaca, JSON/JSONL, chat messages), tokenized with loss masks, and packing."""
from litllm.data.jsonl import read_rows
from litllm.data.sft import IGNORE_INDEX, JSON, SFTData, SFTDataset, Alpaca, Chat, alpaca_prompt, collate, pack

__all__ = ["IGNORE_INDEX", "JSON", "SFTData", "SFTDataset", "Alpaca", "Chat", "alpaca_prompt", "collate", "pack",
           "read_rows"]
