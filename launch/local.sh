#!/usr/bin/env bash
# Multi-process run on this machine over loopback (tests, debugging):
#
#   launch/local.sh N -- <python -m dlm.main args>
#
# starts N `python -m dlm.main ARGS --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i` (PORT: a free loopback port). Process 0 writes to this script's stdout/stderr
# unchanged; process i > 0's lines go to stderr prefixed `[i] `. If one process fails the others
# are stopped, and the script exits with the first non-zero code; SIGTERM / SIGINT to the script
# are forwarded to every process (each checkpoints and exits 0, as a single run does).
#
# Devices: DLM_LOCAL_DEVICES = CPU devices over all processes (default: the count JAX_NUM_CPU_DEVICES
# or XLA_FLAGS' --xla_force_host_platform_device_count gives one process, else N); each process
# gets DLM_LOCAL_DEVICES / N. With NVIDIA GPUs (and JAX_PLATFORMS not cpu) each process sees its
# own equal share of CUDA_VISIBLE_DEVICES. DLM_PYTHON: the interpreter (default: python).
set -u

usage() { echo "usage: $0 N -- <dlm.main args>" >&2; exit 2; }
[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 == -- ]] || usage
n=$1
shift 2
python=${DLM_PYTHON:-python}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # dlm importable from any directory

# Devices per process.
total=${DLM_LOCAL_DEVICES:-}
if [[ -z $total ]]; then
  if [[ -n ${JAX_NUM_CPU_DEVICES:-} ]]; then
    total=$JAX_NUM_CPU_DEVICES
  else
    total=$(grep -o -- '--xla_force_host_platform_device_count=[0-9]*' <<<"${XLA_FLAGS:-}" |
            tail -n 1 | cut -d= -f2)
    total=${total:-$n}
  fi
fi
if ! [[ $total =~ ^[1-9][0-9]*$ ]] || (( total % n )); then
  echo "error: DLM_LOCAL_DEVICES=$total devices do not split over $n processes" >&2
  exit 2
fi
export JAX_NUM_CPU_DEVICES=$((total / n))  # takes precedence over XLA_FLAGS' device count

gpus=()
if [[ ${JAX_PLATFORMS:-} != cpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
  else
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
  fi
  if (( ${#gpus[@]} % n )); then
    echo "error: ${#gpus[@]} GPUs do not split over $n processes" >&2
    exit 2
  fi
fi

pids=()
stopped=''  # the signal received, if any
sent=0  # processes started when it was forwarded
cleanup() {  # stop whatever still runs (a failure elsewhere, or the script itself ending)
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
forward() {  # SIGTERM / SIGINT: every process checkpoints and exits
  stopped=$1
  sent=${#pids[@]}
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || exit 1

for ((i = 0; i < n && ${#stopped} == 0; i++)); do
  env_gpu=()
  if (( ${#gpus[@]} )); then
    k=$((${#gpus[@]} / n))
    share=$(IFS=,; echo "${gpus[*]:$((i * k)):$k}")
    env_gpu=(CUDA_VISIBLE_DEVICES="$share")
  fi
  args=("$@" "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i")
  if (( i == 0 )); then
    env "${env_gpu[@]}" "$python" -m dlm.main "${args[@]}" &
  else
    # The prefixing pipe runs in a subshell: its own pid is the one to signal (exec), and
    # sed ends with the process's output.
    (exec env "${env_gpu[@]}" "$python" -m dlm.main "${args[@]}" \
       > >(sed -u "s/^/[$i] /" >&2) 2>&1) &
  fi
  pids+=($!)
done
if [[ -n $stopped ]]; then  # a signal came while processes were starting: they get it too
  for pid in "${pids[@]:sent}"; do kill "-$stopped" "$pid" 2>/dev/null; done
fi

# Wait for each process to end, in whatever order; the first failure stops the rest.
status=0
left=${#pids[@]}
while (( left > 0 )); do
  wait -n -p done_pid
  code=$?
  if [[ -z ${done_pid:-} ]]; then  # a trapped signal interrupted wait: keep waiting
    continue
  fi
  left=$((left - 1))
  if (( code != 0 && status == 0 )); then
    status=$code
    echo "launch/local.sh: a process exited with code $code; stopping the others" >&2
    cleanup
  fi
  done_pid=
done
exit "$status"
