#!/bin/sh
# Extracts every ```cpp block of a Markdown file, compiles each as a program against attnkit's
# headers and runs it: the README's code must build and run as printed.
#   compile_blocks.sh DOC WORK_DIR CXX ATTNKIT_INCLUDE_DIR [SYSTEM_INCLUDE_DIR...]
set -eu
doc=$1 work=$2 cxx=$3 inc=$4
shift 4
rm -rf "$work" && mkdir -p "$work"
awk -v dir="$work" '
  !inside && /^```(cpp|c\+\+)[ \t]*$/ { inside = 1; n++; file = dir "/block" n ".cpp"; printf "" > file; next }
  inside && /^```[ \t]*$/ { inside = 0; close(file); next }
  inside { print >> file }
  END { if (inside) { print "unclosed ```cpp block" > "/dev/stderr"; exit 1 } }' "$doc"
set -- "$@"
sys=""
for d in "$@"; do sys="$sys -isystem $d"; done
count=0
for src in "$work"/block*.cpp; do
  [ -e "$src" ] || break
  count=$((count + 1))
  # shellcheck disable=SC2086
  if ! "$cxx" -std=c++20 -O1 -Wall -Wextra -Wpedantic -Werror -I"$inc" $sys "$src" -o "${src%.cpp}" -pthread; then
    echo "$doc: $(basename "$src") does not compile" >&2
    exit 1
  fi
  if ! out=$("${src%.cpp}"); then
    echo "$doc: $(basename "$src") exits with an error: $out" >&2
    exit 1
  fi
  echo "$(basename "$src"): $out"
done
if [ "$count" -eq 0 ]; then
  echo "$doc has no \`\`\`cpp block" >&2
  exit 1
fi
echo "$count C++ block(s) of $doc compile and run"
