# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by the launch scripts (sourced, never run): options and their defaults, the
# accelerator-type table, and the helpers that print (--dry_run) or run every command.
#
# Written for bash >= 3.2 (the macOS /bin/bash): no associative arrays, no mapfile, and empty
# arrays expanded as ${a[@]+"${a[@]}"} so that `set -u` accepts them.

LAUNCH_DIR=$(cd "${BASH_SOURCE[0]%/*}" && pwd)  # the scripts source this by a path with a /
REPO_ROOT=${LAUNCH_DIR%/*}
SCRIPT=${0##*/}

# Where things live on each worker, relative to the login user's home directory.
REMOTE_DIR=bigbigan_jax           # the checkout the trainer runs from
REMOTE_TARBALL=bigbigan_jax.tar.gz
REMOTE_LOG=bigbigan_train.log     # one per worker: each worker is its own VM
REMOTE_PID=bigbigan_train.pid

NAME=${BIGBIGAN_NAME:-}
ZONE=${BIGBIGAN_ZONE:-}
PROJECT=${BIGBIGAN_PROJECT:-}
ACCELERATOR=${BIGBIGAN_ACCELERATOR:-v3-32}
VERSION=${BIGBIGAN_VERSION:-}     # empty: the default for the accelerator's generation
CONFIG=${BIGBIGAN_CONFIG:-}
WORKDIR=${BIGBIGAN_WORKDIR:-}
DATA_DIR=${BIGBIGAN_DATA_DIR:-}
REPO=${BIGBIGAN_REPO:-$REPO_ROOT}
REF=${BIGBIGAN_REF:-}
WORKER=0
SPOT=false
PREEMPTIBLE=false
YES=false
DRY_RUN=false
TRAINER_FLAGS=()

common_options_help() {
  cat <<EOF
Options (each may also be given as --option VALUE; defaults from the environment):
  --name=NAME          TPU slice name                                  [\$BIGBIGAN_NAME]
  --zone=ZONE          e.g. europe-west4-a, us-central2-b              [\$BIGBIGAN_ZONE]
  --project=PROJECT    Google Cloud project; empty uses gcloud's own   [\$BIGBIGAN_PROJECT]
  --accelerator=TYPE   v2-N, v3-N, v4-N, v5p-N (N TensorCores), v5litepod-N, v6e-N (N chips)
                       default v3-32                                   [\$BIGBIGAN_ACCELERATOR]
  --version=RUNTIME    TPU software version; default by generation:
                       v2/v3/v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                       v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e         [\$BIGBIGAN_VERSION]
  --spot, --preemptible  create a Spot (or legacy preemptible) slice
  --repo=PATH_OR_URL   checkout to install: a local folder (copied with scp) or a git URL
                       (cloned on each worker); default this checkout  [\$BIGBIGAN_REPO]
  --ref=REF            with a git URL: the branch, tag or commit       [\$BIGBIGAN_REF]
  --config=FILE        trainer config, relative to the repo root, e.g.
                       configs/bigbigan_resnet50.py                    [\$BIGBIGAN_CONFIG]
  --workdir=DIR        checkpoints, TensorBoard events, samples; gs://... on pods
                                                                       [\$BIGBIGAN_WORKDIR]
  --data_dir=DIR       tensorflow-datasets data_dir, e.g. gs://BUCKET/tensorflow_datasets
                       (becomes --config.data.data_dir)                [\$BIGBIGAN_DATA_DIR]
  --worker=N           the worker whose log 'logs' streams; default 0
  --yes                delete without asking
  --dry_run            print every command (gcloud included) instead of running it
  -h, --help           this help
  -- FLAGS...          everything after -- goes to the trainer, after the flags above
                       (so it overrides them), e.g. -- --config.optim.microbatches=4
EOF
}

die() {
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

# Progress notes are shell comments, so a --dry_run transcript is itself a runnable script.
note() {
  printf '# %s\n' "$*"
}

VALUED_OPTIONS="--name --zone --project --accelerator --version --repo --ref --config --workdir"
VALUED_OPTIONS+=" --data_dir --worker"
set_option() {
  case "$1" in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --worker) WORKER=$2 ;;
    --config.*) die "$1 is a trainer flag: put it after -- (see --help)" ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
}

# Every script takes the same options, so that `tpu_pod.sh all` can hand one argument list to
# each step; a script ignores those it has no use for. The calling script defines usage().
parse_options() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry_run) DRY_RUN=true ;;
      --yes) YES=true ;;
      --spot) SPOT=true ;;
      --preemptible) PREEMPTIBLE=true ;;
      --) shift; TRAINER_FLAGS=("$@"); break ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        [[ " $VALUED_OPTIONS " == *" $1 "* ]] || set_option "$1" ""  # dies, naming the problem
        (($# >= 2)) || die "$1 needs a value"
        set_option "$1" "$2"
        shift ;;
      *) die "unexpected argument: $1 (trainer flags go after --; see --help)" ;;
    esac
    shift
  done
}

