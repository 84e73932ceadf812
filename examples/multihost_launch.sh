#!/usr/bin/env bash
# SLIDE training laid out on a mesh (slidejax.train.fit with TrainConfig(mesh=...)) on one or
# several processes.
#
#   one process, all local devices:
#     examples/multihost_launch.sh single data=1,model=8
#   N local CPU processes with D devices each (gloo collectives; tries the multi-host path):
#     examples/multihost_launch.sh cpu 2 2 data=2,model=2
#   several hosts: run on every host i = 0..n-1 (process 0's host is the coordinator):
#     JAX_COORDINATOR_ADDRESS=host0:12355 JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i \
#       examples/multihost_launch.sh host data=2,model=8
#
# Every process runs the same program on the same data and seed; the mesh spans the devices
# of all processes. PRESET (synthetic data, default: default), EPOCHS (default: auto),
# TIME_BUDGET (seconds of training, default: none), CHECKPOINT (a directory every process
# sees) and RESUME=1 apply.
set -euo pipefail
mode=${1:?usage: $0 single|cpu|host ...}
shift
PRESET=${PRESET:-default}
EPOCHS=${EPOCHS:-auto}
TIME_BUDGET=${TIME_BUDGET:-}

run_one() {  # run_one MESH [CPU_DEVICES]  (distributed when JAX_NUM_PROCESSES is set)
  python - "$@" <<'PY'
import os, sys, json
from slidejax import distributed as dist
mesh, cpu = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
if "JAX_NUM_PROCESSES" in os.environ:
  dist.initialize_distributed(cpu_devices=cpu)
else:   # CPU devices for the mesh (and one spare for host callbacks); GPUs are unaffected
  from slidejax._cli_train import provide_cpu_devices
  provide_cpu_devices(mesh)
import jax
from slidejax import data as xcdata
from slidejax.train import TrainConfig, fit
train, test = xcdata.synthesize_split(**xcdata.SYNTH_PRESETS[os.environ.get("PRESET", "default")],
                                      seed=0)
budget, epochs = os.environ.get("TIME_BUDGET"), os.environ.get("EPOCHS", "auto")
config = TrainConfig(mesh=mesh, epochs=epochs if epochs == "auto" else int(epochs),
                     time_budget=float(budget) if budget else None)
first = jax.process_index() == 0
result = fit(config, train, test, checkpoint_dir=os.environ.get("CHECKPOINT") or None,
             resume=os.environ.get("RESUME") == "1", progress=first,
             log=print if first else (lambda message: None))
if first:
  keep = ("p@1", "p@3", "p@5", "ndcg@5", "train_seconds", "samples_per_second", "steps",
          "rebuilds")
  print(json.dumps({k: result[k] for k in keep}, indent=1))
PY
}

export PRESET EPOCHS TIME_BUDGET
case "$mode" in
  single) run_one "${1:?mesh, e.g. data=1,model=8}" ;;
  host) run_one "${1:?mesh, e.g. data=2,model=8}" ;;
  cpu)
    nproc=${1:?number of processes}; ndev=${2:?devices per process}; mesh=${3:?mesh}
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pids=()
    for ((i = 0; i < nproc; i++)); do
      JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$nproc JAX_PROCESS_ID=$i \
        run_one "$mesh" "$ndev" &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status ;;
  *) echo "unknown mode $mode (single|cpu|host)" >&2; exit 2 ;;
esac
