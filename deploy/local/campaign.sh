#!/usr/bin/env bash
# A torture campaign on one host: its shards as GNU parallel jobs, then merged.
#
#   deploy/local/campaign.sh SHARDS CRASHES SEED OUTDIR [vmm torture options...]
#
# Runs shard 0/SHARDS to SHARDS-1/SHARDS of the campaign of CRASHES crashes and SEED, each on
# an image of its own in OUTDIR (JOBS at a time, default: the number of CPUs), each summary
# to OUTDIR/shard-I.json, then prints the merged summary and writes it to OUTDIR/summary.json.
# Exit status 1 if any shard failed (its image and reproducing command are in its summary).
# VMM names the vmm binary (default: vmm on PATH).
set -euo pipefail

vmm=${VMM:-vmm}

# One shard (parallel calls the script again for each): its summary into its file.
if [ "${1:-}" = --one-shard ]; then
    shift
    index=$1 shards=$2 crashes=$3 seed=$4 out=$5
    shift 5
    exec "$vmm" torture --nvram "$out/shard-$index.img" --crashes "$crashes" --seed "$seed" \
        --shard "$index/$shards" --json "$@" >"$out/shard-$index.json"
fi

if [ $# -lt 4 ]; then
    echo "usage: $0 SHARDS CRASHES SEED OUTDIR [vmm torture options...]" >&2
    exit 2
fi
shards=$1 crashes=$2 seed=$3 out=$4
shift 4
if ! command -v parallel >/dev/null; then
    echo "$0 needs GNU parallel (Debian: apt-get install parallel)" >&2
    exit 2
fi
mkdir -p "$out"
rm -f "$out"/shard-*.json

# -q quotes each argument: paths and options with spaces pass through whole.
status=0
seq 0 $((shards - 1)) | parallel -q --jobs "${JOBS:-$(nproc)}" --halt never \
    "$0" --one-shard {} "$shards" "$crashes" "$seed" "$out" "$@" || status=1
"$vmm" torture merge --json "$out"/shard-*.json >"$out/summary.json" || status=1
"$vmm" torture merge "$out"/shard-*.json || status=1
exit "$status"
