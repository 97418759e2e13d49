"""Training data, every kind behind one contract (base.py): fine-tuning formats (Alpaca, JSON/JSONL, chat
messages) tokenized with loss masks, packing, preference pairs for DPO, completions labelled good or bad for KTO,
prompts for online RL, and pretraining text tokenized into windows."""
from litllm.data.base import DataModule, TrainingDataset
from litllm.data.corpus import TextCorpus, TokenWindows
from litllm.data.jsonl import read_rows
from litllm.data.kto import Unpaired, UnpairedDataset
from litllm.data.preference import Preference, PreferenceDataset
from litllm.data.prompts import PromptDataset, Prompts
from litllm.data.sft import IGNORE_INDEX, JSON, SFTData, SFTDataset, Alpaca, Chat, alpaca_prompt, collate, pack

__all__ = ["DataModule", "TrainingDataset", "IGNORE_INDEX", "JSON", "SFTData", "SFTDataset", "Alpaca", "Chat",
           "alpaca_prompt", "collate", "pack", "read_rows", "Preference", "PreferenceDataset", "Unpaired",
           "UnpairedDataset", "Prompts", "PromptDataset", "TextCorpus", "TokenWindows"]
