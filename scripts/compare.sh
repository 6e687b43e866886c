#!/usr/bin/env bash
# The main job: install what is missing, build attnkit-compare (Release) and run it.
# Arguments go to attnkit-compare (try --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/deps.sh"
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" --target attnkit-compare -j"$(nproc)"
exec "$root/build/examples/attnkit-compare" "$@"
