#!/usr/bin/env bash
# Builds the shim that lets MLX use scipy-openblas32 (tools/cblas_shim.c) into
#   <venv>/lib/trioserve/libtrioserve_openblas.so
# where trioserve/blas.py looks for it. Run by tools/bootstrap.sh; idempotent (rebuilds only
# when the source or the OpenBLAS library is newer). Linux only. Without a C compiler, or if
# the build fails, it says so and exits 0: trioserve then uses cmeel-openblas where this CPU
# runs it, else MLX's slow reference BLAS (and says so when it starts).
# Usage: tools/build_blas_shim.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-.venv/bin/python}
CC=${CC:-cc}
SRC=tools/cblas_shim.c

if [ "$(uname -s)" != "Linux" ]; then
    exit 0
fi
skip() {
    echo "bootstrap: WARNING: not building the scipy-openblas32 shim: $1." >&2
    echo "  MLX will use cmeel-openblas where this CPU runs it, else its slow reference BLAS." >&2
    exit 0
}
if ! command -v "$CC" >/dev/null; then
    skip "no C compiler ($CC; install gcc)"
fi
# One line: the lib dir, the link name (scipy_openblas), the output path, rpath from it to lib.
if ! info=$("$PY" - <<'EOF'
import os, sys
import scipy_openblas32 as s
out = os.path.join(sys.prefix, "lib", "trioserve", "libtrioserve_openblas.so")
lib = s.get_lib_dir()
print(lib, s.get_library(), out, os.path.relpath(lib, os.path.dirname(out)))
EOF
); then
    skip "the scipy-openblas32 package is not importable with $PY"
fi
read -r LIBDIR LIBNAME OUT RELPATH <<<"$info"
LIBFILE="$LIBDIR/lib$LIBNAME.so"

if [ -f "$OUT" ] && [ "$OUT" -nt "$SRC" ] && [ "$OUT" -nt "$LIBFILE" ]; then
    exit 0
fi
echo "bootstrap: building $OUT (MLX -> scipy-openblas32)" >&2
mkdir -p "$(dirname "$OUT")"
# --no-undefined: a symbol missing from scipy-openblas32 fails here, not at run time.
if ! "$CC" -O2 -fPIC -shared -Wall -Werror -o "$OUT.tmp" "$SRC" \
    -L"$LIBDIR" -l"$LIBNAME" -Wl,-rpath,"\$ORIGIN/$RELPATH" -Wl,--no-undefined; then
    rm -f "$OUT.tmp"
    skip "$CC failed to build $SRC"
fi
mv -f "$OUT.tmp" "$OUT"
