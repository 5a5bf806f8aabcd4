#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts the trainer on every worker of a slice, with identical flags, detached from ssh.
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE --config=configs/X.py --workdir=gs://BUCKET/DIR
           [--data_dir=gs://BUCKET/tensorflow_datasets] [--project=PROJECT] [--dry_run]
           [-- TRAINER_FLAGS...]

Runs, on every worker of slice NAME at once (one process per host, all with the same flags):
  python3 -m bigbigan_jax.main --config=X --workdir=DIR [--config.data.data_dir=...]
      [--config.distributed=True] TRAINER_FLAGS...
from ~/$REMOTE_DIR (see setup.sh). --config.distributed=True (jax.distributed.initialize()) is
added on multi-host slices. Each trainer runs in its own session under nohup, so closing ssh
does not stop it; its output goes to ~/$REMOTE_LOG on its worker (see logs.sh), its process
id to ~/$REMOTE_PID (see stop.sh). Refuses while a trainer is running there. A workdir that
already holds checkpoints is resumed.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE CONFIG WORKDIR
if [[ -d "$REPO" && ! -f "$REPO/${CONFIG%%:*}" ]]; then
  die "--config '$CONFIG' is not a file of $REPO; give it relative to the repository root," \
    "e.g. configs/bigbigan_resnet50.py"
fi
require_gcloud

describe_slice
if ((WORKERS != 1)) && [[ $WORKDIR != gs://* ]]; then
  die "--workdir '$WORKDIR' is not on GCS: on a multi-host slice every worker must write the" \
    "same checkpoints, so give a gs://BUCKET/... path"
fi

trainer=(python3 -m bigbigan_jax.main --config="$CONFIG" --workdir="$WORKDIR")
[[ -z "$DATA_DIR" ]] || trainer+=(--config.data.data_dir="$DATA_DIR")
((WORKERS == 1)) || trainer+=(--config.distributed=True)
trainer+=(${TRAINER_FLAGS[@]+"${TRAINER_FLAGS[@]}"})  # last, so that they override the above

# `set --` holds the trainer's command line on the worker: it is run as "$@" and logged as $*.
# setsid detaches it from the ssh login's terminal, so that no hangup from the ending ssh reaches it;
# every descriptor is redirected, so that ssh returns at once.
remote_script="set -e
if $REMOTE_RUNNING; then
  echo \"\$(hostname): a trainer is running (pid \$(cat ~/$REMOTE_PID)); run stop first\" >&2
  exit 1
fi
cd $REMOTE_DIR
set -- $(quote "${trainer[@]}")
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): \$*\" >> ~/$REMOTE_LOG
PYTHONUNBUFFERED=1 setsid nohup \"\$@\" >> ~/$REMOTE_LOG 2>&1 < /dev/null &
echo \$! > ~/$REMOTE_PID
echo \"\$(hostname): trainer started, pid \$(cat ~/$REMOTE_PID), log ~/$REMOTE_LOG\""

note "$(slice_summary); one command below starts the trainer on all of them"
tpu_vm ssh "$NAME" --worker=all --command="$remote_script"
note "follow worker 0 with: $here/logs.sh --name=$NAME --zone=$ZONE;" \
  "TensorBoard: tensorboard --logdir=$WORKDIR"
