#!/usr/bin/env bash
# Every crash point of one write-out, explored as GNU parallel jobs on one host: recorded
# once, its work items split in shards, each shard's report merged.
#
#   deploy/local/explore.sh SHARDS OUTDIR [vmm explore run options...]
#
# Records the write-out into OUTDIR/record (vmm explore record; its options in RECORD_OPTS,
# e.g. "--mem 64M --write-out 2"), runs shard 0/SHARDS to SHARDS-1/SHARDS of it (JOBS at a
# time, default: the number of CPUs), each report to OUTDIR/shard-I.json, then prints the
# merged report and writes it to OUTDIR/report.json. Exit status 1 if a crash image failed
# (the shard's report names it, its image and the command that reproduces it). VMM names
# the vmm binary (default: vmm on PATH).
set -euo pipefail

vmm=${VMM:-vmm}

# One shard (parallel calls the script again for each): its report into its file.
if [ "${1:-}" = --one-shard ]; then
    shift
    index=$1 shards=$2 out=$3
    shift 3
    exec "$vmm" explore run --from "$out/record" --shard "$index/$shards" --json "$@" >"$out/shard-$index.json"
fi

if [ $# -lt 2 ]; then
    echo "usage: $0 SHARDS OUTDIR [vmm explore run options...]" >&2
    exit 2
fi
shards=$1 out=$2
shift 2
if ! command -v parallel >/dev/null; then
    echo "$0 needs GNU parallel (Debian: apt-get install parallel)" >&2
    exit 2
fi
mkdir -p "$out"
rm -f "$out"/shard-*.json
read -r -a record_opts <<<"${RECORD_OPTS:-}"
"$vmm" explore record --out "$out/record" "${record_opts[@]}"

# -q quotes each argument: paths and options with spaces pass through whole.
status=0
seq 0 $((shards - 1)) | parallel -q --jobs "${JOBS:-$(nproc)}" --halt never \
    "$0" --one-shard {} "$shards" "$out" "$@" || status=1
"$vmm" explore merge --json "$out"/shard-*.json >"$out/report.json" || status=1
"$vmm" explore merge "$out"/shard-*.json || status=1
exit "$status"
