#!/usr/bin/env bash
# The CUDA-only checks in one run, for a session that is lent a GPU machine (device tool). Prints a short summary.
#   bash benchmarks/gpu_checks.sh            (from the repository root, torch with CUDA and the project installed)
# Covers: FSDPStrategy (v1) tests, compiled FlexAttention ALiBi vs eager, GPU training throughput and MFU
# (GPT-2-124M shape, eager and compiled, ALiBi vs RoPE), the planner's estimated step time against the measured one
# (same shape), the Perplexity metric on CUDA, HarnessLM against lm-evaluation-harness's HFLM on CUDA, and the
# static / compiled decode step (its tests and rollout.py against transformers' generate) on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
status() { echo "| $1 | $2 |"; }
python -m pytest -q -p no:cacheprovider tests/parallel/test_distributed.py -k fsdp -m "cuda" > /tmp/gpu_fsdp.log 2>&1; fsdp=$?
python -m pytest -q -p no:cacheprovider tests/nn/test_attention.py -m slow > /tmp/gpu_flex.log 2>&1; flex=$?
python benchmarks/train_throughput.py --device cuda --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50304 \
    --seq-len 1024 --batch-size 16 --rounds 5 > /tmp/gpu_tput.log 2>&1
python benchmarks/train_throughput.py --device cuda --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50304 \
    --seq-len 1024 --batch-size 16 --rounds 5 --compile --models ours-rope,ours-alibi > /tmp/gpu_tput_compile.log 2>&1
python benchmarks/metrics.py --device cuda --skip-lambada > /tmp/gpu_metrics.log 2>&1
python -m lightning_llm plan --model model/gpt2_124m --vocab_size 50304 --world_size 1 --hardware h200_nvlink \
    --micro_batch_size 16 --global_batch_size 16 --seq_len 1024 --precision bf16-mixed --activation_checkpointing false \
    --json /tmp/gpu_plan.json > /tmp/gpu_plan.log 2>&1
timeout 300 python benchmarks/harness.py --device cuda --n 500 > /tmp/gpu_harness.log 2>&1
timeout 300 python benchmarks/rollout.py --device cuda > /tmp/gpu_rollout.log 2>&1
python -m pytest -q -p no:cacheprovider tests/nn/test_static_decoding.py -m "slow or not slow" > /tmp/gpu_decode.log 2>&1; decode=$?
echo "| check | result |"
echo "|---|---|"
status "FSDPStrategy tests" "$( [ $fsdp -eq 0 ] && echo pass || echo "FAIL (rc $fsdp, /tmp/gpu_fsdp.log)")"
status "compiled Flex ALiBi vs eager" "$( [ $flex -eq 0 ] && echo pass || echo "FAIL (rc $flex, /tmp/gpu_flex.log)")"
status "static / compiled decode step tests" "$( [ $decode -eq 0 ] && echo pass || echo "FAIL (rc $decode, /tmp/gpu_decode.log)")"
echo; echo "training throughput (eager):"; grep "^|" /tmp/gpu_tput.log
echo; echo "training throughput (torch.compile):"; grep "^|" /tmp/gpu_tput_compile.log
echo; echo "Perplexity metric on CUDA:"; tail -6 /tmp/gpu_metrics.log
echo; echo "planner estimate vs measured step time (GPT-2-124M shape, b=16, s=1024, one device):"
python - <<'PY'
import json, re
plan = json.load(open("/tmp/gpu_plan.json"))
row = next(r for r in plan["rows"] if r["strategy"] == "DDP" and not r["activation_checkpointing"])
est_tps = row["tokens_per_s"]
for name, log in (("eager", "/tmp/gpu_tput.log"), ("compiled", "/tmp/gpu_tput_compile.log")):
    for line in open(log):
        if line.startswith("| ours-rope"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            nums = [float(c.replace(",", "")) for c in cells[1:3] if re.fullmatch(r"[0-9.,]+", c)]
            if len(nums) == 2:
                print(f"| {name} | measured {nums[0]:.1f} ms/step, {nums[1]:.0f} tok/s | planner {row['step_s'] * 1e3:.1f} ms,"
                      f" {est_tps:.0f} tok/s | measured/planned tok/s {nums[1] / est_tps:.2f} |")
PY
echo; echo "HarnessLM vs HFLM on CUDA:"; grep "^|" /tmp/gpu_harness.log || tail -5 /tmp/gpu_harness.log
echo; echo "compiled decode step vs transformers generate on CUDA:"; grep "^|" /tmp/gpu_rollout.log || tail -5 /tmp/gpu_rollout.log
