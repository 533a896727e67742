# Sourced by scripts/gpu_check.sh and scripts/gpu_study.sh: `step NAME SECONDS CMD...` runs CMD
# with a time limit, its stdout to $out/NAME.json and its stderr to $out/NAME.log; on failure
# NAME.json says so and $failed counts it, and the caller goes on to its next step.
step() {
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== $name" >&2
    timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log" || rc=$?
    ((rc == 0)) && return 0
    printf '{"step": "%s", "error": "exit %s", "log": "%s.log"}\n' "$name" "$rc" "$name" \
        >"$out/$name.json"
    failed=$((failed + 1))
}
