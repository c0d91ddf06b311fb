#!/usr/bin/env bash
# GPU checks and benchmarks, run on a lent H100 by the device tool (no network there: wheels are carried
# in .whl/ and .bnb/, the SmolLM2 config and tokenizer in .gpu/smollm2, data rows in .gpu/*.jsonl.gz;
# weights are random because 135M fp32 weights exceed what can be carried; speed and memory do not
# depend on the weights' values). Part A: CUDA tests + SmolLM2-135M vs TRL. Part B: UltraFeedback,
# memory table, a 1.1B model, FSDP with one process, QLoRA. Part C: QLoRA on SmolLM2's shape (train, resume,
# eval, merge). Part D: DeepSpeed ZeRO-2 (full) and ZeRO-3 (LoRA) with one process, each saved, resumed and
# compared step by step with a plain single-GPU run (DeepSpeed built there from its sdist, carried in .ds/).
# Part E: --lean-activations on CUDA (its tests, then orpo with and without it on HH-RLHF).
set -uo pipefail
part=${1:-A}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[[ "$part" = B || "$part" = C ]] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .bnb/*.whl
if [ "$part" = D ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .ds/*.whl
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .ds/deepspeed-*.tar.gz
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ORPO_CACHE=/tmp/orpo-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 benchmarks/make_random_model.py .gpu/smollm2 /tmp/smol
B="python3 benchmarks/bench_trl.py --model /tmp/smol"
if [ "$part" = A ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_forward.py -k cuda 2>&1 | grep -E "passed|failed|error" | tail -3 | tee "$OUT/A_tests.txt"
  $B --data .gpu/hh64.jsonl.gz --rows 64 --max-length 1024 --tools ours,ours-blocks,ours-liger,trl,trl-liger,dense --json "$OUT/A_hh_full.json" 2>&1 | tee "$OUT/A_hh_full.txt"
  $B --data .gpu/hh64.jsonl.gz --rows 64 --max-length 1024 --lora --tools ours,trl,dense --json "$OUT/A_hh_lora.json" 2>&1 | tee "$OUT/A_hh_lora.txt"
elif [ "$part" = E ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_forward.py -k "cuda or lean" 2>&1 | grep -E "passed|failed|error" | tail -3 | tee "$OUT/E_tests.txt"
  $B --data .gpu/hh64.jsonl.gz --rows 64 --max-length 1024 --tools ours,ours-nolean,ours,ours-nolean --json "$OUT/E_lean.json" 2>&1 | tee "$OUT/E_lean.txt"
elif [ "$part" = C ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_train.py -k qlora 2>&1 | grep -E "passed|failed|error|Error" | tail -5 | tee "$OUT/C_qlora_test.txt"
  T="python3 -m orpo train --model /tmp/smol --data .gpu/hh64.jsonl.gz --output-dir /tmp/q --load-in-4bit --lora --lr 1e-4 --max-length 1024 --batch-size 4 --save-steps 4 --eval-samples 0 --logging-steps 1"
  { $T --max-steps 8 && $T --max-steps 12 --resume && ls /tmp/q /tmp/q/model && cut -c1-150 /tmp/q/metrics.jsonl \
    && python3 -m orpo eval --model /tmp/q/model --data .gpu/uf32.jsonl.gz --eval-max-rows 16 | tail -1 \
    && python3 -m orpo export /tmp/q --merge --output-dir /tmp/q_merged && ls -la /tmp/q_merged \
    && python3 -c "import torch,transformers as t;m=t.AutoModelForCausalLM.from_pretrained('/tmp/q_merged');x=torch.tensor([[1,2,3,4]]);print('merged logits finite', bool(m(x).logits.isfinite().all()), 'quantized', getattr(m,'is_quantized',False))"
  } 2>&1 | grep -v "Warn\|warn" | tail -40 | tee "$OUT/C_qlora_run.txt"
  nvidia-smi --query-gpu=name,memory.used --format=csv | tee -a "$OUT/C_qlora_run.txt"
elif [ "$part" = D ]; then
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee "$OUT/D_deepspeed.txt"
  # flags alone start from the default job (LoRA, max length 256): name what differs from it
  A="--data .gpu/hh64.jsonl.gz --precision bf16 --batch-size 2 --grad-accum 2 --eval-samples 0 --logging-steps 1 --lr 1e-5 --seed 7 --max-length 1024"
  for z in ${ZSTAGES:-2 3}; do
    extra="--no-lora"; [ $z = 3 ] && extra="--lora --lr 1e-4"
    L="accelerate launch --config_file configs/accelerate/deepspeed-zero$z.yaml --num_processes 1 -m orpo train --model /tmp/smol $A $extra --output-dir /tmp/z$z"
    { echo "== ZeRO-$z $extra"; $L --max-steps 4 --save-steps 2 && $L --max-steps 6 --save-steps 2 --resume && ls /tmp/z$z /tmp/z$z/checkpoints /tmp/z$z/model \
      && python3 -m orpo train --model /tmp/smol $A $extra --max-steps 6 --save-steps 0 --output-dir /tmp/p$z \
      && python3 - /tmp/z$z /tmp/p$z <<'PY'
import json, sys
rows = [[json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"loss"' in l] for d in sys.argv[1:]]
for a, b in zip(*rows):
    print(f"step {a['step']}: deepspeed loss {a['loss']:.5f} plain {b['loss']:.5f}  grad_norm {a['grad_norm']:.4f} {b['grad_norm']:.4f}")
PY
    } 2>&1 | grep -v "Warn\|warn\|\[INFO\|\[WARNING" | tail -40 | tee -a "$OUT/D_deepspeed.txt"
  done
else
  { accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m orpo train --model /tmp/smol \
      --data .gpu/hh64.jsonl.gz --max-steps 6 --save-steps 3 --output-dir /tmp/fsdp --batch-size 4 --eval-samples 0 \
      --no-lora --lr 5e-6 --max-length 1024 \
    && accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m orpo train --model /tmp/smol \
      --data .gpu/hh64.jsonl.gz --max-steps 8 --save-steps 3 --output-dir /tmp/fsdp --batch-size 4 --eval-samples 0 --resume \
      --no-lora --lr 5e-6 --max-length 1024 \
    && ls /tmp/fsdp/checkpoints /tmp/fsdp/model && cut -c1-120 /tmp/fsdp/metrics.jsonl; } 2>&1 | grep -v "Warn\|warn" | tail -25 | tee "$OUT/B_fsdp.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_train.py -k qlora 2>&1 | grep -E "passed|failed|error|Error" | tail -5 | tee "$OUT/B_qlora.txt"
  python3 benchmarks/make_random_model.py .gpu/smollm2 /tmp/llama1b --size 1b
  python3 benchmarks/bench_trl.py --model /tmp/llama1b --data .gpu/hh64.jsonl.gz --rows 32 --max-length 1024 --tools ours,trl --json "$OUT/B_1b.json" 2>&1 | tee "$OUT/B_1b.txt"
  $B --data .gpu/uf32.jsonl.gz --rows 32 --max-length 1024 --tools ours,trl --json "$OUT/B_uf.json" 2>&1 | tee "$OUT/B_uf.txt"
  $B --memory-table --json "$OUT/B_mem.json" 2>&1 | tee "$OUT/B_mem.txt"
fi
