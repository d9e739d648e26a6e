#!/usr/bin/env bash
# Run transformers' own model tests unmodified ("plain") and with every model swapped onto moekit ("swapped").
#
#   tools/hf_model_tests/run.sh prepare DIR SNAPSHOT_GIT_DIR [REF]   # build the tests tree in DIR (outside the repo)
#   tools/hf_model_tests/run.sh run DIR MODEL plain|swapped [pytest args...]   # one family, log in DIR/logs/
#   tools/hf_model_tests/run.sh compare DIR MODEL                    # tests that pass plain but not swapped
#
# The tests are fetched, never committed: the top-level test mixins (tests/*.py) come from the sdist of the installed
# transformers version (pip download), the per-model tests and the helpers the sdist lacks (tests/generation,
# causal_lm_tester.py, tests/utils, utils/test_module) from a git snapshot of huggingface/transformers (or a fork).
# MODEL: mixtral qwen2_moe qwen3_moe olmoe deepseek_v3. MOEKIT_SWAP_SHARE=0 swaps with share=False.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:?usage: run.sh prepare|run|compare ...}"; shift
MODELS="mixtral qwen2_moe qwen3_moe olmoe deepseek_v3"

case "$cmd" in
prepare)
  DIR="${1:?DIR}"; GIT="${2:?SNAPSHOT_GIT_DIR}"; REF="${3:-HEAD}"
  VER="$(python -c 'import transformers; print(transformers.__version__)')"
  TFPKG="$(python -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')"
  mkdir -p "$DIR/sdist" && rm -rf "$DIR/tests" "$DIR/utils"
  ( cd "$DIR/sdist" && [ -f "transformers-$VER.tar.gz" ] || pip download -q "transformers==$VER" --no-binary :all: --no-deps )
  excl=(":(exclude)tests/models" ":(exclude)tests/fixtures" ":(exclude)tests/quantization" ":(exclude)tests/deepspeed")
  git -C "$GIT" archive "$REF" tests "${excl[@]}" utils/test_module | tar x -C "$DIR"
  git -C "$GIT" archive "$REF" tests/models/__init__.py $(for m in $MODELS; do echo tests/models/$m; done) | tar x -C "$DIR"
  tar xzf "$DIR/sdist/transformers-$VER.tar.gz" -C "$DIR/sdist" "transformers-$VER/tests"
  cp "$DIR/sdist/transformers-$VER/tests/"*.py "$DIR/tests/"           # this version's mixins win
  cp "$HERE/distributed_testing_utils.py" "$DIR/tests/"
  python "$HERE/compat.py" "$DIR" "$GIT" "$REF"                       # names the snapshot's helpers need
  mkdir -p "$DIR/src" && ln -sfn "$TFPKG" "$DIR/src/transformers"     # some helpers read the source tree
  echo "prepared $DIR (transformers $VER mixins, $(git -C "$GIT" rev-parse --short "$REF") model tests)"
  ;;
run)
  DIR="${1:?DIR}"; MODEL="${2:?MODEL}"; MODE="${3:?plain|swapped}"; shift 3
  mkdir -p "$DIR/logs"
  if [ "$MODE" = swapped ]; then cp "$HERE/conftest.py" "$DIR/conftest.py"; else rm -f "$DIR/conftest.py"; fi
  tag="$MODE"; [ "$MODE" = swapped ] && [ "${MOEKIT_SWAP_SHARE:-1}" = 0 ] && tag=swapped_copy
  cd "$DIR"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 python -m pytest -c /dev/null --rootdir=. \
    -p no:cacheprovider -q -n 0 --timeout "${TEST_TIMEOUT:-120}" -rA "tests/models/$MODEL" "$@" \
    > "logs/${MODEL}_${tag}.log" 2>&1 || true
  tail -n 2 "logs/${MODEL}_${tag}.log"
  ;;
compare)
  DIR="${1:?DIR}"; MODEL="${2:?MODEL}"; SW="${3:-swapped}"
  python "$HERE/compare.py" "$DIR/logs/${MODEL}_plain.log" "$DIR/logs/${MODEL}_${SW}.log"
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
