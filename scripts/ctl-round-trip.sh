#!/usr/bin/env bash
# `vmm ctl checkpoint` round trip (the whole `vmm ctl` process, wall time) against the
# write-out the guest measures, on a `kv` machine: N checkpoints, medians of both.
# Usage: scripts/ctl-round-trip.sh [VMM_BINARY] [N]
set -euo pipefail
vmm=${1:-target/release/vmm}
n=${2:-30}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$vmm" boot --nvram "$dir/nvm.img" --control "$dir/vmm.sock" --cmdline "apps=kv" >"$dir/console.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    "$vmm" ctl --socket "$dir/vmm.sock" status --json 2>/dev/null | grep -q '"kv"' && break
    sleep 0.1
done
: >"$dir/rt"
for _ in $(seq "$n"); do
    # $EPOCHREALTIME: no process of its own inside the measure (bash 5).
    start=$EPOCHREALTIME
    "$vmm" ctl --socket "$dir/vmm.sock" checkpoint --json >"$dir/out"
    end=$EPOCHREALTIME
    guest=$(sed -E 's/.*"total_ms":([0-9.]+).*/\1/' "$dir/out")
    echo "$start $end $guest" >>"$dir/rt"
    sleep 0.05
done
"$vmm" ctl --socket "$dir/vmm.sock" crash >/dev/null
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
least() { sort -g | head -1; }
rt=$(awk '{print ($2 - $1) * 1000}' "$dir/rt" | median)
wo=$(awk '{print $3}' "$dir/rt" | median)
extra=$(awk '{print ($2 - $1) * 1000 - $3}' "$dir/rt" | median)
best=$(awk '{print ($2 - $1) * 1000 - $3}' "$dir/rt" | least)
echo "round trip median ${rt} ms, guest write-out median ${wo} ms; round trip less write-out: median ${extra} ms, least ${best} ms ($n checkpoints, load average $(cut -d' ' -f1 /proc/loadavg))"
