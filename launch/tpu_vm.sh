#!/usr/bin/env bash
# Create a Cloud TPU VM (or pod slice), install edu_prm_jax on every worker, bring data, run one
# `edu-prm` command on all workers at once, and delete the VM. Every gcloud call is echoed as a
# pasteable `+ ...` line; --dry-run only echoes, so the plan can be reviewed (or tested) anywhere.
set -euo pipefail

# Builtins only (no basename/dirname), so --dry-run needs nothing but bash on PATH.
PROG=${0##*/}
_src=${BASH_SOURCE[0]}
[[ $_src == */* ]] || _src=./$_src
REPO_ROOT=$(cd -- "${_src%/*}/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND [options] [-- EDU_PRM_COMMAND [edu-prm args...]]

Subcommands:
  create    create the TPU VM, or reuse it when 'tpu-vm describe' finds it
  install   put the repo on every worker (scp, or git clone with --git-url) and pip install '.[tpu]'
  data      copy --data-src to every worker (local path: scp) or mount it (gs://bucket[/dir]: gcsfuse)
  run       run 'edu-prm ARGS' (given after --) on all workers, tee-ing output to a local log
  launch    create + install + data (when --data-src is given) + run (+ delete with --delete-after)
  delete    delete the TPU VM (same as --delete)

Required:
  --name NAME                 TPU VM name
  --zone ZONE                 e.g. us-central2-b, us-west4-a
  --accelerator-type TYPE     (create/launch) e.g. v5litepod-8, v4-32
  --version RUNTIME           (create/launch) e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite

Options:
  --project PROJECT           GCP project (default: gcloud's configured project)
  --spot | --preemptible      cheaper, interruptible capacity
  --git-url URL [--git-ref REF]  clone this on the workers instead of copying the local repo
  --repo-src DIR              local repo to copy (default: $REPO_ROOT)
  --remote-dir DIR            repo location on workers, relative to home (default: edu_prm_jax)
  --venv DIR                  virtualenv on workers, relative to home (default: edu-prm-venv)
  --data-src SRC              local path (scp) or gs://bucket[/dir] (gcsfuse mount)
  --data-dir DIR              where data lands on workers, relative to home (default: data)
  --env KEY=VALUE             export on the workers before edu-prm (repeatable)
  --log-dir DIR               local log directory (default: logs/launch)
  --delete-after              (launch) delete the VM after the run, whether it succeeded or not
  --delete                    delete the VM (alias of the delete subcommand)
  --dry-run                   print every command, run none (gcloud need not be installed)
  --assume-exists             (with --dry-run) plan as if 'describe' found the VM READY
  -h, --help                  this text

Example:
  $PROG launch --name prm --zone us-west4-a --accelerator-type v5litepod-8 \\
      --version v2-alpha-tpuv5-lite --spot --delete-after -- \\
      train --config=configs/train.py --config.rows=64 --workdir=/mnt/shared/runs/prm
EOF
}

HERE=${BASH_SOURCE[0]%/*}; [[ $HERE == "${BASH_SOURCE[0]}" ]] && HERE=.  # no dirname: runs on a bare PATH
source "$HERE/common.sh"  # die, q, qargs

# Echo then (unless dry run) execute an argv.
run_cmd() {
  printf '+ %s\n' "$(qargs "$@")"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# ---- arguments ---------------------------------------------------------------------------------
SUBCOMMAND=""
NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CAPACITY=""
GIT_URL="" GIT_REF="" REPO_SRC="$REPO_ROOT" REMOTE_DIR="edu_prm_jax" VENV="edu-prm-venv"
DATA_SRC="" DATA_DIR="data" LOG_DIR="logs/launch"
DELETE_AFTER=0 DRY_RUN=0 ASSUME_EXISTS=0
ENVS=() EDU_ARGS=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    create|install|data|run|launch|delete)
      [[ -z $SUBCOMMAND ]] || die "two subcommands given: $SUBCOMMAND and $1"
      SUBCOMMAND=$1 ;;
    --delete)
      [[ -z $SUBCOMMAND || $SUBCOMMAND == delete ]] || die "--delete cannot be combined with $SUBCOMMAND"
      SUBCOMMAND=delete ;;
    --name|--zone|--accelerator-type|--version|--project|--git-url|--git-ref|--repo-src|--remote-dir|\
    --venv|--data-src|--data-dir|--env|--log-dir)
      need_value "$@"
      case $1 in
        --name) NAME=$2 ;; --zone) ZONE=$2 ;; --accelerator-type) ACCEL=$2 ;; --version) VERSION=$2 ;;
        --project) PROJECT=$2 ;; --git-url) GIT_URL=$2 ;; --git-ref) GIT_REF=$2 ;;
        --repo-src) REPO_SRC=$2 ;; --remote-dir) REMOTE_DIR=$2 ;; --venv) VENV=$2 ;;
        --data-src) DATA_SRC=$2 ;; --data-dir) DATA_DIR=$2 ;; --log-dir) LOG_DIR=$2 ;;
        --env) [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got: $2"; ENVS+=("$2") ;;
      esac
      shift ;;
    --name=*|--zone=*|--accelerator-type=*|--version=*|--project=*|--git-url=*|--git-ref=*|--repo-src=*|\
    --remote-dir=*|--venv=*|--data-src=*|--data-dir=*|--env=*|--log-dir=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --spot) CAPACITY=--spot ;;
    --preemptible) CAPACITY=--preemptible ;;
    --delete-after) DELETE_AFTER=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --assume-exists) ASSUME_EXISTS=1 ;;
    --) shift; EDU_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[[ -n $SUBCOMMAND ]] || die "no subcommand given (create, install, data, run, launch, delete; see --help)"
[[ -n $NAME ]] || die "missing required flag --name"
[[ -n $ZONE ]] || die "missing required flag --zone"
if [[ $SUBCOMMAND == create || $SUBCOMMAND == launch ]]; then
  [[ -n $ACCEL ]] || die "missing required flag --accelerator-type (e.g. v5litepod-8, v4-32)"
  [[ -n $VERSION ]] || die "missing required flag --version (e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite)"
fi
if [[ $SUBCOMMAND == run || $SUBCOMMAND == launch ]]; then
  [[ ${#EDU_ARGS[@]} -gt 0 ]] || die "no edu-prm command given after -- (e.g. -- train --config=...)"
fi
if [[ $SUBCOMMAND == data ]]; then
  [[ -n $DATA_SRC ]] || die "missing required flag --data-src"
fi
[[ $ASSUME_EXISTS == 0 || $DRY_RUN == 1 ]] || die "--assume-exists only makes sense with --dry-run"
[[ -z $GIT_REF || -n $GIT_URL ]] || die "--git-ref needs --git-url"
if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH (install the Google Cloud SDK, or use --dry-run)"
fi

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project "$PROJECT")

ssh_all() { run_cmd "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }

# ---- steps -------------------------------------------------------------------------------------
do_create() {
  local state=""
  printf '+ %s\n' "$(qargs "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')"
  if [[ $DRY_RUN == 1 ]]; then
    [[ $ASSUME_EXISTS == 0 ]] || state=READY
  else
    state=$("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null) || state=""
  fi
  case $state in
    "")
      local cmd=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
      [[ -z $CAPACITY ]] || cmd+=("$CAPACITY")
      run_cmd "${cmd[@]}" ;;
    READY|CREATING|STARTING) echo "# TPU VM $NAME exists (state $state): skipping create" ;;
    STOPPED) echo "# TPU VM $NAME is STOPPED: starting it"; run_cmd "${GC[@]}" start "$NAME" "${LOC[@]}" ;;
    *) die "TPU VM $NAME exists in state $state; delete it first ($PROG delete --name $NAME --zone $ZONE)" ;;
  esac
}

do_install() {
  local rd venv ref_part=""
  rd=$(q "$REMOTE_DIR"); venv=$(q "$VENV")
  if [[ -n $GIT_URL ]]; then
    [[ -z $GIT_REF ]] || ref_part=" && git -C $rd checkout $(q "$GIT_REF")"
    ssh_all "rm -rf $rd && git clone $(q "$GIT_URL") $rd$ref_part"
  else
    [[ -f $REPO_SRC/setup.py ]] || die "--repo-src $REPO_SRC has no setup.py"
    ssh_all "rm -rf $rd"
    run_cmd "${GC[@]}" scp --recurse "$REPO_SRC" "$NAME:$REMOTE_DIR" "${LOC[@]}" --worker=all
  fi
  # TPU base images may lack the venv module; install it only when creating the venv fails.
  ssh_all "{ python3 -m venv $venv || { sudo apt-get update -q && sudo apt-get install -yq python3-venv \
&& python3 -m venv $venv; }; } && . $venv/bin/activate && pip install -q -U pip \
&& cd $rd && pip install -q -e '.[tpu]'"
}

do_data() {
  local dd; dd=$(q "$DATA_DIR")
  if [[ $DATA_SRC == gs://* ]]; then
    local path=${DATA_SRC#gs://} bucket only=""
    bucket=${path%%/*}
    [[ $path != */* || -z ${path#*/} ]] || only=" --only-dir $(q "${path#*/}")"
    ssh_all "command -v gcsfuse >/dev/null || { \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
&& echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -q && sudo apt-get install -yq gcsfuse; } \
&& mkdir -p $dd && { mountpoint -q $dd || gcsfuse --implicit-dirs$only $(q "$bucket") $dd; }"
  else
    [[ $DRY_RUN == 1 || -e $DATA_SRC ]] || die "--data-src $DATA_SRC does not exist"
    ssh_all "mkdir -p $dd"
    run_cmd "${GC[@]}" scp --recurse "$DATA_SRC" "$NAME:$DATA_DIR/" "${LOC[@]}" --worker=all
  fi
}

do_run() {
  local stamp log env_part="" e remote
  printf -v stamp '%(%Y%m%d-%H%M%S)T' -1
  log="$LOG_DIR/$NAME-${EDU_ARGS[0]}-$stamp.log"
  for e in "${ENVS[@]+"${ENVS[@]}"}"; do env_part+="export $(q "$e") && "; done
  # Multi-host needs nothing here: edu-prm calls jax.distributed.initialize() itself on a TPU pod.
  remote=". $(q "$VENV")/bin/activate && cd $(q "$REMOTE_DIR") && ${env_part}edu-prm $(qargs "${EDU_ARGS[@]}")"
  local cmd=("${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$remote")
  run_cmd mkdir -p "$LOG_DIR"
  printf '+ %s 2>&1 | tee -a %s\n' "$(qargs "${cmd[@]}")" "$(q "$log")"
  if [[ $DRY_RUN == 0 ]]; then
    "${cmd[@]}" 2>&1 | tee -a "$log"
  fi
}

do_delete() { run_cmd "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet; }

case $SUBCOMMAND in
  create) do_create ;;
  install) do_install ;;
  data) do_data ;;
  run) do_run ;;
  delete) do_delete ;;
  launch)
    # Delete on any exit once creation was attempted, so a failed install or run stops the billing too.
    if [[ $DELETE_AFTER == 1 ]]; then trap do_delete EXIT; fi
    do_create
    do_install
    [[ -z $DATA_SRC ]] || do_data
    do_run ;;
esac
