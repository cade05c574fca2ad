#!/usr/bin/env bash
# Run one `edu-prm` command on a GPU host, here or over ssh: make a venv, pip install '.[cuda12]' (or
# cuda13), then start one or more processes with the JAX multi-process variables set. Every command is
# echoed as a pasteable `+ ...` line; --dry-run only echoes.
set -euo pipefail

# Builtins only (no basename/dirname), so --dry-run needs nothing but bash on PATH.
PROG=${0##*/}
_src=${BASH_SOURCE[0]}
[[ $_src == */* ]] || _src=./$_src
REPO_ROOT=$(cd -- "${_src%/*}/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG [options] -- EDU_PRM_COMMAND [edu-prm args...]

Where:
  --host USER@HOST        run over ssh (default: this machine)
  --ssh-opt OPT           extra ssh option, e.g. --ssh-opt=-p2222 (repeatable)
  --repo-dir DIR          repo on the target (default: $REPO_ROOT here; edu_prm_jax, i.e. under
                          the remote home, with --host or --git-url)
  --git-url URL [--git-ref REF]  clone/update this on the target instead of rsync-ing the local repo
  --no-sync               (with --host) use the repo already on the target as it is

Install:
  --cuda 12|13            which JAX CUDA wheels: pip install -e '.[cuda12]' or '.[cuda13]' (default 12)
  --venv DIR              virtualenv, relative to the repo dir unless absolute (default: .venv-edu-prm)
  --python PY             interpreter that creates the venv (default: python3)
  --skip-install          reuse the venv as it is

Run:
  --mem-fraction F        XLA_PYTHON_CLIENT_MEM_FRACTION (default: \$XLA_PYTHON_CLIENT_MEM_FRACTION or 0.90;
                          JAX's own 0.75 leaves memory idle when one process owns each GPU)
  --num-processes N       processes on this host (default 1); each gets its own GPUs through
                          CUDA_VISIBLE_DEVICES and the variables below
  --gpus-per-process K    GPUs per process when N > 1 (default 1): process i gets GPUs i*K .. i*K+K-1
  --num-hosts H           hosts taking part (default 1); run this script once per host
  --host-index I          this host's index, 0 .. H-1 (default 0)
  --coordinator ADDR:PORT process 0's address, reachable from every host (required when H > 1;
                          default localhost:12355 on one host)
  --env KEY=VALUE         export before edu-prm (repeatable)
  --log-dir DIR           local log directory (default: logs/launch)
  --dry-run               print every command, run none
  -h, --help              this text

Multi-process variables, set per process when N*H > 1 (edu-prm passes them to jax.distributed.initialize):
  JAX_COORDINATOR_ADDRESS=ADDR:PORT  JAX_NUM_PROCESSES=N*H  JAX_PROCESS_ID=I*N+i  CUDA_VISIBLE_DEVICES=...

Example:
  $PROG --host me@gpu-box --cuda 12 -- train --config=configs/train.py --workdir=/scratch/runs/prm
EOF
}

HERE=${BASH_SOURCE[0]%/*}; [[ $HERE == "${BASH_SOURCE[0]}" ]] && HERE=.  # no dirname: runs on a bare PATH
source "$HERE/common.sh"  # die, q, qargs

# ---- arguments ---------------------------------------------------------------------------------
HOST="" REPO_DIR="" GIT_URL="" GIT_REF="" SYNC=1
CUDA=12 VENV=".venv-edu-prm" PY=python3 INSTALL=1
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
NPROC=1 GPUS_PER_PROC="" NHOSTS=1 HOST_INDEX=0 COORD="" LOG_DIR="logs/launch" DRY_RUN=0
SSH_OPTS=() ENVS=() EDU_ARGS=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --host|--ssh-opt|--repo-dir|--git-url|--git-ref|--cuda|--venv|--python|--mem-fraction|--num-processes|\
    --gpus-per-process|--num-hosts|--host-index|--coordinator|--env|--log-dir)
      need_value "$@"
      case $1 in
        --host) HOST=$2 ;; --ssh-opt) SSH_OPTS+=("$2") ;; --repo-dir) REPO_DIR=$2 ;;
        --git-url) GIT_URL=$2 ;; --git-ref) GIT_REF=$2 ;; --cuda) CUDA=$2 ;; --venv) VENV=$2 ;;
        --python) PY=$2 ;; --mem-fraction) MEM_FRACTION=$2 ;; --num-processes) NPROC=$2 ;;
        --gpus-per-process) GPUS_PER_PROC=$2 ;; --num-hosts) NHOSTS=$2 ;; --host-index) HOST_INDEX=$2 ;;
        --coordinator) COORD=$2 ;; --log-dir) LOG_DIR=$2 ;;
        --env) [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got: $2"; ENVS+=("$2") ;;
      esac
      shift ;;
    --host=*|--ssh-opt=*|--repo-dir=*|--git-url=*|--git-ref=*|--cuda=*|--venv=*|--python=*|--mem-fraction=*|\
    --num-processes=*|--gpus-per-process=*|--num-hosts=*|--host-index=*|--coordinator=*|--env=*|--log-dir=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --no-sync) SYNC=0 ;;
    --skip-install) INSTALL=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EDU_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[[ ${#EDU_ARGS[@]} -gt 0 ]] || die "no edu-prm command given after -- (e.g. -- train --config=...)"
[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda must be 12 or 13, got: $CUDA"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction must be in (0, 1], got: $MEM_FRACTION"
is_uint "$NPROC" && ((NPROC >= 1)) || die "--num-processes must be a positive integer, got: $NPROC"
is_uint "$NHOSTS" && ((NHOSTS >= 1)) || die "--num-hosts must be a positive integer, got: $NHOSTS"
is_uint "$HOST_INDEX" && ((HOST_INDEX < NHOSTS)) || die "--host-index must be in 0..$((NHOSTS - 1)), got: $HOST_INDEX"
[[ -z $GPUS_PER_PROC ]] || { is_uint "$GPUS_PER_PROC" && ((GPUS_PER_PROC >= 1)); } \
  || die "--gpus-per-process must be a positive integer, got: $GPUS_PER_PROC"
if ((NHOSTS > 1)) && [[ -z $COORD ]]; then
  die "missing required flag --coordinator (ADDR:PORT of host 0) when --num-hosts > 1"
fi
[[ -n $COORD ]] || COORD=localhost:12355
[[ -z $GIT_REF || -n $GIT_URL ]] || die "--git-ref needs --git-url"
[[ -n $HOST || $SYNC == 1 ]] || die "--no-sync only applies with --host"
[[ -n $REPO_DIR ]] || { if [[ -n $HOST || -n $GIT_URL ]]; then REPO_DIR=edu_prm_jax; else REPO_DIR=$REPO_ROOT; fi; }

# Echo then (unless dry run) execute an argv here.
run_local() {
  printf '+ %s\n' "$(qargs "$@")"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# The argv that runs shell text on the target; printed as `( text )` when local so pasting it
# leaves the caller's shell where it was.
target_argv() {
  if [[ -n $HOST ]]; then TARGET=(ssh "${SSH_OPTS[@]+"${SSH_OPTS[@]}"}" "$HOST" "$1"); else TARGET=(bash -c "$1"); fi
}
shown() { if [[ -n $HOST ]]; then qargs "${TARGET[@]}"; else printf '( %s )' "$1"; fi; }

on_target() {
  target_argv "$1"
  printf '+ %s\n' "$(shown "$1")"
  if [[ $DRY_RUN == 0 ]]; then "${TARGET[@]}"; fi
}

RD=$(q "$REPO_DIR")
# Everything runs from the repo dir, so a relative --venv and relative config paths resolve there.
ACTIVATE="cd $RD && . $(q "$VENV")/bin/activate"

# ---- repo --------------------------------------------------------------------------------------
if [[ -n $GIT_URL ]]; then
  update="git -C $RD pull --ff-only"
  [[ -z $GIT_REF ]] || update="git -C $RD fetch --all --tags && git -C $RD checkout $(q "$GIT_REF")"
  on_target "if [ -d $RD/.git ]; then $update; else git clone $(q "$GIT_URL") $RD${GIT_REF:+ && git -C $RD checkout $(q "$GIT_REF")}; fi"
elif [[ -n $HOST && $SYNC == 1 ]]; then
  [[ -f $REPO_ROOT/setup.py ]] || die "$REPO_ROOT has no setup.py to sync"
  ssh_e=""
  [[ ${#SSH_OPTS[@]} -eq 0 ]] || ssh_e="ssh $(qargs "${SSH_OPTS[@]}")"
  rsync_cmd=(rsync -az --delete --exclude=.git/ --exclude='.venv*/' --exclude=__pycache__/ --exclude='*.egg-info/'
             --exclude=logs/)
  [[ -z $ssh_e ]] || rsync_cmd+=(-e "$ssh_e")
  run_local "${rsync_cmd[@]}" "$REPO_ROOT/" "$HOST:$REPO_DIR/"
elif [[ -z $HOST && $DRY_RUN == 0 && ! -f $REPO_DIR/setup.py ]]; then
  die "--repo-dir $REPO_DIR has no setup.py"
fi

# ---- install -----------------------------------------------------------------------------------
if [[ $INSTALL == 1 ]]; then
  on_target "cd $RD && { [ -x $(q "$VENV")/bin/python ] || $(q "$PY") -m venv $(q "$VENV"); } \
&& . $(q "$VENV")/bin/activate && pip install -q -U pip && pip install -q -e '.[cuda$CUDA]'"
fi

# ---- run ---------------------------------------------------------------------------------------
printf -v STAMP '%(%Y%m%d-%H%M%S)T' -1
run_local mkdir -p "$LOG_DIR"
base="$ACTIVATE && export XLA_PYTHON_CLIENT_MEM_FRACTION=$(q "$MEM_FRACTION")"
for e in "${ENVS[@]+"${ENVS[@]}"}"; do base+=" && export $(q "$e")"; done
EDU="edu-prm $(qargs "${EDU_ARGS[@]}")"
LOG_BASE="$LOG_DIR/${HOST:+${HOST#*@}-}${EDU_ARGS[0]}-$STAMP"
TOTAL=$((NPROC * NHOSTS))

if ((TOTAL == 1)); then
  text="$base && $EDU"
  target_argv "$text"
  printf '+ %s 2>&1 | tee -a %s\n' "$(shown "$text")" "$(q "$LOG_BASE.log")"
  if [[ $DRY_RUN == 0 ]]; then "${TARGET[@]}" 2>&1 | tee -a "$LOG_BASE.log"; fi
  exit 0
fi

# Several processes: each one its own log; process 0 also streams to the terminal.
K=${GPUS_PER_PROC:-1}
PIDS=()
trap 'if ((${#PIDS[@]})); then kill "${PIDS[@]}" 2>/dev/null || true; fi' INT TERM
for ((i = 0; i < NPROC; i++)); do
  gpus=""
  if ((NPROC > 1)); then  # one process per host keeps every GPU
    gpus="CUDA_VISIBLE_DEVICES=$((i * K))"
    for ((g = i * K + 1; g < i * K + K; g++)); do gpus+=",$g"; done
    gpus+=" "
  fi
  pid=$((HOST_INDEX * NPROC + i))
  text="$base && ${gpus}JAX_COORDINATOR_ADDRESS=$(q "$COORD") JAX_NUM_PROCESSES=$TOTAL \
JAX_PROCESS_ID=$pid $EDU"
  log="$LOG_BASE-p$pid.log"
  target_argv "$text"
  if ((i == 0)); then
    printf '+ %s 2>&1 | tee -a %s &\n' "$(shown "$text")" "$(q "$log")"
    if [[ $DRY_RUN == 0 ]]; then "${TARGET[@]}" 2>&1 | tee -a "$log" & PIDS+=($!); fi
  else
    printf '+ %s >> %s 2>&1 &\n' "$(shown "$text")" "$(q "$log")"
    if [[ $DRY_RUN == 0 ]]; then "${TARGET[@]}" >>"$log" 2>&1 & PIDS+=($!); fi
  fi
done
echo "+ wait"
status=0
for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" || status=$?; done
exit "$status"
