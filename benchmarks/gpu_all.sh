#!/usr/bin/env bash
# Everything the GPU has to show, as named parts that one device call or several run in order:
#   tests      the GPU tests of every file that has them, six pytest processes side by side
#              (test_features and test_hopper each split in two halves by node id);
#              tests.log: each lane's summary; test_lanes/<lane>.log, written as the tests
#              run, so that a call cut by the device's time limit still returns them
#   features   bench_features (decode, masked prefill, GQA, peak memory; issue 3)
#   encoder    bench_encoder (nn.TransformerEncoder before and after the swap; issue 4)
#   attention  bench_attention --check, one process per dtype (issues 2 and 7);
#              attention_fp16.json, attention_bf16.json
#   hf         bench_hf, GPT-2 then Llama (issue 5)
#   backward   bench_backward (training step)
# Tables go to $OUT/RESULTS.md (default OUT=/tmp/gpu_all), logs to $OUT/<part>.log.
#   PARTS="tests features encoder" PYTHONPATH=. bash benchmarks/gpu_all.sh
# Without PARTS: every part, in the order above. The tests compile into their own Triton cache
# (TRITON_CACHE_DIR), so the benchmarks' first calls still compile from an empty one. Timed
# parts run alone on the GPU: host-bound timings (the Hugging Face models) move by several
# percent beside another process (GPT-2 8k prefill: 12.6 ms beside the tests, 9.8 ms alone,
# 2026-11-30). With two GPUs, the tests run on the second one while the timed parts run on the
# first, then the tests that need both devices.
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_all}
work=$(mktemp -d)  # the tests' node-id lists and Triton cache (not sent back)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
gpus=$(nvidia-smi -L | wc -l)

part_tests() {
    local logs=$out/test_lanes pids=() lanes=() lane i lane_rc rc=0 name
    mkdir -p "$logs"
    for name in features hopper; do  # the two longest files, halved by node id
        python3 -m pytest -q --collect-only -m gpu -p no:cacheprovider "tests/test_$name.py" \
            | grep '::' > "$work/${name}_ids"
        local half=$(( ($(wc -l < "$work/${name}_ids") + 1) / 2 ))
        head -n "$half" "$work/${name}_ids" > "$work/${name}_a"
        tail -n +"$((half + 1))" "$work/${name}_ids" > "$work/${name}_b"
    done
    for lane in features_a features_b hopper_a hopper_b "compile hf plans" \
                "mha attention_modules"; do
        local files=() f
        if [[ $lane == *_? ]]; then
            mapfile -t files < "$work/$lane"
        else
            for f in $lane; do files+=("tests/test_$f.py"); done
        fi
        TRITON_CACHE_DIR=$work/triton_cache timeout -s INT "${TEST_TIMEOUT:-420}" \
            python3 -m pytest -q -m gpu -p no:cacheprovider "${files[@]}" \
            > "$logs/${lane// /_}.log" 2>&1 &
        pids+=($!)
        lanes+=("${lane// /_}")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" && continue
        lane_rc=$? rc=1
        echo "lane ${lanes[$i]}: rc $lane_rc (124: stopped by TEST_TIMEOUT, its last tests unrun)"
    done
    for f in "$logs"/*.log; do echo "== ${f##*/}"; tail -15 "$f"; done
    return $rc
}

part_features() { timeout 150 python3 benchmarks/bench_features.py --out "$out/RESULTS.md"; }
part_encoder() { timeout 150 python3 benchmarks/bench_encoder.py --out "$out/RESULTS.md"; }
part_backward() { timeout 150 python3 benchmarks/bench_backward.py --out "$out/RESULTS.md"; }
part_hf() {
    timeout 580 python3 benchmarks/bench_hf.py --models gpt2 llama --out "$out/RESULTS.md"
}
part_attention() {
    local dtype
    for dtype in float16 bfloat16; do
        timeout "${ATTENTION_TIMEOUT:-290}" python3 benchmarks/bench_attention.py --check \
            --dtypes "$dtype" --out "$out/RESULTS.md" \
            --json "$out/attention_$([ $dtype = float16 ] && echo fp16 || echo bf16).json"
    done
}

parts=${PARTS:-tests features encoder attention hf backward}
timed=${parts//tests/}
if [ "$gpus" -ge 2 ] && [ "$timed" != "$parts" ]; then
    CUDA_VISIBLE_DEVICES=1 part_tests > "$out/tests.log" 2>&1 &
    for p in $timed; do CUDA_VISIBLE_DEVICES=0 "part_$p" > "$out/$p.log" 2>&1; done
    wait
    { echo "== two devices"; timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_plans.py -k second_device 2>&1 | tail -3; } >> "$out/tests.log"
else
    for p in $parts; do
        start=$SECONDS
        "part_$p" > "$out/$p.log" 2>&1
        echo "part $p: rc $?, $((SECONDS - start)) s"
    done
fi
[ -f "$out/tests.log" ] && grep -h "passed\|failed\|error\|^lane " "$out/tests.log"
[ -f "$out/RESULTS.md" ] && grep -h '^|' "$out/RESULTS.md" | cut -c1-220
true
