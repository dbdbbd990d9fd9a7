#!/usr/bin/env bash
# Checks the guest kernel's layers (guest-kernel/LAYERS.md): every file under
# guest-kernel/src may use only its own layer and the layers below it. Reads each file's
# `crate::x` paths (`use` items and inline paths, `$crate::` in macros too) and its uses of
# the crate's exported macros, and fails naming the file, the line and the import when one
# reaches a layer above the file's. Needs bash, grep, sed and awk only.
#
# Usage: scripts/check-layers.sh [path/to/guest-kernel/src]

# The layers, lowest first. A file's layer is the folder under src/ it sits in; the files
# directly in src/ (main.rs) are the top layer, `main`.
LAYERS="arch dev nvm plate proc main"
# Modules directly in src/ besides the layer folders: they belong to the top layer (none
# now: the command line is `nvram::cmdline`'s).
TOP_MODULES=""
# Macros exported at the crate root (`#[macro_export]`), each with the layer defining it:
# using one counts as importing from that layer.
MACROS="print:dev println:dev res_op:nvm uprintln:proc"

set -u
src=${1:-"$(cd "$(dirname "$0")/.." && pwd)/guest-kernel/src"}
if [ ! -d "$src" ]; then
    echo "check-layers: no directory $src" >&2
    exit 2
fi

rank() { # rank NAME: position of a layer in LAYERS (empty if not a layer)
    local i=0 l
    for l in $LAYERS; do
        [ "$l" = "$1" ] && { echo "$i"; return; }
        i=$((i + 1))
    done
}

layer_of_module() { # the layer a `crate::NAME` path leads into (empty: unknown)
    local m
    [ -n "$(rank "$1")" ] && [ "$1" != main ] && { echo "$1"; return; }
    for m in $TOP_MODULES; do [ "$m" = "$1" ] && { echo main; return; }; done
    for m in $MACROS; do [ "${m%%:*}" = "$1" ] && { echo "${m#*:}"; return; }; done
}

macro_names=$(for m in $MACROS; do printf '%s|' "${m%%:*}"; done)
macro_names=${macro_names%|}

status=0
files=$(cd "$src" && find . -name '*.rs' | sed 's|^\./||' | sort)
for file in $files; do
    case $file in
        */*) own=${file%%/*} ;;
        *) own=main ;;
    esac
    own_rank=$(rank "$own")
    if [ -z "$own_rank" ]; then
        echo "$src/$file: folder '$own' is not a layer (declare it in LAYERS)"
        status=1
        continue
    fi
    # Line number and target of every `crate::x` path and every exported macro's use,
    # comments stripped (doc links are not imports).
    targets=$(sed 's|//.*$||' "$src/$file" | awk -v macros="$macro_names" '
        {
            line = $0
            while (match(line, /crate::(\{|[A-Za-z_][A-Za-z0-9_]*)/)) {
                print NR " " substr(line, RSTART + 7, RLENGTH - 7)
                line = substr(line, RSTART + RLENGTH)
            }
            line = $0
            re = "(^|[^A-Za-z0-9_:])(" macros ")!"
            while (match(line, re)) {
                hit = substr(line, RSTART, RLENGTH - 1)
                sub(/^[^A-Za-z_]/, "", hit)
                print NR " " hit
                line = substr(line, RSTART + RLENGTH)
            }
        }')
    while read -r line target; do
        [ -z "${line:-}" ] && continue
        if [ "$target" = "{" ]; then
            echo "$src/$file:$line: grouped import 'use crate::{...}': write one path per layer so that it can be checked"
            status=1
            continue
        fi
        layer=$(layer_of_module "$target")
        if [ -z "$layer" ]; then
            echo "$src/$file:$line: imports crate::$target, which is in no layer (declare it at the top of $0)"
            status=1
        elif [ "$(rank "$layer")" -gt "$own_rank" ]; then
            echo "$src/$file:$line: layer '$own' imports '$target' from the higher layer '$layer'"
            status=1
        fi
    done <<< "$targets"
done

if [ "$status" -eq 0 ]; then
    echo "check-layers: $(echo "$files" | wc -w) files, every import goes down ($LAYERS)"
fi
exit "$status"
