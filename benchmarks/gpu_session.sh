#!/usr/bin/env bash
# GPU checks and benchmarks, run on a lent H100 by the device tool (no network there: wheels are carried
# in .whl/ and .bnb/, the SmolLM2 config and tokenizer in .gpu/smollm2, data rows in .gpu/*.jsonl.gz;
# weights are random because 135M fp32 weights exceed what can be carried; speed and memory do not
# depend on the weights' values). Part A: CUDA tests + SmolLM2-135M vs TRL. Part B: UltraFeedback,
# memory table, a 1.1B model, FSDP with one process, QLoRA.
set -uo pipefail
part=${1:-A}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ "$part" = B ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .bnb/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ORPO_CACHE=/tmp/orpo-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 benchmarks/make_random_model.py .gpu/smollm2 /tmp/smol
B="python3 benchmarks/bench_trl.py --model /tmp/smol"
if [ "$part" = A ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_forward.py -k cuda 2>&1 | grep -E "passed|failed|error" | tail -3 | tee "$OUT/A_tests.txt"
  $B --data .gpu/hh64.jsonl.gz --rows 64 --max-length 1024 --tools ours,ours-blocks,ours-liger,trl,trl-liger,dense --json "$OUT/A_hh_full.json" 2>&1 | tee "$OUT/A_hh_full.txt"
  $B --data .gpu/hh64.jsonl.gz --rows 64 --max-length 1024 --lora --tools ours,trl,dense --json "$OUT/A_hh_lora.json" 2>&1 | tee "$OUT/A_hh_lora.txt"
else
  { accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m orpo train --model /tmp/smol \
      --data .gpu/hh64.jsonl.gz --max-steps 6 --save-steps 3 --output-dir /tmp/fsdp --batch-size 4 --eval-samples 0 \
    && accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m orpo train --model /tmp/smol \
      --data .gpu/hh64.jsonl.gz --max-steps 8 --save-steps 3 --output-dir /tmp/fsdp --batch-size 4 --eval-samples 0 --resume \
    && ls /tmp/fsdp/checkpoints /tmp/fsdp/model && cut -c1-120 /tmp/fsdp/metrics.jsonl; } 2>&1 | grep -v "Warn\|warn" | tail -25 | tee "$OUT/B_fsdp.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_train.py -k qlora 2>&1 | grep -E "passed|failed|error|Error" | tail -5 | tee "$OUT/B_qlora.txt"
  python3 benchmarks/make_random_model.py .gpu/smollm2 /tmp/llama1b --size 1b
  python3 benchmarks/bench_trl.py --model /tmp/llama1b --data .gpu/hh64.jsonl.gz --rows 32 --max-length 1024 --tools ours,trl --json "$OUT/B_1b.json" 2>&1 | tee "$OUT/B_1b.txt"
  $B --data .gpu/uf32.jsonl.gz --rows 32 --max-length 1024 --tools ours,trl --json "$OUT/B_uf.json" 2>&1 | tee "$OUT/B_uf.txt"
  $B --memory-table --json "$OUT/B_mem.json" 2>&1 | tee "$OUT/B_mem.txt"
fi
