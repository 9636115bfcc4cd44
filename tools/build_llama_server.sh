#!/usr/bin/env bash
# Builds llama.cpp's llama-server for the benchmark's third column (tools/bench_server.py
# --llama-server PATH): a benchmark extra, never part of the test suite or of bootstrap.
#
# The sources are the llama.cpp that the llama-cpp-python sdist on PyPI vendors (one pinned
# version, reachable wherever pip is), built CPU-only with cmake: about 10 minutes on 2 cores.
# Prints the binary's path; a second run with the binary in place only prints it.
#
# Usage: tools/build_llama_server.sh [VERSION]   (default below; the binary lands in
#        build/llama-server-VERSION/bin/llama-server, build/ is git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."

version=${1:-0.3.36}
out="build/llama-server-${version}"
binary="$out/bin/llama-server"
if [ -x "$binary" ]; then
    echo "$PWD/$binary"
    exit 0
fi
for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: needs $tool" >&2; exit 1; }
done

src="$out/src"
mkdir -p "$src"
if [ ! -f "$src/CMakeLists.txt" ]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==${version}" -d "$out" >&2
    tar -xzf "$out/llama_cpp_python-${version}.tar.gz" -C "$out"
    # The sdist's vendor/llama.cpp holds the whole llama.cpp tree, tools/server included.
    rm -rf "$src"
    mv "$out/llama_cpp_python-${version}/vendor/llama.cpp" "$src"
    rm -rf "$out/llama_cpp_python-${version}"
fi
echo "build_llama_server: building llama-server ${version} (about 10 minutes on 2 cores)" >&2
cmake -S "$src" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$out/cmake" --target llama-server -j "$(nproc)" >&2
mkdir -p "$out/bin"
cp "$out/cmake/bin/llama-server" "$binary"
echo "$PWD/$binary"
