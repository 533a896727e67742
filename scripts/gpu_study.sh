#!/usr/bin/env bash
# The prepared GPU study (docs/results.md): in under 8 minutes on one GPU, the paper's recipe
# (configs/reuters.yaml: BERT-base, seq 32, batch 64, vocab 10k, T = 2000) in bf16, trained
# with the rounding loss and with the anchor loss for the same time budget each (about
# 2.5 minutes, `train.time_limit_s`), and both evaluated with `raydiff eval` against a reference
# LM trained briefly on the same data and tokenizer:
#   $OUT/train_reference.json  train_rounding.json  train_anchor.json   (last report of each)
#   $OUT/eval_rounding.json  eval_anchor.json                           (raydiff eval --out)
# Each step writes its JSON (or its error) and the script goes on; the exit status is the
# number of failed steps.
#
#   scripts/gpu_study.sh          # on the GPU machine
#   scripts/gpu_study.sh --cpu    # every step at tiny sizes on the CPU (tests)
# $DATA is the corpus (default: the shared Reuters-21578 file; `synthetic` works too).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$PWD/gpu_study}
python=${PYTHON:-python}
data=${DATA:-$root/../shared/data/reuters21578/reuters21578.jsonl.gz}
mkdir -p "$out"
failed=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

source "$root/scripts/steps.sh"  # step NAME SECONDS CMD...

train() {  # train KIND RUN_NAME RUN_DIR OVERRIDES...: a --no-ray run; its last report as JSON
    local kind=$1 name=$2 dir=$3
    shift 3
    "$python" -m raydiff.cli "$kind" --config "$root/configs/reuters.yaml" --no-ray \
        "data.source=$data" "data.out_dir=$work/data" "train.output_dir=$work/runs" \
        "train.run_name=$name" train.max_steps=25000 train.patience=0 "$@" >&2 &&
        "$python" - "$work/runs/$dir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(json.dumps({"reports": len(rows), "last": rows[-1]}))
PY
}

evaluate() {  # evaluate LOSS EVAL_FLAGS...: raydiff eval of that run on the test split
    local loss=$1
    shift
    "$python" -m raydiff.cli eval --checkpoint "$work/runs/reuters-$loss" \
        --data "$(ls -d "$work"/data/*/ | head -1)" --reference "$work/runs/reuters-reference" \
        --ray off --out "$out/eval_$loss.json" "$@" >&2 && cat "$out/eval_$loss.json"
}
export -f train evaluate
export python root data work out

if [[ ${1:-} == --cpu ]]; then
    tiny=(model.embed_dim=8 model.hidden_size=32 model.num_layers=1 model.num_heads=2
          model.intermediate_size=64 model.time_embed_dim=16 reference.hidden_size=32
          reference.num_layers=1 reference.num_heads=2 data.vocab_size=300 train.batch_size=8
          train.log_every=2 train.eval_every=4 train.eval_batches=1 train.checkpoint_every=4
          train.num_threads=1)
    seconds=(3 3); samples=(--num-samples 8 --batch-size 8 --max-examples 64 --steps 10)
    limit=300
else
    tiny=(train.precision=bf16 train.log_every=50 train.eval_every=500
          train.checkpoint_every=100000)
    seconds=(40 140); samples=(--num-samples 256 --batch-size 256 --steps 200)
    limit=240
fi
step train_reference "$limit" bash -c 'train "$@"' _ train-reference reuters reuters-reference \
    "${tiny[@]}" "train.time_limit_s=${seconds[0]}"
for loss in rounding anchor; do
    step "train_$loss" "$limit" bash -c 'train "$@"' _ train "reuters-$loss" "reuters-$loss" \
        "diffusion.loss=$loss" "${tiny[@]}" "train.time_limit_s=${seconds[1]}"
    step "eval_$loss" 120 bash -c 'evaluate "$@"' _ "$loss" "${samples[@]}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    >"$out/gpu.txt" 2>/dev/null || echo "no nvidia-smi" >"$out/gpu.txt"
echo "gpu_study: $failed step(s) failed; results in $out" >&2
exit "$failed"
