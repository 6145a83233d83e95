# Shared helpers for the launch scripts (sourced, not run): command echo + dry-run, errors.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"

# The calling script's header comment (after the shebang line) is its help text.
usage() { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$0"; }

# One word as a shell would need it: plain words as they are, others in single quotes
# (`--flag=value` keeps the flag outside the quotes).
quote() {
  local word="$1" prefix=""
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,~-]*$ && -n "$word" ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ "$word" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
}

# Prints a command (quoted, so it can be pasted) and runs it unless DRY_RUN=1.
run() {
  local line="+" word
  for word in "$@"; do
    line+=" $(quote "$word")"
  done
  printf '%s\n' "$line"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# need NAME VALUE FLAG: fail with a message naming the flag when a required value is empty.
need() {
  [[ -n "$2" ]] || die "$1 is required (give $3)"
}

# The checkout these scripts belong to.
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
