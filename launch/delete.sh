#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes a slice: every worker VM, its disk, and the per-worker logs on it.
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE [--yes] [--project=PROJECT] [--dry_run]

Deletes TPU slice NAME after asking for confirmation (--yes: without asking). The workdir
on GCS stays; the logs in ~/$REMOTE_LOG on the workers go with them.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE
require_gcloud

if $DRY_RUN; then
  $YES || note "a real run asks for confirmation first (--yes skips the question)"
elif ! $YES; then
  [[ -t 0 ]] || die "not deleting '$NAME' without confirmation: run on a terminal, or pass --yes"
  read -r -p "Delete TPU slice '$NAME' in $ZONE, with all its workers? [y/N] " answer
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "not deleted"
fi
# --quiet: the question was asked above (or waived); gcloud would ask it again.
tpu_vm delete "$NAME" --quiet
