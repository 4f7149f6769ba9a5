#!/usr/bin/env bash
# Everything the multi-GPU measurements need, in one device command (a multi-GPU machine may be lent for a single
# command), within 10 minutes on 2 to 8 GPUs of one host:
#
#     bash benchmarks/run_multi_gpu.sh OUT [WORLD]        (WORLD: the GPU count by default)
#
# 1. bench_multi_gpu.py, causal: equality with the single-GPU op at 256K, strong and weak scaling at 256K per GPU,
#    context_parallel anchor, longest sequence (WORLD x 4M tokens twice, the second call compiled; then WORLD x 6M),
#    ring hop time;
# 2. the same checks and scaling, non-causal;
# 3. strong and weak scaling at 1M, causal and not;
# 4. the two-GPU tests (tests/distributed/test_multi_gpu.py, kernels on a non-current device).
# Rows go to OUT/multi_gpu.jsonl, logs to OUT/*.log, the GPU links to OUT/topo.txt. NVLink multicast stays off.
set -u
OUT=${1:?usage: run_multi_gpu.sh OUT [WORLD]}
WORLD=${2:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 DILATE_COMPILER_AUTOTUNE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi topo -m; nvidia-smi nvlink -s; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv; } > "$OUT/topo.txt" 2>&1
BENCH=(python3 benchmarks/bench_multi_gpu.py --world "$WORLD" --out "$OUT")
M4=$((WORLD * 4194304)); M6=$((WORLD * 6291456))
timeout 230 "${BENCH[@]}" --deadline 170 --longest "$M4,$M4,$M6" > "$OUT/causal.log" 2>&1; echo "causal: rc $?"
timeout 110 "${BENCH[@]}" --causal false --phases check,scaling --deadline 80 > "$OUT/noncausal.log" 2>&1
echo "non-causal: rc $?"
timeout 90 "${BENCH[@]}" --causal true,false --n 1048576 --weak-per-rank 1048576 --phases scaling --deadline 60 \
    > "$OUT/scaling_1m.log" 2>&1; echo "1M scaling: rc $?"
timeout 140 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_multi_gpu.py \
    "tests/lowering/test_dilated_gpu.py::test_kernels_run_on_the_inputs_device_not_the_current_one" \
    > "$OUT/pytest.log" 2>&1; echo "two-GPU tests: rc $? ($(tail -n 1 "$OUT/pytest.log"))"
grep -c "\"error\"" "$OUT/multi_gpu.jsonl" 2>/dev/null | sed "s/^/rows with an error: /"
