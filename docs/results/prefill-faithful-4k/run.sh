#!/usr/bin/env bash
# Issue 12, item 7: every sparse prefill method at density 0.1 and 0.2 on the embedded model at 4k,
# passkey (repeat haystack) and niah_single (prose haystack), 5 samples each (needle depths 0.1..0.9),
# and the leak-free form (causal=True) of every look-ahead method at density 0.2.
# Usage: bash run.sh OUTDIR [group]   (groups: base, new, causal; default all). Rows resume where they stopped.
set -euo pipefail
OUT=${1:?usage: run.sh OUTDIR [group]}
GROUP=${2:-all}
BASE=dense,window,a-shape,block-topk,vertical-slash,block-sparse,flexprefill,bilevel,power,strided,blasst
NEW=seer,longheads,hip,dhsa,tokenselect,anchor,sale
LOOKAHEAD="vertical-slash block-sparse flexprefill bilevel seer hip dhsa tokenselect anchor sale"
run() {  # methods, extra args...
  local methods=$1; shift
  python -m attnsieve eval --methods "$methods" --tasks passkey --haystack repeat --lengths 4096 --samples 5 --threads 1 \
      --out "$OUT/passkey-repeat" "$@"
  python -m attnsieve eval --methods "$methods" --tasks niah_single --haystack prose --lengths 4096 --samples 5 --threads 1 \
      --out "$OUT/niah-prose" "$@"
}
if [[ $GROUP == all || $GROUP == base ]]; then run "$BASE" --density 0.1,0.2; fi
if [[ $GROUP == all || $GROUP == new ]]; then run "$NEW" --density 0.1,0.2; fi
if [[ $GROUP == all || $GROUP == causal ]]; then
  sets=(); methods=""
  for m in $LOOKAHEAD; do sets+=(--set "$m.causal=true"); methods+="${methods:+,}$m"; done
  run "$methods" --density 0.2 "${sets[@]}"
fi
