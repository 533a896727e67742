#!/usr/bin/env bash
# Submit a raydiff command to a Ray cluster as a job, shipping this checkout as the working dir.
#
#   scripts/submit.sh http://HEAD:8265 train --config configs/reuters.yaml ray.num_workers=8 ray.use_gpu=true
#   scripts/submit.sh http://HEAD:8265 tune --config configs/tune/ablation.yaml
#   RAY_ADDRESS=http://HEAD:8265 scripts/submit.sh - eval --checkpoint ... --data ...
#
# "-" as the address uses $RAY_ADDRESS. Extra `ray job submit` options go in $SUBMIT_ARGS
# (e.g. SUBMIT_ARGS="--no-wait"). The job runs `python -m raydiff.cli <command> ...` on the head.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
address=$1
shift
if [[ $address == "-" ]]; then
    address=${RAY_ADDRESS:?set RAY_ADDRESS or pass the address}
fi
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2086
exec ray job submit --address "$address" --working-dir "$root" ${SUBMIT_ARGS:-} \
    -- python -m raydiff.cli "$@"
