# Shell helpers for scripts/*.sh and .ci/run.

step() {  # step "title" command...: run a command, say how long it took, return its exit status
  local title=$1 start=$SECONDS status
  shift
  echo "==> $title"
  "$@"  # under `set -e` a failure stops the script here
  status=$?
  echo "<== $title: $((SECONDS - start)) s$([ "$status" = 0 ] || echo " (FAILED, exit status $status)")"
  return "$status"
}
