#!/usr/bin/env bash
# What a session lent a GPU runs, in order of worth, as one command: the fine-tuning benchmarks eager and compiled
# (--train.compile) against transformers(+PEFT), litllm's CUDA-only test, LoRA and QLoRA fine-tuning and chat as a
# user runs them, then the decoding benchmarks; on random-weight models of SmolLM2-135M's and SmolLM2-1.7B's shapes
# (benchmarks/random_checkpoint.py: trained weights give the same speed). ~12 minutes on an H200, more than the
# device tool's 10 a command: each step has its own time limit, and one cut short at the end costs the least.
#
#     bash benchmarks/gpu_session.sh LIKE_DIR
#
# LIKE_DIR: a SmolLM2 checkpoint dir (its config and tokenizer are used, not its weights). Everything goes to stdout;
# results are for benchmarks/RESULTS.md by hand (the runs here use --no_append). Needs litllm importable (pip install
# -e . or PYTHONPATH) and transformers, peft, bitsandbytes.
set -u
like=${1:?usage: bash benchmarks/gpu_session.sh LIKE_DIR}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
stamp checkpoints
python3 benchmarks/random_checkpoint.py --like "$like" --out "$work/m135" 2>&1 | grep -v Writing
python3 benchmarks/random_checkpoint.py --like "$like" --out "$work/m1700" --shape smollm2-1.7b 2>&1 | grep -v Writing
stamp "fine-tuning, 135M shape, eager and compiled (--train.compile): host-bound here"
timeout 240 python3 benchmarks/finetune_lora.py --checkpoint_dir "$work/m135" --accelerator cuda --modes lora,full \
  --precisions bf16-true --lora_dropouts 0.05 --batch_size 8 --seq_len 1024 --warmup 3 --steps 10 --compile \
  --no_append 2>&1 | grep -v "step [0-9]*:\|Loading"
stamp "fine-tuning, 1.7B shape, eager and compiled"
timeout 200 python3 benchmarks/finetune_lora.py --checkpoint_dir "$work/m1700" --accelerator cuda --modes lora \
  --precisions bf16-true --lora_dropouts 0.05 --batch_size 8 --seq_len 1024 --warmup 3 --steps 6 --compile \
  --no_append 2>&1 | grep -v "step [0-9]*:\|Loading"
stamp CUDA tests
timeout 120 python3 -m pytest -q -n 4 tests/test_quantize.py 2>&1 | tail -2
for config in lora qlora; do
  stamp "finetune $config"
  timeout 120 python3 -m litllm finetune lora --config "config_hub/finetune/smollm2-135m/$config.yaml" "$work/m135" \
    --precision bf16-true --train.max_steps 6 --train.eval_interval 3 --train.save_interval 3 \
    --out_dir "$work/out-$config" 2>&1 | grep -v "it/s\]" | tail -9
done
stamp chat
echo "Give three tips for staying healthy." \
  | timeout 60 python3 -m litllm chat "$work/m135" --adapter "$work/out-lora/final" --max_new_tokens 16 2>&1 | tail -2
stamp "decoding, 135M shape"
timeout 150 python3 benchmarks/decode.py --checkpoint_dir "$work/m135" --device cuda --dtypes bfloat16 --repeats 2 \
  --no_append 2>&1 | grep -v Loading
stamp "decoding, 1.7B shape"
timeout 120 python3 benchmarks/decode.py --checkpoint_dir "$work/m1700" --device cuda --dtypes bfloat16 --repeats 2 \
  --no_append 2>&1 | grep -v Loading
stamp done
rm -rf "$work"