# require VAR... : fail early, naming the option and its environment variable.
require() {
  local var flag env
  for var in "$@"; do
    if [[ -z "${!var}" ]]; then
      flag=$(printf '%s' "$var" | tr '[:upper:]' '[:lower:]')
      env=BIGBIGAN_$var
      die "missing --$flag (or set \$$env); see --help"
    fi
  done
}

require_gcloud() {
  $DRY_RUN || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), or pass --dry_run to see the commands"
}

# quote ARGS... : one line of shell words that reads back as ARGS; plain words stay bare, and
# a --flag=value keeps its flag bare so that the printed commands stay readable.
quote() {
  local arg words=() sq="'\\''" safe='^[A-Za-z0-9_./:=@%+,-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      words+=("$arg")
    elif [[ $arg =~ $flag ]]; then
      words+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/$sq}'")
    else
      words+=("'${arg//\'/$sq}'")
    fi
  done
  printf '%s' "${words[*]}"
}

# run CMD ARGS... : print it (--dry_run) or run it.
run() {
  if $DRY_RUN; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

# tpu_vm VERB ARGS... : gcloud compute tpus tpu-vm VERB ARGS..., with the zone and project
# that every call needs.
tpu_vm() {
  local verb=$1
  shift
  local scope=(--zone="$ZONE")
  [[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$verb" "$@" "${scope[@]}"
}

# Worker VMs (hosts) in a slice, from its accelerator type; fails on a type it does not know.
# What the number in the name counts differs by generation (cloud.google.com/tpu/docs/v3, /v4,
# /v5p, /v5e, /v6e):
#   v2-N, v3-N, v4-N, v5p-N  N TensorCores; 2 per chip, 4 chips = 8 TensorCores per host.
#                            v3-32: 4 hosts; v4-64 (32 chips): 8 hosts; v5p-16: 2 hosts.
#   v5litepod-N, v6e-N       N chips of 1 TensorCore; up to 8 chips run as one VM, larger
#                            slices as VMs of 4 chips. v5litepod-16: 4 workers.
# (The v5e page's table counts 8-chip physical hosts, "4x4: 2 hosts"; the workers that
# --worker=all reaches are the 4-chip VMs, 4 of them in that slice.)
workers_for() {
  local pattern='^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$' generation n
  [[ $1 =~ $pattern ]] || return 1
  generation=${BASH_REMATCH[1]}
  n=$((10#${BASH_REMATCH[2]}))
  case "$generation" in
    v5litepod | v6e)
      if ((n >= 1 && n <= 8)); then echo 1
      elif ((n % 8 == 0)); then echo $((n / 4))
      else return 1
      fi ;;
    *)
      ((n >= 8 && n % 8 == 0)) || return 1
      echo $((n / 8)) ;;
  esac
}

# The TPU software version ("runtime") to create a slice with, per generation, as the Cloud
# TPU docs recommend for JAX (https://cloud.google.com/tpu/docs/runtimes: "v4 and older:
# tpu-ubuntu2204-base"; v5e v2-alpha-tpuv5-lite; v5p v2-alpha-tpuv5; v6e v2-alpha-tpuv6e).
# The older tpu-vm-base image (Ubuntu 20.04, Python 3.8) is too old for jax >= 0.6.
default_version_for() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

plural_workers() {
  if [[ $1 == 1 ]]; then echo "1 worker (host)"; else echo "$1 workers (hosts)"; fi
}

# Sets SLICE_ACCELERATOR and WORKERS (0 when the type is not in the table). A real run asks
# the slice itself, so setup/train/stop need no --accelerator and fail early on a slice that
# is missing or not READY (a preempted Spot slice, say); a dry run prints that query and goes
# on with --accelerator.
describe_slice() {
  local described state
  local fields=(--format='value(acceleratorType,state)')
  if $DRY_RUN; then
    tpu_vm describe "$NAME" "${fields[@]}"
    SLICE_ACCELERATOR=$ACCELERATOR
    note "a real run reads the accelerator type from the slice; this dry run assumes $ACCELERATOR"
  else
    described=$(tpu_vm describe "$NAME" "${fields[@]}") ||
      die "cannot describe TPU '$NAME' in $ZONE; does it exist?" \
        "(gcloud compute tpus tpu-vm list --zone=$ZONE)"
    read -r SLICE_ACCELERATOR state <<<"$described"
    [[ $state == READY ]] || die "TPU '$NAME' is ${state:-in an unknown state}, not READY"
  fi
  WORKERS=$(workers_for "$SLICE_ACCELERATOR") || WORKERS=0
}

slice_summary() {
  if ((WORKERS > 0)); then
    echo "$SLICE_ACCELERATOR: $(plural_workers "$WORKERS")"
  else
    echo "$SLICE_ACCELERATOR: a worker count this script does not know"
  fi
}

# The shell test, run on a worker, for "a trainer started by train.sh is still running".
REMOTE_RUNNING="[ -f ~/$REMOTE_PID ] && kill -0 \"\$(cat ~/$REMOTE_PID)\" 2>/dev/null"
