#!/usr/bin/env bash
# The paper's CIFAR-10 / ResNet-18 protocol end to end on one GPU, timed, with its tables kept.
#
#   scripts/paper_scale.sh --data-root DATA                  # probe the speeds, then 350 epochs + 50 checkpoints
#   scripts/paper_scale.sh --data-root DATA --precision bf16 --compile
#   scripts/paper_scale.sh --data-root DATA --skip-probe     # the run alone
#   scripts/paper_scale.sh --tiny                            # a dry run of every step, on the CPU in a minute
#
# 1. probe: train.py for a few epochs in each mode (eager and --compile where CUDA is present, fp32 and
#    bf16), each in its own scratch folder under runs/probe/, and prints seconds per epoch (the first
#    epoch, which compiles, left out) with the first epochs' training losses, which must agree between
#    eager and compiled runs of one precision;
# 2. run: train.py with the protocol's defaults (plus --precision/--compile/extra flags), then validate_nc.py;
# 3. keep: the run's tables (config.json, log.csv, summary.json, nc_metrics.csv, tpt_table.md) and
#    timings.txt in --results (default results/<run name>/), from which `python plotting.py panel DIR`
#    redraws the figures, and the panel in docs/; with $OUT set, all of it in $OUT/paper_scale.tar.gz.
# Extra flags after `--` go to train.py and validate_nc.py alike: the flags that select the run.
set -euo pipefail
cd "$(dirname "$0")/.."

data_root=data
precision=fp32
compile=""
results=""
tiny=""
probe=1
probe_epochs=4
extra=()
train_only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-root) data_root=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --compile) compile=--compile; shift ;;
    --results) results=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --skip-probe) probe=""; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
  esac
done

dataset=(--dataset CIFAR10 --data-root "$data_root")
if [ -n "$tiny" ]; then  # every step on the CPU: the synthetic data, a narrow network, a few epochs
  dataset=(--dataset synthetic)
  extra+=(--width 4 --samples-per-class 20 --epochs 3)
  train_only=(--num-checkpoints 3)
  probe_epochs=2
fi
selection=("${dataset[@]}" --precision "$precision" "${extra[@]}")
cuda=$(python -c "import torch; print(int(torch.cuda.is_available()))")
seconds() { python -c "import time; print(f'{time.time():.1f}')"; }
say() { echo "[paper_scale $(date +%H:%M:%S)] $*"; }

say "torch $(python -c 'import torch; print(torch.__version__)'), device: $(python -c \
  'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')"

# 1. probe
modes=()
[ -n "$probe" ] && modes=("fp32 eager" "bf16 eager")
[ -n "$probe" ] && [ "$cuda" = 1 ] && modes+=("fp32 compile" "bf16 compile")
rm -rf runs/probe && mkdir -p runs/probe
for mode in "${modes[@]}"; do
  set -- $mode
  flag=$([ "$2" = compile ] && echo --compile || true)
  probe_dir=runs/probe/$1-$2
  python train.py "${dataset[@]}" "${extra[@]}" --precision "$1" $flag --epochs "$probe_epochs" \
    --num-checkpoints 1 --run-dir "$probe_dir" > "$probe_dir.log" 2>&1 || { cat "$probe_dir.log"; exit 1; }
  python - "$probe_dir" "$mode" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/log.csv")))
steady = [float(row["seconds"]) for row in rows[1:]] or [float(rows[0]["seconds"])]
losses = " ".join(f"{float(row['train_loss']):.4f}" for row in rows)
print(f"probe {sys.argv[2]:>13}: {sum(steady) / len(steady):6.2f} s/epoch after the first "
      f"({float(rows[0]['seconds']):.1f} s); train losses {losses}")
EOF
done

# 2. run
started=$(seconds)
say "training: python train.py ${selection[*]} ${train_only[*]} $compile"
python train.py "${selection[@]}" "${train_only[@]}" $compile
trained=$(seconds)
run_dir=$(python - "${selection[@]}" <<'EOF'
import sys
import config
from errors import ArgumentParser
parser = ArgumentParser(None)
config.add_selection_arguments(parser)
args, _ = parser.parse_known_args(sys.argv[1:])
print(config.default_run_dir(config.resolve_config(args), args))
EOF
)
say "validating $run_dir"
python validate_nc.py "${selection[@]}" --plots-dir "$run_dir/plots"
validated=$(seconds)

# 3. keep
results=${results:-results/$(basename "$run_dir")}
mkdir -p "$results" docs
for name in config.json log.csv summary.json nc_metrics.csv; do cp "$run_dir/$name" "$results/"; done
cp "$run_dir/plots/tpt_table.md" "$results/"
{
  echo "command: scripts/paper_scale.sh --data-root $data_root --precision $precision $compile ${extra[*]}"
  echo "torch: $(python -c 'import torch; print(torch.__version__)')"
  echo "device: $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')"
  python -c "print(f'training: {$trained - $started:.0f} s'); print(f'validation: {$validated - $trained:.0f} s')"
} > "$results/timings.txt"
panel=docs/$(basename "$results")_panel.png
[ -n "$tiny" ] && panel=$results/panel.png
python plotting.py panel "$results" --out "$panel"
cat "$results/timings.txt" "$results/tpt_table.md"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/paper_scale.tar.gz" "$results" "$panel" "$run_dir/plots" runs/probe
  say "packed $OUT/paper_scale.tar.gz"
fi
