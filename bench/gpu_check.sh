#!/usr/bin/env bash
# The GPU checks in one go, for whoever has a CUDA machine: the CUDA tests, then the large case
# (overhead per iteration against the map, memory) and the hard-layer family on --device cuda.
#
#   bench/gpu_check.sh            # tests, large case, the whole family (budget 10 s per solver)
#   bench/gpu_check.sh --quick    # tests, large case, the family at --quick sizes
#
# Results go to $OUT (default: the current folder): gpu_tests.txt, gpu_large.json/.txt and
# gpu_family.json/.txt. Extra arguments after --quick go to the family run (e.g. --types easy).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-.}"
mkdir -p "$out"

quick=()
if [[ "${1:-}" == "--quick" ]]; then
    quick=(--quick)
    shift
fi

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

status=0
echo "== CUDA tests"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.txt" || status=1

echo "== large case on cuda (overhead and memory)"
python bench/deq_suite.py --device cuda --cases large "${quick[@]}" --json "$out/gpu_large.json" \
    2>&1 | tee "$out/gpu_large.txt" || status=1

echo "== the hard-layer family on cuda"
python bench/deq_suite.py --family --device cuda --budget "${BUDGET:-10}" "${quick[@]}" "$@" \
    --json "$out/gpu_family.json" 2>&1 | tee "$out/gpu_family.txt" || status=1

exit "$status"
