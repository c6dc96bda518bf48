#!/usr/bin/env bash
# The GPU measurements of kdprune in one command, written to one markdown file (default gpu_check.md):
#   1. trainer throughput at batch 128, 90% masked students: eager, compiled forwards (compile=true) and the
#      whole step in one graph (compile=step), bf16, for ResNet-56, ResNet-20, ResNet-18 and KD 56→20, plus the
#      dense whole step (masked vs dense), and the rates file of `kdprune-estimate --rates` (gpu_rates.json);
#   2. the CA-KLD scoring pass against one fine-tuning epoch, CIFAR- and TinyImageNet-shaped;
#   3. aggregate throughput of 1, 2, 4 and 8 quickstart-sized CIFAR jobs on the one GPU through the Ray launcher
#      (needs `pip install '.[ray]'`);
#   4. structured pruning latency: dense against exported channel-pruned models (50% of the MACs, batch 1024).
# Each part runs under its own time limit (seconds below, 480 in all) and says in the file when it was cut
# short, so a slow part costs its own rows, not the others'. The jobs part runs small jobs (5,000 images, 3
# retraining epochs) to fit; `python scripts/bench_jobs.py` alone runs the full-size ones (and --mps).
#
#   scripts/gpu_check.sh [OUT.md]            # on a machine with a CUDA GPU, from the repository root
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
set -u
out=${1:-gpu_check.md}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $py" >&2
    exit 2
fi
if ! "$py" -c "import kdprune_cli" 2>/dev/null; then
    "$py" -m pip install -q --no-deps -e . || { echo "gpu_check: cannot install kdprune" >&2; exit 2; }
fi
rates=$(dirname "$out")/gpu_rates.json

part() {  # part TITLE SECONDS COMMAND...: a section of the file with the command's output, cut at SECONDS
    local title=$1 limit=$2
    shift 2
    echo "## $title" >>"$out"
    echo >>"$out"
    echo "\`$*\`" >>"$out"
    echo >>"$out"
    local start=$SECONDS
    timeout "$limit" "$@" 2>"$out.err" | grep -v '^\s*$' >>"$out"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then
        echo "(cut short at its ${limit} s limit: the rows above are all it measured)" >>"$out"
    elif [ "$rc" != 0 ]; then
        echo "(failed, exit $rc: $(tail -n 3 "$out.err" | tr '\n' ' '))" >>"$out"
    fi
    echo "($((SECONDS - start)) s)" >>"$out"
    echo >>"$out"
    echo "$title: done in $((SECONDS - start)) s (exit $rc)"
}

{
    echo "# kdprune GPU check"
    echo
    "$py" -c "import torch, datetime; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, {datetime.date.today()}')"
    echo
} >"$out"
part "Trainer throughput, 90% masked (scripts/bench_train.py)" 170 \
    "$py" scripts/bench_train.py --steps 50 --modes eager compiled step --rates "$rates" --rates-mode step
part "Trainer throughput, dense whole step (scripts/bench_train.py --sparsity 0)" 60 \
    "$py" scripts/bench_train.py --steps 50 --sparsity 0 --modes step
part "CA-KLD scoring pass vs one fine-tuning epoch (scripts/bench_score.py)" 70 \
    "$py" scripts/bench_score.py --batches 40
part "Jobs per GPU through the Ray launcher (scripts/bench_jobs.py)" 150 \
    "$py" scripts/bench_jobs.py --jobs 1,2,4,8 --images 5000 --dense-epochs 1 --retrain-epochs 3
part "Structured pruning latency, bf16 (scripts/bench_structured.py)" 30 \
    "$py" scripts/bench_structured.py --device cuda --batches 1024 --ratios 0.5 --iters 50
rm -f "$out.err"
echo "written: $out (rates: $rates)"
