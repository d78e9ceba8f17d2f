# `show CMD ...` runs CMD and appends "$ CMD", its output and its exit status to $out, with the temporary
# folder $runs written as "runs". Sourced by the docs/usage/*.sh scripts, which set $out and $runs.
# Progress bars (loss, lr, img/s; redrawn with \r) are for terminals: the log keeps each bar's final state.
show() {
  echo "\$ $*" | sed "s|$runs|runs|g" >> "$out"
  "$@" 2>&1 | sed "s|$runs|runs|g" | python -c "import sys; [print(l.split(chr(13))[-1]) for l in sys.stdin.read().split(chr(10))[:-1]]" >> "$out"
  echo "[exit ${PIPESTATUS[0]}]" >> "$out"; echo >> "$out"
}
