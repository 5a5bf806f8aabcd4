#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Stops the trainer on every worker of a slice; the slice itself keeps running (and costing).
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE [--project=PROJECT] [--dry_run]

Sends SIGTERM to the trainer that train.sh started on each worker (to its process group,
by the id in ~/$REMOTE_PID), and to nothing else. Checkpoints already in the workdir stay; a
later train.sh with the same workdir resumes from the newest. delete.sh frees the slice.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE
require_gcloud

describe_slice
note "stopping the trainer on every worker of $(slice_summary)"
remote_script="if $REMOTE_RUNNING; then
  pid=\$(cat ~/$REMOTE_PID)
  kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"
  echo \"\$(hostname): sent SIGTERM to trainer \$pid\"
else
  echo \"\$(hostname): no trainer running\"
fi"
tpu_vm ssh "$NAME" --worker=all --command="$remote_script"
