#!/usr/bin/env bash
# Regenerate the CUDA tables on a GPU machine whose python3 has torch (no network): install the
# peers from wheels in .whl/ (see benchmarks/README.md), then run each benchmark with a time cap.
# Usage: OUT=<dir> bash benchmarks/run_gpu.sh
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=src:/tmp/site
else
  export PYTHONPATH=src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# ONLY=suite: only the optimizer suite (it then fits a 15-minute device budget on its own).
if [ "${ONLY:-all}" != "suite" ]; then
timeout 60 python3 -m beyondgrad.app demo --device cuda --reps 5 2>&1 | grep -v Warning | tee "$out/demo_cuda.txt"
timeout 200 python3 benchmarks/first_order.py --device cuda --reps 5 --out "$out/first_order_cuda.md"
timeout 200 python3 benchmarks/second_order.py --device cuda --reps 5 --out "$out/second_order_cuda.md"
timeout 110 python3 benchmarks/conv_toolkit.py --device cuda --reps 5 --out "$out/conv_toolkit_cuda.md"
timeout ${LINOPS_S:-240} python3 benchmarks/linops.py --device cuda --reps 5 --out "$out/linops_cuda.md"
timeout ${COCKPIT_S:-150} python3 benchmarks/cockpit.py --device cuda --out "$out/cockpit_cuda.md"
ls -la "$out"
timeout 120 python3 benchmarks/distributed.py --backend nccl 2>&1 | tee "$out/distributed_cuda.txt"
fi
# The optimizer suite (issue 12) on CUDA, scaled down to about 10 minutes: interleaved ms/step,
# then AdamW tuned and calibrated, the others tuned (batch size included), the timed table;
# resumable (results/optim_suite_runs.jsonl), so a cut run can be rerun. SUITE_S: per-run
# training budget in seconds; SUITE_TRIALS: trials per (task, optimizer); the full protocol
# (12 trials, 60 s) is the CPU command in benchmarks/results/optim_suite_cpu.md.
st_tasks=${SUITE_TASKS:-autoencoder gpt}; st_opts=${SUITE_OPTIMIZERS:-adamw kfac singd sirfshampoo}
timeout ${SUITE_STEPS_S:-90} python3 benchmarks/optim.py --device cuda --tasks $st_tasks --rounds 3 --out "$out/optim_steps_cuda.md"
suite="python3 benchmarks/optim_suite.py --device cuda --results $out --task $st_tasks"
sb=${SUITE_S:-8}; st=${SUITE_TRIALS:-4}
timeout ${SUITE_TUNE_S:-330} bash -c "$suite tune --optimizer adamw --budget $((sb * 2 / 3)) --trials $st && $suite calibrate --budget $((sb * 2 / 3)) && $suite tune --optimizer $st_opts --budget $sb --trials $st"
timeout ${SUITE_TIMED_S:-240} $suite timed --optimizer $st_opts --seeds 3 --budget $sb
