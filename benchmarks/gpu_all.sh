#!/usr/bin/env bash
# Everything the GPU has to show, in one device call: writes logs and RESULTS_part.md to $OUT.
#   PYTHONPATH=. bash benchmarks/gpu_all.sh
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_all}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/gpu_smoke.py > "$out/smoke.log" 2>&1
echo "smoke: $(grep -c 'OK$' "$out/smoke.log") OK, $(grep -c 'FAIL' "$out/smoke.log") FAIL"; grep -v 'OK$' "$out/smoke.log" | tail -3
PYTHONPATH=.:benchmarks python3 benchmarks/profile_hf.py launcher_calls 2>&1 | head -4
python3 benchmarks/bench_features.py --out "$out/RESULTS_part.md" > "$out/features.log" 2>&1; grep -v Warning "$out/features.log" | tail -16
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1; tail -4 "$out/gpu_tests.log"
timeout 240 python3 benchmarks/bench_attention.py --check --out "$out/RESULTS_part.md" > "$out/bench.log" 2>&1; grep '^|' "$out/bench.log" | tail -41 | cut -c1-400
timeout 90 python3 benchmarks/bench_encoder.py --out "$out/RESULTS_part.md" 2>&1 | grep '^|' | tail -8
