#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submit, watch and cancel vdit training on a SLURM GPU cluster (job script: slurm_gpu.sbatch),
# and vdit's data jobs as array jobs (job script: slurm_data.sbatch). Every command is printed
# before it runs; --dry-run only prints, including the line the job will run on its nodes.
#
#   launch/slurm.sh [--dry-run] submit --config FILE --workdir DIR [options] [-- vdit flags]
#   launch/slurm.sh [--dry-run] curate --shards N --input DIR --output DIR [options] [-- flags]
#   launch/slurm.sh [--dry-run] encode --shards N --config FILE --workdir DIR [options] [-- flags]
#   launch/slurm.sh [--dry-run] install [--venv DIR] [--cuda 12|13]
#                                                once, before the first job: JAX's CUDA plugin
#                                                (CUDA 12 unless told) into the checkout's .venv
#   launch/slurm.sh [--dry-run] logs JOBID       tail the job's log in the checkout
#                                                (vdit-train-JOBID.log; an array task JOBID_I:
#                                                vdit-data-JOBID_I.log)
#   launch/slurm.sh [--dry-run] cancel JOBID
#
# submit options: --nodes N (default 2), --gpus-per-node G (default 8), --partition P,
#   --time HH:MM:SS, --account A, --port N (coordinator port, default 8476), --venv DIR
# curate/encode: --shards N array tasks, task I running `vdit curate|encode --shard I
#   --num-shards N`; --gpus G per task (default 1 for encode, 0 for curate), --config FILE
#   (optional for curate), --partition, --time, --account, --venv as for submit
#
# Jobs run in this checkout (sbatch --chdir) from any submit directory: relative paths given
# elsewhere are made absolute, except a --config found only under the checkout (configs/...).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COMMAND=""
JOB=""
NODES=2
GPUS=8
PARTITION=""
TIME=""
ACCOUNT=""
CONFIG=""
WORKDIR=""
SHARDS=""
DATA_GPUS=""
INPUT=""
OUTPUT=""
VENV=""
CUDA=12
JOB_ARGS=()
EXTRA=()

