#!/usr/bin/env bash
# GPU validation on a machine with a GPU, in one or two calls: build fusedgauss with its CUDA
# kernels, run the whole test suite (the GPU tests included), then the GPU benchmark. Logs,
# the tests' JUnit XML, the environment and the benchmark's JSON and markdown go to OUT.
#
#   benchmarks/gpu_check.sh OUT                       build, test, benchmark
#   benchmarks/gpu_check.sh OUT build|test|bench      one stage (a later stage needs the build)
#   benchmarks/gpu_check.sh OUT test tests/test_cuda.py    arguments after the stage go to
#   benchmarks/gpu_check.sh OUT bench --quick              pytest (test) or bench_gpu.py (bench)
#
# The Triton kernels compile for tens of seconds per event size and dtype on first use; their
# cache is kept in build/triton-cache, so that a later call on the same machine reuses it
# (split the test stage by file where one call has too little time).
#
# Environment: PYTHON (python3), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (that of the visible GPU).
# Exits non-zero if any stage failed; every stage's log is kept either way.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUT [all|build|test|bench] [pytest or bench_gpu.py arguments]}
stage=${2:-all}
shift $(($# >= 2 ? 2 : 1))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
status=0

# run NAME COMMAND...: COMMAND's output to OUT/NAME.log, its end echoed here.
run() {
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
  # (whether this machine's own setuptools, which the --no-build-isolation build uses, takes
  # an SPDX project.license: 77 or later)
  "$py" -c "import setuptools; print('setuptools', setuptools.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$out/environment.txt" 2>&1

if [[ $stage == all || $stage == build ]]; then
  arch=${TORCH_CUDA_ARCH_LIST:-$("$py" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=$arch FUSEDGAUSS_FORCE_CUDA=1 \
    run build "$py" -m pip install --no-build-isolation --no-deps --no-cache-dir . || exit 1
  run info "$py" -m fusedgauss info
  # The compiled kernels at once; Triton's, which compile per op and event size, in the test stage.
  run check "$py" -m fusedgauss check --backends cuda cpu torch
fi
if [[ $stage == all || $stage == test ]]; then
  if [[ $# -eq 0 ]]; then  # once, not per file of a split test stage
    run check_triton "$py" -m fusedgauss check --backends triton
  fi
  run tests "$py" -m pytest -q -p no:cacheprovider -rs --junitxml="$out/tests.xml" "${@:-tests}"
fi
if [[ $stage == all || $stage == bench ]]; then
  run bench "$py" benchmarks/bench_gpu.py --out "$out" "$@"
  if [[ $# -eq 0 ]]; then  # the squashed and diagonal cases too, on a smaller grid
    run bench_squashed "$py" benchmarks/bench_gpu.py --out "$out" --name gpu_squashed --k 6 17 \
      --cases sac_diag sac_tril ppo_diag ppo_tril diag_normal diag_normal_shared
    # every op, the CUDA kernels against the torch backend (Triton's would compile each op anew)
    run bench_op_backends "$py" -m fusedgauss bench --device cuda --backends cuda torch \
      --json "$out/gpu_op_backends.json"
  fi
fi
exit $status
