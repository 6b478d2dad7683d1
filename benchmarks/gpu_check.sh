#!/usr/bin/env bash
# The GPU checks of --cuda, as one run on a machine with a CUDA device and PyTorch:
#   1. the CUDA tests (transfers; every test recipe on the GPU against the CPU),
#   2. linear and slerp merges of the large benchmark models on the CPU and on the GPU,
#      compared in units of the last place (benchmarks/compare_outputs.py),
#   3. the benchmark of the large models with --cuda, then on the CPU, same machine.
# Each step's output goes to $OUT (default /tmp/gpu_check) as it finishes, so a run cut
# short still reports the steps it did. Python packages the machine lacks can be put as
# wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)" \
    | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_cuda_merge.py \
    2>&1 | tee "$OUT/tests.log"

tool=/tmp/mergekit-yaml  # this tree's command line, whatever is installed
printf '#!/bin/sh\nexec python3 -m mergekit.cli.yaml_cmd "$@"\n' > "$tool"
chmod +x "$tool"
python3 benchmarks/bench.py --size large --runs 1 --warmup 0 --methods linear --tool "$tool" \
    > /dev/null 2>&1  # builds the models once
models=benchmarks/.cache/large
for method in linear slerp; do
    if [ "$method" = linear ]; then
        recipe="merge_method: linear
dtype: bfloat16
models:
  - {model: $models/a, parameters: {weight: 0.4}}
  - {model: $models/b, parameters: {weight: 0.3}}
  - {model: $models/c, parameters: {weight: 0.3}}"
    else
        recipe="merge_method: slerp
base_model: $models/a
dtype: bfloat16
models: [{model: $models/a}, {model: $models/b}]
parameters: {t: 0.4}"
    fi
    echo "$recipe" > "/tmp/$method.yml"
    rm -rf "/tmp/$method-cpu" "/tmp/$method-cuda"
    { /usr/bin/time -f "$method cpu %e s" "$tool" "/tmp/$method.yml" "/tmp/$method-cpu" -q
      /usr/bin/time -f "$method cuda %e s" "$tool" "/tmp/$method.yml" "/tmp/$method-cuda" -q --cuda
      python3 benchmarks/compare_outputs.py "/tmp/$method-cpu" "/tmp/$method-cuda" | tail -3
    } 2>&1 | tee -a "$OUT/compare.log"
    rm -rf "/tmp/$method-cpu" "/tmp/$method-cuda"
done

python3 benchmarks/bench.py --size large --runs 3 --cuda --tool "$tool" \
    --output "$OUT/bench-cuda.md" 2>&1 | tail -12
python3 benchmarks/bench.py --size large --runs 3 --tool "$tool" \
    --output "$OUT/bench-cpu.md" 2>&1 | tail -12