# job_path PATH [config]: PATH as the job (running in the checkout) must see it: relative ones
# given from another folder are made absolute there, unless a config exists only in the checkout.
job_path() {
  local path="$1" root
  root="$(repo_root)"
  if [[ -z "$path" || "$path" == /* || "$path" == *://* || "$PWD" == "$root" ]]; then
    printf '%s' "$path"
  elif [[ -n "${2:-}" && ! -e "$path" && -f "$root/$path" ]]; then
    printf '%s' "$path"
  else
    printf '%s' "$PWD/$path"
  fi
}

# sbatch options that run the job in this checkout whatever the submit directory: its script is
# a spool copy, so it is told where launch/ is (VDIT_LAUNCH_DIR, read by the .sbatch files).
in_checkout() {
  local root
  root="$(repo_root)"
  printf '%s\n' "--chdir=$root" "--export=ALL,VDIT_LAUNCH_DIR=$root/launch"
}

parse() {
  while [[ $# -gt 0 ]]; do
    if [[ "$1" =~ ^--(nodes|gpus-per-node|partition|time|account|config|workdir|port|venv|shards|gpus|input|output|cuda)$ && $# -lt 2 ]]; then
      die "$1 needs a value"
    fi
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --nodes) NODES="$2"; shift ;;
      --gpus-per-node) GPUS="$2"; shift ;;
      --partition) PARTITION="$2"; shift ;;
      --time) TIME="$2"; shift ;;
      --account) ACCOUNT="$2"; shift ;;
      --config) CONFIG="$(job_path "$2" config)"; JOB_ARGS+=("$1" "$CONFIG"); shift ;;
      --workdir) WORKDIR="$(job_path "$2")"; JOB_ARGS+=("$1" "$WORKDIR"); shift ;;
      --port) JOB_ARGS+=("$1" "$2"); shift ;;
      --venv) VENV="$(job_path "$2")"; JOB_ARGS+=("$1" "$VENV"); shift ;;
      --shards) SHARDS="$2"; shift ;;
      --gpus) DATA_GPUS="$2"; shift ;;
      --input) INPUT="$(job_path "$2")"; shift ;;
      --output) OUTPUT="$(job_path "$2")"; shift ;;
      --cuda) CUDA="$2"; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      submit|curate|encode|install|logs|cancel)
        [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
        COMMAND="$1" ;;
      *)
        if [[ "$COMMAND" != logs && "$COMMAND" != cancel ]] || [[ -n "$JOB" ]]; then
          die "unknown argument '$1' (see --help)"
        fi
        JOB="$1" ;;
    esac
    shift
  done
  need "a command" "$COMMAND" "submit, curate, encode, install, logs or cancel"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
  [[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
}

submit() {
  need "--config" "$CONFIG" "--config configs/FILE.py"
  need "--workdir" "$WORKDIR" "--workdir DIR (on a filesystem every node sees)"
  local script options=(--nodes="$NODES" --gpus-per-node="$GPUS")
  script="$(dirname "${BASH_SOURCE[0]}")/slurm_gpu.sbatch"
  [[ -z "$PARTITION" ]] || options+=(--partition="$PARTITION")
  [[ -z "$TIME" ]] || options+=(--time="$TIME")
  [[ -z "$ACCOUNT" ]] || options+=(--account="$ACCOUNT")
  mapfile -t -O "${#options[@]}" options < <(in_checkout)
  local job_args=("${JOB_ARGS[@]}")
  [[ ${#EXTRA[@]} -eq 0 ]] || job_args+=(-- "${EXTRA[@]}")
  run sbatch "${options[@]}" "$script" "${job_args[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# on its nodes the job runs:"
    SLURM_NTASKS="$NODES" VDIT_LAUNCH_DIR="$(repo_root)/launch" bash "$script" --dry-run \
      "${job_args[@]}"
  fi
}

# A data job as an array job: task I of N runs `vdit curate|encode --shard I --num-shards N`.
submit_data() {
  [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || die "--shards must be a positive integer, got '$SHARDS'"
  local args=("$COMMAND" --num-shards "$SHARDS")
  if [[ "$COMMAND" == curate ]]; then
    need "--input" "$INPUT" "--input DIR (videos every node can read)"
    need "--output" "$OUTPUT" "--output DIR (on a filesystem every node sees)"
    [[ -z "$CONFIG" ]] || args+=(--config "$CONFIG")
    args+=(--input "$INPUT" --output "$OUTPUT")
  else
    need "--config" "$CONFIG" "--config configs/FILE.py"
    need "--workdir" "$WORKDIR" "--workdir DIR (on a filesystem every node sees)"
    args+=(--config "$CONFIG" --workdir "$WORKDIR")
  fi
  [[ -z "$VENV" ]] || args+=(--venv "$VENV")
  [[ ${#EXTRA[@]} -eq 0 ]] || args+=(-- "${EXTRA[@]}")
  local gpus="${DATA_GPUS:-$([[ "$COMMAND" == encode ]] && echo 1 || echo 0)}"
  [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus must be a whole number, got '$gpus'"
  local script options=(--array="0-$((SHARDS - 1))")
  script="$(dirname "${BASH_SOURCE[0]}")/slurm_data.sbatch"
  [[ "$gpus" == 0 ]] || options+=(--gpus="$gpus")
  [[ -z "$PARTITION" ]] || options+=(--partition="$PARTITION")
  [[ -z "$TIME" ]] || options+=(--time="$TIME")
  [[ -z "$ACCOUNT" ]] || options+=(--account="$ACCOUNT")
  mapfile -t -O "${#options[@]}" options < <(in_checkout)
  run sbatch "${options[@]}" "$script" "${args[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# array task I (of 0..$((SHARDS - 1))) runs:"
    VDIT_LAUNCH_DIR="$(repo_root)/launch" bash "$script" --dry-run "${args[@]}"
  fi
}

# `pip install -e .` gives JAX's CPU build, which a GPU job would run on without a word: add the
# CUDA plugin of the jax already installed (no -U: jax, and what was resolved with it, stay).
install() {
  local venv="${VENV:-$(repo_root)/.venv}"
  [[ "$CUDA" =~ ^1[23]$ ]] || die "--cuda must be 12 or 13 (jax's cuda12/13 extras), got '$CUDA'"
  [[ "$DRY_RUN" == 1 || -x "$venv/bin/python" ]] \
    || die "no $venv/bin/python: make the environment first (make install), or give --venv DIR"
  run "$venv/bin/python" -m pip install -q "jax[cuda$CUDA]"
}

# The job's log, in the checkout where it runs (--chdir): an array task's is
# vdit-data-JOBID_TASK.log, a training job's vdit-train-JOBID.log.
log_file() {
  local name="vdit-train-$JOB.log"
  [[ "$JOB" != *_* ]] || name="vdit-data-$JOB.log"
  echo "$(repo_root)/$name"
}

main() {
  parse "$@"
  case "$COMMAND" in
    submit) submit ;;
    curate|encode) submit_data ;;
    install) install ;;
    logs) need "a job id" "$JOB" "logs JOBID"; run tail -n 200 -F "$(log_file)" ;;
    cancel) need "a job id" "$JOB" "cancel JOBID"; run scancel "$JOB" ;;
  esac
}

main "$@"
