#!/usr/bin/env bash
# The CUDA-only checks in one run, for a session that is lent a GPU machine (device tool). Prints a short summary.
#   bash benchmarks/gpu_checks.sh            (from the repository root, torch with CUDA and the project installed)
# Covers: FSDPStrategy (v1) tests, compiled FlexAttention ALiBi vs eager, GPU training throughput and MFU
# (GPT-2-124M shape, eager and compiled, ALiBi vs RoPE), and the Perplexity metric on CUDA.
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
echo "| check | result |"
echo "|---|---|"
status "FSDPStrategy tests" "$( [ $fsdp -eq 0 ] && echo pass || echo "FAIL (rc $fsdp, /tmp/gpu_fsdp.log)")"
status "compiled Flex ALiBi vs eager" "$( [ $flex -eq 0 ] && echo pass || echo "FAIL (rc $flex, /tmp/gpu_flex.log)")"
echo; echo "training throughput (eager):"; grep "^|" /tmp/gpu_tput.log
echo; echo "training throughput (torch.compile):"; grep "^|" /tmp/gpu_tput_compile.log
echo; echo "Perplexity metric on CUDA:"; tail -6 /tmp/gpu_metrics.log
