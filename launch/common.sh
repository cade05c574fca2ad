#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced; expects $PROG).

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }

# Quote one word for a POSIX shell: bare when it is plainly safe, else single-quoted.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./=:,@%+^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote a whole argv into one pasteable line.
qargs() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}
