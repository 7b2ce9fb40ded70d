# Shell helpers for scripts/*.sh and .ci/run.

step() {  # step "title" command...: run a command and say how long it took
  local title=$1 start=$SECONDS
  shift
  echo "==> $title"
  "$@"
  echo "<== $title: $((SECONDS - start)) s"
}
