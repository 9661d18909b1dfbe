#!/usr/bin/env bash
# Run the same ftjax command on every worker of a Cloud TPU VM slice, restarting after preemption.
#
#   launch/tpu_vm.sh --tpu my-v5p-64 --zone us-east5-a [--project P] [--max-restarts 20] \
#     [--dry-run] -- ftjax train --config configs/X.py --workdir gs://bucket/runs/x
#
# 1. syncs this checkout (git-tracked files) to ~/ftjax on every worker and installs it;
# 2. runs the command on all workers at once (gcloud ... ssh --worker=all); JAX finds the other
#    workers by itself on TPU VMs; each worker's output goes to ~/ftjax-logs/<attempt>.log there
#    and is collected into ./ftjax-logs/<tpu>/ here;
# 3. exit code 75 from any worker means "preempted after a committed checkpoint": run again
#    (the run resumes), up to --max-restarts times. --dry-run prints the commands instead.
set -euo pipefail

tpu="" zone="" project="" max_restarts=20 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--max-restarts N] [--dry-run] -- COMMAND" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi
printf -v command '%q ' "$@"

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/ftjax.tgz"
if [[ $dry_run -eq 1 ]]; then
  echo "+ git ls-files -z | tar -C $repo --null -T - -czf $archive"
else
  (cd "$repo" && git ls-files -z) | tar -C "$repo" --null -T - -czf "$archive"
fi
run "${gcloud_tpu[@]}" scp "$archive" "$tpu:~/ftjax.tgz" --worker=all "${where[@]}"
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command \
  "mkdir -p ~/ftjax ~/ftjax-logs && tar -C ~/ftjax -xzf ~/ftjax.tgz && cd ~/ftjax && \
   python3 -m pip install -q -c constraints.txt -e '.[tpu]'"

run mkdir -p "ftjax-logs/$tpu"
for attempt in $(seq 0 "$max_restarts"); do
  log="ftjax-logs/$tpu/attempt-$attempt.log"
  remote="cd ~/ftjax && $command > ~/ftjax-logs/$attempt.log 2>&1; code=\$?; \
    echo \"FTJAX_EXIT \$(hostname) \$code\"; exit \$code"
  if [[ $dry_run -eq 1 ]]; then
    run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$remote"
    run "${gcloud_tpu[@]}" scp "$tpu:~/ftjax-logs/$attempt.log" "ftjax-logs/$tpu/" --worker=all \
      "${where[@]}"
    exit 0
  fi
  set +e
  "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$remote" | tee "$log"
  set -e
  "${gcloud_tpu[@]}" scp "$tpu:~/ftjax-logs/$attempt.log" "ftjax-logs/$tpu/" --worker=all \
    "${where[@]}" || true
  if grep -q 'FTJAX_EXIT .* 75$' "$log"; then
    echo "preempted (exit 75): restarting, attempt $((attempt + 1)) of $max_restarts" >&2
    continue
  fi
  if grep -q 'FTJAX_EXIT .* [1-9][0-9]*$' "$log"; then
    echo "a worker failed; see ftjax-logs/$tpu/" >&2
    exit 1
  fi
  exit 0
done
echo "gave up after $max_restarts restarts" >&2
exit 1
