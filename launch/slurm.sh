#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submit, watch and cancel vdit training on a SLURM GPU cluster (job script: slurm_gpu.sbatch).
# Every command is printed before it runs; --dry-run only prints, including the srun line the
# job will run on its nodes.
#
#   launch/slurm.sh [--dry-run] submit --config FILE --workdir DIR [options] [-- vdit flags]
#   launch/slurm.sh [--dry-run] logs JOBID       tail the job's log (vdit-train-JOBID.log)
#   launch/slurm.sh [--dry-run] cancel JOBID
#
# submit options: --nodes N (default 2), --gpus-per-node G (default 8), --partition P,
#   --time HH:MM:SS, --account A, --port N (coordinator port, default 8476), --venv DIR
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
JOB_ARGS=()
EXTRA=()

parse() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --nodes) NODES="$2"; shift ;;
      --gpus-per-node) GPUS="$2"; shift ;;
      --partition) PARTITION="$2"; shift ;;
      --time) TIME="$2"; shift ;;
      --account) ACCOUNT="$2"; shift ;;
      --config) CONFIG="$2"; JOB_ARGS+=("$1" "$2"); shift ;;
      --workdir) WORKDIR="$2"; JOB_ARGS+=("$1" "$2"); shift ;;
      --port|--venv) JOB_ARGS+=("$1" "$2"); shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      submit|logs|cancel)
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
  need "a command" "$COMMAND" "submit, logs or cancel"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
}

submit() {
  need "--config" "$CONFIG" "--config configs/FILE.py"
  need "--workdir" "$WORKDIR" "--workdir DIR (on a filesystem every node sees)"
  local script options=(--nodes="$NODES" --gpus-per-node="$GPUS")
  script="$(dirname "${BASH_SOURCE[0]}")/slurm_gpu.sbatch"
  [[ -z "$PARTITION" ]] || options+=(--partition="$PARTITION")
  [[ -z "$TIME" ]] || options+=(--time="$TIME")
  [[ -z "$ACCOUNT" ]] || options+=(--account="$ACCOUNT")
  local job_args=("${JOB_ARGS[@]}")
  [[ ${#EXTRA[@]} -eq 0 ]] || job_args+=(-- "${EXTRA[@]}")
  run sbatch "${options[@]}" "$script" "${job_args[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# on its nodes the job runs:"
    SLURM_NTASKS="$NODES" bash "$script" --dry-run "${job_args[@]}"
  fi
}

main() {
  parse "$@"
  case "$COMMAND" in
    submit) submit ;;
    logs) need "a job id" "$JOB" "logs JOBID"; run tail -n 200 -F "vdit-train-$JOB.log" ;;
    cancel) need "a job id" "$JOB" "cancel JOBID"; run scancel "$JOB" ;;
  esac
}

main "$@"
