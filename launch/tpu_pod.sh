#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One entry point for the launch scripts: tpu_pod.sh COMMAND [options] [-- trainer flags].
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT COMMAND [options] [-- TRAINER_FLAGS...]

Trains bigbigan_jax on a Cloud TPU VM slice (a single host or a multi-host pod slice).

Commands (each is also a script of its own in $LAUNCH_DIR):
  create   create the slice                      (create.sh)
  setup    install the package on every worker   (setup.sh)
  train    start the trainer on every worker     (train.sh)
  logs     stream one worker's log               (logs.sh)
  stop     stop the trainer on every worker      (stop.sh)
  delete   delete the slice                      (delete.sh)
  all      create, setup, train, then logs; every step's options are checked before the
           slice is created. Deleting stays a step of its own.

'$SCRIPT COMMAND --help' describes one command. Example, a v3-32 pod slice (4 workers):
  $SCRIPT all --name=bbg --zone=europe-west4-a --accelerator=v3-32 \\
      --config=configs/bigbigan_resnet50.py --workdir=gs://BUCKET/bigbigan_resnet50 \\
      --data_dir=gs://BUCKET/tensorflow_datasets
  $SCRIPT delete --name=bbg --zone=europe-west4-a

EOF
  common_options_help
}

(($#)) || { usage >&2; exit 2; }
verb=$1
shift
case "$verb" in
  -h | --help) usage ;;
  create | setup | train | logs | stop | delete) exec bash "$here/$verb.sh" "$@" ;;
  all)
    for arg in "$@"; do
      case "$arg" in --) break ;; -h | --help) usage; exit 0 ;; esac
    done
    steps=(create setup train logs)
    # A dry run of every step first: a missing option or a bad config path fails here, before
    # a slice exists to pay for.
    for step in "${steps[@]}"; do
      bash "$here/$step.sh" --dry_run "$@" >/dev/null
    done
    for step in "${steps[@]}"; do
      bash "$here/$step.sh" "$@"
    done ;;
  *) die "unknown command '$verb'; one of: create setup train logs stop delete all" ;;
esac
