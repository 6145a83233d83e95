#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Cloud TPU VM slices with gcloud: create, install vdit on every worker, train or sample on every
# worker, curate or encode on every worker (each its own shard), tail the log, delete. Every gcloud
# command is printed before it runs; --dry-run only prints.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [options] [-- extra `vdit` flags]
#
# Commands: create | install | train | sample | curate | encode | logs | delete | up (= create,
#   install, train). sample runs `vdit sample` on every worker of the slice (one multi-host job:
#   pass `-- --mesh ...` to shard the model over its chips; worker 0 writes; log vdit-sample.log).
#   curate/encode run `vdit curate`/`vdit encode --shard W --num-shards N` on every
#   worker, W its worker number and N the slice's worker count (from the TPU metadata server).
# Options (or environment variables):
#   --name NAME          TPU_NAME      slice name                       (required)
#   --zone ZONE          TPU_ZONE      e.g. us-east5-a                  (required)
#   --project PROJECT    TPU_PROJECT   default: gcloud's configured project
#   --accelerator TYPE   TPU_TYPE      default v5p-64 (32 chips, 8 hosts)
#   --version RUNTIME    TPU_VERSION   TPU VM runtime image, default v2-alpha-tpuv5
#   --spot                             use Spot capacity
#   --config FILE        TPU_CONFIG    configs/*.py, path inside the repo (train, encode;
#                                      optional for curate)
#   --workdir DIR        TPU_WORKDIR   run folder all workers write, e.g. gs://bucket/run
#                                      (train, encode; sample: the run or pipeline folder)
#   --input DIR                        curate: videos every worker reads (a shared mount)
#   --output DIR                       curate: clip shards folder all workers write
#   --worker N                         worker whose log `logs` tails (default 0)
#   --log NAME                         log `logs` tails (default vdit-train.log; vdit-curate.log,
#                                      vdit-encode.log for the data jobs)
#   --remote-dir DIR                   where the repo lives on the workers (default ~/vdit)
#   --python VERSION     TPU_PYTHON    install: the workers' Python, as `uv venv --python` takes
#                                      it (default 3.11; the image's python3 may be older)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_TYPE:-v5p-64}"
VERSION="${TPU_VERSION:-v2-alpha-tpuv5}"
CONFIG="${TPU_CONFIG:-}"
PYTHON="${TPU_PYTHON:-3.11}"
WORKDIR="${TPU_WORKDIR:-}"
SPOT=0
WORKER=0
REMOTE_DIR="vdit"  # relative to the worker's home
LOG="vdit-train.log"
INPUT=""
OUTPUT=""
COMMAND=""
EXTRA=()
# The slice's metadata server: each worker's number and the list of all workers.
META="http://metadata.google.internal/computeMetadata/v1/instance/attributes"

parse() {
  while [[ $# -gt 0 ]]; do
    if [[ "$1" =~ ^--(name|zone|project|accelerator|version|config|workdir|worker|input|output|log|remote-dir|python)$ && $# -lt 2 ]]; then
      die "$1 needs a value"
    fi
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --name) NAME="$2"; shift ;;
      --zone) ZONE="$2"; shift ;;
      --project) PROJECT="$2"; shift ;;
      --accelerator) ACCELERATOR="$2"; shift ;;
      --version) VERSION="$2"; shift ;;
      --spot) SPOT=1 ;;
      --config) CONFIG="$2"; shift ;;
      --workdir) WORKDIR="$2"; shift ;;
      --worker) WORKER="$2"; shift ;;
      --input) INPUT="$2"; shift ;;
      --output) OUTPUT="$2"; shift ;;
      --log) LOG="$2"; shift ;;
      --remote-dir) REMOTE_DIR="$2"; shift ;;
      --python) PYTHON="$2"; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      create|install|train|sample|curate|encode|logs|delete|up)
        [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
        COMMAND="$1" ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  need "a command" "$COMMAND" "create, install, train, sample, curate, encode, logs, delete or up"
  need "--name" "$NAME" "--name NAME or TPU_NAME"
  need "--zone" "$ZONE" "--zone ZONE or TPU_ZONE"
}

# gcloud compute tpus tpu-vm SUBCOMMAND ... with the slice's name, zone and project.
tpu() {
  local sub="$1"; shift
  local project=()
  [[ -z "$PROJECT" ]] || project=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" "${project[@]}"
}

create() {
  local spot=()
  [[ "$SPOT" != 1 ]] || spot=(--spot)
  tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${spot[@]}"
}

