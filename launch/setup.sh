#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs the package on every worker of a slice: the checkout goes to ~/bigbigan_jax and
# `pip install -e '.[tpu]'` runs there (the trainer reads its config files from that folder).
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) here=${BASH_SOURCE[0]%/*} ;; *) here=. ;; esac
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT --name=NAME --zone=ZONE [--repo=PATH_OR_URL [--ref=REF]] [--project=PROJECT]
           [--dry_run]

Puts the repository on every worker of slice NAME (as ~/$REMOTE_DIR, replacing an older copy)
and installs it there with pip, with the 'tpu' extra and jax[tpu] (for a matching libtpu).
A local folder (the default: this checkout, with its uncommitted changes but without
git-ignored files) is packed and copied with scp; a git URL is cloned on each worker, which
then needs access to it. Refuses while a trainer is running on the slice.

EOF
  common_options_help
}

parse_options "$@"
require NAME ZONE REPO
git_url='^(https?|ssh|git)://|^[^/:@]+@[^/:]+:'
if [[ -d "$REPO" ]]; then
  REPO=$(cd "$REPO" && pwd)
  [[ -z "$REF" ]] || die "--ref needs a git URL --repo; a local folder is copied as it is"
elif ! [[ $REPO =~ $git_url ]]; then
  die "--repo '$REPO' is neither a local folder nor a git URL"
fi
require_gcloud

describe_slice
note "installing $REPO on every worker of $(slice_summary)"

remote_script="set -e
if $REMOTE_RUNNING; then echo \"\$(hostname): a trainer is running; run stop first\" >&2; exit 1; fi
rm -rf $REMOTE_DIR"
if [[ -d "$REPO" ]]; then
  tarball=${TMPDIR:-/tmp}/bigbigan_jax-$NAME.tar.gz
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked files, not the ignored ones (build outputs, local workdirs); a
    # tracked file deleted from the working tree is left out rather than failing tar.
    pack="(cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard"
    pack+=" | while IFS= read -r -d '' f; do"
    pack+=" if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done"
    pack+=" | COPYFILE_DISABLE=1 tar --null -T - -czf $(quote "$tarball"))"
  else
    pack="(cd $(quote "$REPO") && COPYFILE_DISABLE=1 tar --exclude=.git --exclude=__pycache__"
    pack+=" --exclude='*.egg-info' --exclude='workdir*' -czf $(quote "$tarball") .)"
  fi
  if $DRY_RUN; then
    printf '%s\n' "$pack"
  else
    trap 'rm -f "$tarball"' EXIT
    bash -o pipefail -c "$pack"
  fi
  tpu_vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all
  remote_script+="
mkdir $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && rm $REMOTE_TARBALL"
else
  remote_script+="
git clone -q $(quote "$REPO") $REMOTE_DIR"
  if [[ -n "$REF" ]]; then
    remote_script+=" && git -C $REMOTE_DIR checkout -q $(quote "$REF")"
  fi
fi
# The TPU VM images have no virtualenv tooling; pip installs into ~/.local, as in the Cloud
# TPU JAX guides, and `python3 -m` finds it there. 'jax[tpu]' beside the 'tpu' extra (a bare
# libtpu) makes pip take the libtpu that the chosen jax pins: on these images' Python 3.10 the
# newest jax is 0.6.2, which wants libtpu 0.0.17, while a bare libtpu resolves to 0.0.21.
remote_script+="
cd $REMOTE_DIR
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[tpu]' 'jax[tpu]'
echo \"\$(hostname): installed \$(python3 -c 'import jax; print(\"jax\", jax.__version__)')\""
tpu_vm ssh "$NAME" --worker=all --command="$remote_script"
if [[ -d "$REPO" ]] && $DRY_RUN; then
  run rm -f "$tarball"
fi
