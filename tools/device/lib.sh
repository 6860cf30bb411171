# Shared by the device scripts (sourced, not run): `step NAME SECONDS COMMAND...` runs COMMAND with a
# time limit, its stdout and stderr in $OUT/NAME.txt (the caller sets OUT), and prints its exit status
# and the last 20 lines of its output; a failing step does not stop the script.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "== $name exit $? ($(date +%T))"
    tail -n 20 "$OUT/$name.txt"
}
