#!/usr/bin/env bash
# Regenerates the page corpus in this folder: runs each workload (programs nobody on the
# project wrote: CPython, GCC's cc1, Node.js's V8, SQLite), lets it warm up, and captures
# two passes over its writable memory INTERVAL seconds apart with the `capture` binary
# (format: benches/src/corpus.rs). Needs root (or ptrace rights), python3, gcc, node,
# sqlite3. Takes about a minute.
#
#   benches/corpus/capture.sh [OUTDIR]      (default: this folder)
#
# Env: WARMUP (s, default 4), INTERVAL (s, default 2), MAX_PAIRS (default 400).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here}
warmup=${WARMUP:-4}
interval=${INTERVAL:-2}
max_pairs=${MAX_PAIRS:-400}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --release -q -p precopy-benches --bin capture --manifest-path "$root/Cargo.toml"
capture="${CARGO_TARGET_DIR:-$root/target}/release/capture"

# capture NAME PID LABEL
snap() {
    "$capture" --pid "$2" --out "$out/$1.pcz" --interval "$interval" --max-pairs "$max_pairs" \
        --label "$3"
}

# 1. CPython churning dicts of lists and strings.
py='import random
random.seed(1)
d = {}
while True:
    k = random.randrange(300000)
    d[k] = {"id": k, "name": "user%d" % k, "tags": [str(k % 97)] * random.randrange(1, 6)}
    if len(d) > 200000:
        d = {}'
python3 -c "$py" &
pid=$!
sleep "$warmup"
snap python-dicts "$pid" "python3 -c '<dict churn: 200k dicts of id/name/tags, rebuilt>'"
kill "$pid"; wait "$pid" 2>/dev/null || true

# 2. GCC's cc1 at -O2 on a large generated C file (3000 functions).
python3 - "$work/big.c" <<'PYEOF'
import sys
with open(sys.argv[1], "w") as f:
    f.write("#include <stdio.h>\n#include <string.h>\n#include <stdlib.h>\n")
    for i in range(3000):
        f.write(f"""
struct s{i} {{ int a[{i % 13 + 3}]; double d; const char *n; }};
int f{i}(int x, struct s{i} *p) {{
    int acc = {i};
    for (int k = 0; k < x; k++) {{
        switch ((k + acc) % 5) {{
        case 0: acc += p->a[k % {i % 13 + 3}] * {i % 7 + 1}; break;
        case 1: acc ^= (int)(p->d * k) + {i}; break;
        case 2: acc -= (int)strlen(p->n) + k; break;
        case 3: acc = acc * 31 + {i % 101}; break;
        default: acc += x > {i % 50} ? f{max(i - 1, 0)}(x / 2, (void *)p) : 1; break;
        }}
    }}
    return acc;
}}
""")
PYEOF
gcc -O2 -c "$work/big.c" -o "$work/big.o" &
gccpid=$!
sleep "$warmup"
cc1=$(pgrep -P "$gccpid" cc1 || true)
if [ -n "$cc1" ]; then
    snap gcc-cc1 "$cc1" "gcc -O2 -c big.c (cc1; big.c: 3000 generated functions, see capture.sh)"
else
    echo "cc1 finished before the capture; raise the function count" >&2
fi
kill "$gccpid" 2>/dev/null || true; wait "$gccpid" 2>/dev/null || true

# 3. Node.js (V8) building and serialising objects.
node -e '
let keep = [];
let i = 0;
for (;;) {
  const o = { id: i, name: "item" + i, vals: Array.from({length: 16}, (_, k) => k * i), when: new Date(i).toISOString() };
  keep.push(JSON.stringify(o));
  if (keep.length > 300000) keep = keep.slice(150000);
  i++;
}' &
pid=$!
sleep "$warmup"
snap node-json "$pid" "node -e '<JSON.stringify churn: 300k strings of small objects>'"
kill "$pid"; wait "$pid" 2>/dev/null || true

# 4. SQLite inserting and indexing rows in a 64 MiB page cache.
sqlite3 "$work/t.db" 'PRAGMA cache_size=-65536; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, v REAL);
CREATE INDEX tn ON t(name);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 20000000)
INSERT INTO t SELECT x, printf("name-%d-%d", x % 7919, x), x * 0.5 FROM c;' &
pid=$!
sleep "$warmup"
snap sqlite-insert "$pid" "sqlite3 t.db '<insert 20M rows with an index, cache_size 64 MiB>'"
kill "$pid"; wait "$pid" 2>/dev/null || true

ls -l "$out"/*.pcz
