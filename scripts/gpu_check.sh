#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md): in under 8 minutes on one GPU,
#   1. scripts/bench_step.py: tokens/s and MFU at the smoke, ablation-small and paper sizes in
#      fp32 and bf16, eager and compiled, and side by side with minimal-text-diffusion's step;
#   2. a 1-GPU Ray Train run of configs/smoke.yaml with ray.use_gpu=true (NCCL);
#   3. scripts/bench_sample.py on the GPU: DDPM-T against respaced DDIM.
# Each step writes its JSON (or its error) under $OUT (default ./gpu_check) and the script goes
# on, so one failure keeps the others' numbers; the exit status is the number of failed steps.
#
#   scripts/gpu_check.sh          # on the GPU machine
#   scripts/gpu_check.sh --cpu    # a dry run of every step at tiny sizes on the CPU (tests;
#                                 # the training step there in one process, without Ray)
# $RAY_ADDRESS, when set, is the cluster the GPU training step joins (else it starts a local Ray).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$PWD/gpu_check}
python=${PYTHON:-python}
anchor=${ANCHOR:-$root/../shared/anchors/minimal-text-diffusion}
mkdir -p "$out"
failed=0

source "$root/scripts/steps.sh"  # step NAME SECONDS CMD...

run_train() {  # a Ray Train smoke run; its last report as JSON
    local dir=$1
    shift
    "$python" -m raydiff.cli train --config "$root/configs/smoke.yaml" \
        "train.output_dir=$dir" "data.out_dir=$dir/data" ray.num_workers=1 \
        ${RAY_ADDRESS:+"ray.address=$RAY_ADDRESS"} "$@" >&2 &&
        "$python" - "$dir/smoke/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(json.dumps({"reports": len(rows), "last": rows[-1]}))
PY
}
export -f run_train
export python root

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ ${1:-} == --cpu ]]; then
    step bench_step 300 "$python" "$root/scripts/bench_step.py" --device cpu --configs smoke \
        --precisions fp32 --steps 2 --warmup 1 --rounds 1 --compile default
    if [[ -d $anchor ]]; then
        step bench_step_anchor 300 "$python" "$root/scripts/bench_step.py" --device cpu \
            --configs smoke --steps 2 --warmup 1 --rounds 1 --anchor "$anchor"
    fi
    # in one process: the dry run checks this script, tests/test_ray_train.py Ray Train on CPUs
    step ray_train 300 bash -c 'run_train "$@"' _ "$work/train" --no-ray train.max_steps=4 \
        train.eval_every=4 train.checkpoint_every=4 train.log_every=2
    step bench_sample 300 "$python" "$root/scripts/bench_sample.py" --device cpu \
        --train-steps 10 --num-samples 4 --batch-size 4 --steps 20 --threads 1
else
    step bench_step 150 "$python" "$root/scripts/bench_step.py" --device cuda \
        --configs smoke tune/ablation-small reuters --precisions fp32 bf16 --steps 20 \
        --warmup 5 --rounds 2 --compile reduce-overhead
    step bench_step_anchor 120 "$python" "$root/scripts/bench_step.py" --device cuda \
        --configs tune/ablation-small reuters --steps 20 --warmup 5 --rounds 2 --anchor "$anchor"
    step ray_train 120 bash -c 'run_train "$@"' _ "$work/train" train.max_steps=200 ray.use_gpu=true \
        ray.cpus_per_worker=1
    step bench_sample 90 "$python" "$root/scripts/bench_sample.py" --device cuda \
        --train-steps 1000 --num-samples 256 --batch-size 256
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    >"$out/gpu.txt" 2>/dev/null || echo "no nvidia-smi" >"$out/gpu.txt"
echo "gpu_check: $failed step(s) failed; results in $out" >&2
exit "$failed"
