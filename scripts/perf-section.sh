#!/usr/bin/env bash
# Regenerates the README's Performance section from `vmm report --json`: measures (about a
# minute), keeps the JSON and the charts in DIR (default docs/perf), and replaces the text
# between the README's perf-section markers with `vmm report --from DIR/report.json --markdown`.
# Usage: scripts/perf-section.sh [DIR]; PERF_REUSE=1 renders DIR/report.json as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-docs/perf}
cargo build --release -p cli --bin vmm
mkdir -p "$dir"
if [ "${PERF_REUSE:-0}" != 1 ] || [ ! -e "$dir/report.json" ]; then
    target/release/vmm report --out "$dir" --json >"$dir/report.json"
fi
section=$(mktemp)
trap 'rm -f "$section"' EXIT
target/release/vmm report --from "$dir/report.json" --markdown >"$section"
begin='<!-- perf-section: begin (scripts/perf-section.sh) -->'
end='<!-- perf-section: end -->'
grep -qF "$begin" README.md || { echo "README.md has no line $begin" >&2; exit 1; }
awk -v begin="$begin" -v end="$end" -v file="$section" '
    $0 == begin { print; while ((getline line < file) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }
' README.md >README.md.new
mv README.md.new README.md
echo "README.md: Performance section regenerated from $dir/report.json"
