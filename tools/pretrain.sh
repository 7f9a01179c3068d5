#!/usr/bin/env bash
# Launch MoCo pretraining with torchrun (env://): one node or many, GPUs (NCCL) or CPU processes (gloo).
#
#   tools/pretrain.sh [--gpus-per-node N | --nproc N] [--nodes N] [--node-rank R] [--master-addr A] \
#                     [--master-port P] --config configs/pretrain/moco_v2.yaml [--resume auto] [key=value ...]
#
# --nproc is --gpus-per-node under another name, for CPU runs (e.g. --nproc 2 run.device=cpu).
# --launcher slurm [--partition P --time MIN --account A --constraint C --dry-run] submits one SLURM job
# (submitit; requeued with --resume auto on preemption / time-out) instead of running torchrun here.
# Everything that is not a launcher flag goes to tools/train_moco.py unchanged.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

nproc=""; nodes=1; node_rank=0; master_addr=127.0.0.1; master_port=29500; launcher=local
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --launcher) launcher="$2"; shift 2 ;;
    --gpus-per-node|--nproc) nproc="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ "$launcher" == slurm ]]; then  # submit from here; SLURM starts one process per GPU on every node
  exec "$PYTHON" "$HERE/train_moco.py" --launcher slurm --nodes "$nodes" --gpus-per-node "${nproc:-8}" "${args[@]}"
fi
if [[ -z "$nproc" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then nproc="$(nvidia-smi -L | wc -l)"; else nproc=1; fi
  [[ "$nproc" -ge 1 ]] || nproc=1
fi

# Each rank's output is teed into a log folder, so that when a rank fails its first error line can be
# shown last, below torchrun's summary (which otherwise buries it).
logdir="$(mktemp -d "${TMPDIR:-/tmp}/pretrain_ranks.XXXXXX")"
set +e
"$PYTHON" -m torch.distributed.run \
  --nnodes="$nodes" --node-rank="$node_rank" --nproc-per-node="$nproc" \
  --master-addr="$master_addr" --master-port="$master_port" --log-dir="$logdir" --tee=3 \
  "$HERE/train_moco.py" "${args[@]}"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  # lowest local rank first; an error line is ours ("error: ...") or a Python exception's last line
  while IFS= read -r f; do
    line="$(grep -m1 -E '^(error: |[A-Za-z_][A-Za-z0-9_.]*(Error|Exception)(: |$))' "$f" || true)"
    if [[ -n "$line" ]]; then
      rank="$(basename "$(dirname "$f")")"
      echo "pretrain.sh: local rank $rank failed first with: $line (all rank logs: $logdir)" >&2
      break
    fi
  done < <(find "$logdir" -name stderr.log | sort -t/ -k1,1 -V)
else
  rm -rf "$logdir"
fi
exit $rc
