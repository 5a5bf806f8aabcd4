#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Streams the trainer's log from one worker of a slice.
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE [--worker=N] [--project=PROJECT] [--dry_run]

Follows ~/$REMOTE_LOG on worker N (default 0, the one that writes checkpoints and summaries)
with tail -F, from its last 100 lines on. Ctrl-C stops the streaming, not the trainer.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), not '$WORKER'"
require_gcloud

tpu_vm ssh "$NAME" --worker="$WORKER" --command="tail -n 100 -F ~/$REMOTE_LOG"
