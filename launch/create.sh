#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates a Cloud TPU VM slice (one VM per worker host).
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE [--accelerator=v3-32] [--version=RUNTIME]
           [--project=PROJECT] [--spot | --preemptible] [--dry_run]

Creates the TPU VM slice NAME with 'gcloud compute tpus tpu-vm create'. The software
version defaults to the one the Cloud TPU docs recommend for the accelerator's generation.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE ACCELERATOR
if [[ -z "$VERSION" ]]; then
  VERSION=$(default_version_for "$ACCELERATOR") ||
    die "no default software version for accelerator '$ACCELERATOR'; pass --version"
fi
if $SPOT && $PREEMPTIBLE; then die "--spot and --preemptible exclude each other"; fi
require_gcloud

if WORKERS=$(workers_for "$ACCELERATOR"); then
  note "creating $ACCELERATOR: $(plural_workers "$WORKERS"), software $VERSION"
else
  note "creating $ACCELERATOR (a type whose worker count this script does not know)," \
    "software $VERSION"
fi
lifecycle=()
if $SPOT; then lifecycle=(--spot); fi
if $PREEMPTIBLE; then lifecycle=(--preemptible); fi
tpu_vm create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
  ${lifecycle[@]+"${lifecycle[@]}"}