install() {
  local root tarball dir python
  root="$(repo_root)"
  printf -v dir '%q' "$REMOTE_DIR"
  printf -v python '%q' "$PYTHON"
  tarball="${TMPDIR:-/tmp}/vdit-src.tar.gz"
  # Ship the checkout (no venv, runs, weights or caches: weights and converted runs go to the
  # bucket), unpack and install it on every worker.
  # Members are named ./PATH (`-C root .`), and a plain --exclude=NAME matches NAME at any
  # depth: the top-level folders are anchored as ./NAME, else vdit/runs/ (the package) would go.
  # Caches, git data and egg-info are dropped wherever they are.
  run tar -czf "$tarball" -C "$root" --exclude=./.venv --exclude=./runs --exclude=./demo_out \
    --exclude=./weights --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' .
  tpu scp "$tarball" "$NAME:vdit-src.tar.gz" --worker=all
  # The image's python3 may be older than vdit needs (3.10 on v2-alpha-tpuv5): uv, installed with
  # its pip, makes the venv with Python $PYTHON (the worker's own if it has it, else downloaded).
  local setup="mkdir -p $dir && tar -xzf vdit-src.tar.gz -C $dir && cd $dir"
  setup+=" && python3 -m pip install -q -U --user uv"
  setup+=" && python3 -m uv venv -q --clear --seed --python $python .venv"
  # The gcs extra: gs:// workdirs and data.
  setup+=" && python3 -m uv pip install -q --python .venv/bin/python -e '.[gcs]' 'jax[tpu]'"
  tpu ssh "$NAME" --worker=all --command="$setup"
}

# The flags a command needs, checked before anything runs (`up` would otherwise create a paid
# slice and install on it before finding --config missing).
check() {
  case "$COMMAND" in
    train|up)
      need "--config" "$CONFIG" "--config configs/FILE.py"
      need "--workdir" "$WORKDIR" "--workdir gs://BUCKET/RUN" ;;
    curate)
      need "--input" "$INPUT" "--input DIR (videos every worker can read)"
      need "--output" "$OUTPUT" "--output gs://BUCKET/CLIPS" ;;
    encode)
      need "--config" "$CONFIG" "--config configs/FILE.py"
      need "--workdir" "$WORKDIR" "--workdir gs://BUCKET/RUN" ;;
    sample)
      need "--workdir" "$WORKDIR" "--workdir gs://BUCKET/RUN (a run or a pipeline folder)" ;;
  esac
}

# `vdit COMMAND FLAGS... --distributed on EXTRA...` on every worker, its output in ~/LOG:
# JAX finds the other hosts from the TPU VM metadata (one job over the whole slice).
everywhere() {
  local command="$1" log flags dir
  printf -v log '%q' "$2"
  shift 2
  printf -v flags ' %q' "$@" --distributed on "${EXTRA[@]}"
  printf -v dir '%q' "$REMOTE_DIR"
  local start="cd $dir && nohup .venv/bin/python -m vdit $command$flags > ~/$log 2>&1 &"
  tpu ssh "$NAME" --worker=all --command="$start"
}

train() {
  everywhere train "$LOG" --config "$CONFIG" --workdir "$WORKDIR"
}

# vdit curate / vdit encode on every worker, each its own shard (--distributed off: the workers
# never talk to each other; outputs are merged by name in the shared folder).
data_job() {
  local command="$1" flags dir
  if [[ "$command" == curate ]]; then
    local args=(--input "$INPUT" --output "$OUTPUT")
    [[ -z "$CONFIG" ]] || args=(--config "$CONFIG" "${args[@]}")
  else
    local args=(--config "$CONFIG" --workdir "$WORKDIR")
  fi
  printf -v dir '%q' "$REMOTE_DIR"
  printf -v flags ' %q' "${args[@]}" --distributed off
  local tail="" get="curl -sf -H Metadata-Flavor:Google $META"
  [[ ${#EXTRA[@]} -eq 0 ]] || printf -v tail ' %q' "${EXTRA[@]}"
  local start="cd $dir || exit 1"
  start+="; W=\$($get/agent-worker-number) && N=\$($get/worker-network-endpoints | tr , '\\n' | grep -c .)"
  start+=" || { echo 'no TPU worker number from the metadata server' >&2; exit 1; }"
  start+="; nohup .venv/bin/python -m vdit $command$flags --shard \$W --num-shards \$N$tail"
  start+=" > ~/vdit-$command.log 2>&1 &"
  tpu ssh "$NAME" --worker=all --command="$start"
}

logs() {
  local log
  printf -v log '%q' "$LOG"
  tpu ssh "$NAME" --worker="$WORKER" --command="tail -n 200 -F ~/$log"
}

delete() {
  tpu delete "$NAME" --quiet
}

main() {
  parse "$@"
  check
  case "$COMMAND" in
    create) create ;;
    install) install ;;
    train) train ;;
    sample) everywhere sample vdit-sample.log --workdir "$WORKDIR" ;;
    curate|encode) data_job "$COMMAND" ;;
    logs) logs ;;
    delete) delete ;;
    up) create; install; train ;;
  esac
}

main "$@"
