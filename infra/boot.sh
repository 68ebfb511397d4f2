#!/usr/bin/env bash
# The pod's boot: arm the runtime cap, install podtrain, then the stages, each logged with a
# timestamp to the pod log (stdout) and to <root>/runs/$RUN_EXPERIMENT/boot.log on the volume. The
# manifest's start command (infra/runpod-pod.yaml) has already cloned or updated RUN_REPO at RUN_REF
# into $PODTRAIN_PROJECT; the Dockerfile image runs this script from /opt/podtrain instead.
#
#   deadline     first of all: a background stop of the pod at RUN_DEADLINE (Unix seconds, set by
#                `orchestrate pod create` from maxRuntimeHours), since RunPod enforces no cap
#   0 install    podtrain from the volume checkout (pip install -e '.[cuda]', pinned to the image's
#                torch by a constraints file) unless the image has it
#   1 prep       the /workspace layout, with the experiment's subfolders
#   2 shard      fineweb-sharder into datasets/{train,val}/$RUN_EXPERIMENT: RUN_SHARD=auto (default)
#                shards unless a complete shard set is there (an interrupted one resumes), 1 always
#                runs the sharder (it resumes, or skips when done), 0 never does
#   3 tokenizer  orchestrate --mode cloud ... --stop-after emit (reuses a tokenizer bundle)
#   4 train      TensorBoard on :6006, then orchestrate again: done stages are skipped and
#                training starts with --resume auto, so a restarted pod continues its run
#
# RUN_STAGES (pretrain) chains fine-tuning after pretraining, e.g. pretrain,instruct,tool,reasoning
# (docs/finetune.md): before stage 4 an sft-data stage runs `orchestrate sft prepare` for the SFT
# stages (RUN_INSTRUCT_LIMIT, RUN_TOOL_LIMIT, RUN_REASONING_LIMIT cap their records), and stage 4
# passes --stages: each stage starts from the previous one's final checkpoint. Without pretrain in
# RUN_STAGES the tokenizer stage is skipped and the experiment's pretrained final is the start.
#
# Stopping the pod (the deadline, a halt) tries, in turn: `runpodctl pod stop ID` (runpodctl's
# current form), `runpodctl stop pod ID` (its legacy GraphQL form), then REST v2's
# `POST $RUNPOD_API_BASE_URL/v2/pods/ID/action {"action": "stop"}` (https://api.runpod.io) with the
# pod's own RUNPOD_API_KEY, which reaches curl as a header from a pipe: never on a command line,
# never in a log.
#
# Restart policy (docs/runpod.md): this script never returns to the container runtime on its own,
# because RunPod restarts an exited container and a crash loop bills GPU hours for nothing. A
# failed stage writes runs/$RUN_EXPERIMENT/BOOT_FAILED (stage, settings fingerprint) and halts;
# a boot that finds BOOT_FAILED with the same settings refuses to run and halts again. To halt is
# BOOT_HALT: stop (default: stop the pod as above when RUNPOD_POD_ID is set, else park),
# park (sleep, pod stays up for inspection), exit (return the status: local runs and tests).
# Retry after a fix: change a setting (knobs, config file, git checkout), set BOOT_RETRY=1, or
# delete BOOT_FAILED. SIGTERM/SIGINT (a spot preemption, `pod stop`) go to the running stage and
# are not failures: the next boot resumes.
#
# Watchdog: every stage runs under it. Stages report progress to the heartbeat file RUN_HEARTBEAT
# (runs/$RUN_EXPERIMENT/heartbeat; training/heartbeat.py): the sharder documents, the tokenizer
# bytes, sft prepare rows, the trainer steps, pip its output lines; boot.sh beats at each stage's
# start. A stage whose heartbeat has not changed for its limit (BOOT_WATCHDOG_MINUTES_<STAGE>, e.g.
# BOOT_WATCHDOG_MINUTES_SFT_DATA; defaults: install 20, prep 5, the others BOOT_WATCHDOG_MINUTES,
# 30; 0 turns it off) gets SIGTERM (a trainer checkpoints when it can), its process group SIGKILL
# BOOT_WATCHDOG_KILL_S (120) seconds later if it is still there; BOOT_FAILED names the stage and
# the boot halts (the pod stops) instead of billing a hang.
#
# Spot: RUN_PREEMPTION_GRACE_S (set to 5 by `orchestrate pod create` for spot: true) is passed to
# the trainer as the override preemption_grace_s=<s>.
#
# Secrets: RunPod leaves a `{{ RUNPOD_SECRET_name }}` reference as the literal text when no such
# secret exists; such variables are unset here (one warning line), so e.g. a literal HF_TOKEN
# never turns public downloads into 401s.
#
# Knobs: RUN_SHARD (auto) RUN_EXPERIMENT (runpod-1b) RUN_CONFIG (configs/runpod_Nb.yaml for runpod-Nb, else runpod_1b)
# RUN_STAGES (pretrain) SHARD_LINES (250000) RUN_INPUT (local corpus for the sharder; default: the
# FineWeb hub dataset RUN_FINEWEB_NAME, sample-10BT) RUN_PREEMPTION_GRACE_S RUN_DEADLINE
# RUN_HEARTBEAT PODTRAIN_WORKSPACE (/workspace) PODTRAIN_PROJECT (/workspace/transformer)
# BOOT_HALT BOOT_RETRY BOOT_WATCHDOG_MINUTES (30) BOOT_WATCHDOG_MINUTES_<STAGE>
# BOOT_WATCHDOG_KILL_S (120) BOOT_STOP_RETRY_S (60: between rounds of stop attempts at the
# deadline) BOOT_START_SCRIPT (/start.sh, the RunPod image's SSH/Jupyter starter, launched in the
# background).
set -euo pipefail

ROOT="${PODTRAIN_WORKSPACE:-/workspace}"
PROJECT="${PODTRAIN_PROJECT:-/workspace/transformer}"
RUN_SHARD="${RUN_SHARD:-auto}"
RUN_STAGES="${RUN_STAGES:-pretrain}"
RUN_EXPERIMENT="${RUN_EXPERIMENT:-runpod-1b}"
# RUN_EXPERIMENT=runpod-2b alone means configs/runpod_2b.yaml, as `orchestrate --experiment runpod-2b` does
# (issue 24: the 1B model never trains under a 2B name); any other name keeps the 1B default.
case "$RUN_EXPERIMENT" in
  runpod-[0-9]*b) sized="configs/runpod_${RUN_EXPERIMENT#runpod-}.yaml"
                  [ -f "$PROJECT/$sized" ] || sized="configs/runpod_1b.yaml" ;;
  *) sized="configs/runpod_1b.yaml" ;;
esac
RUN_CONFIG="${RUN_CONFIG:-$sized}"
SHARD_LINES="${SHARD_LINES:-250000}"
BOOT_HALT="${BOOT_HALT:-stop}"
BOOT_WATCHDOG_MINUTES="${BOOT_WATCHDOG_MINUTES:-30}"
BOOT_WATCHDOG_KILL_S="${BOOT_WATCHDOG_KILL_S:-120}"
BOOT_STOP_RETRY_S="${BOOT_STOP_RETRY_S:-60}"
RUN_DIR="$ROOT/runs/$RUN_EXPERIMENT"
BOOT_LOG="$RUN_DIR/boot.log"
FAILED_MARKER="$RUN_DIR/BOOT_FAILED"
export RUN_HEARTBEAT="${RUN_HEARTBEAT:-$RUN_DIR/heartbeat}"
CHILD=""
INTERRUPTED=""
WATCHDOG_FIRED=""
TB_PID=""
DEADLINE_PID=""

log() { printf '%s boot: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# Start "$@" in the background in a process group of its own (job control on for the fork only),
# so that the watchdog can kill a stage with everything it started, and a signal reaches this
# shell's trap at once (bash defers traps while a foreground child runs).
spawn() {
  set -m
  "$@" &
  CHILD=$!
  set +m
}

# The pod stops itself (see the header): true once one of the three ways was accepted. runpodctl's
# and REST's replies describe the pod, env included, so they are not printed.
stop_pod() {
  local id=$RUNPOD_POD_ID out
  if command -v runpodctl >/dev/null; then
    if timeout 120 runpodctl pod stop "$id" >/dev/null; then
      log "stop: 'runpodctl pod stop $id' accepted"
      return 0
    fi
    out=$(timeout 120 runpodctl stop pod "$id" 2>&1) || true
    if [[ "$out" == *"\"$id\" stopped"* ]]; then  # the legacy form says so; it exits 0 either way
      log "stop: 'runpodctl stop pod $id' (legacy) accepted"
      return 0
    fi
    log "stop: runpodctl could not stop the pod (pod stop, then stop pod: ${out:0:200})"
  fi
  if [[ -z "${RUNPOD_API_KEY:-}" ]]; then
    log "stop: no RUNPOD_API_KEY for RunPod's REST API"
    return 1
  fi
  local url="${RUNPOD_API_BASE_URL:-https://api.runpod.io}/v2/pods/$id/action"
  if curl --silent --show-error --fail --max-time 60 --output /dev/null -X POST \
    -H @<(printf 'Authorization: Bearer %s\n' "$RUNPOD_API_KEY") \
    -H 'Content-Type: application/json' --data '{"action": "stop"}' "$url"; then
    log "stop: POST $url {\"action\": \"stop\"} accepted"
    return 0
  fi
  log "stop: POST $url failed"
  return 1
}

# The runtime cap (maxRuntimeHours): a background process that sleeps until RUN_DEADLINE, then
# stops the pod, retrying every BOOT_STOP_RETRY_S until a stop is accepted (RunPod's SIGTERM to
# the container then reaches the running stage, which checkpoints). Without RUNPOD_POD_ID (a run
# outside RunPod) it sends SIGTERM to this boot instead.
arm_deadline() {
  if [[ -z "${RUN_DEADLINE:-}" ]]; then
    log "deadline: none (RUN_DEADLINE unset): nothing inside the pod caps its runtime"
    return 0
  fi
  local boot=$$
  log "deadline: the pod stops at $(date -u -d "@$RUN_DEADLINE" +%Y-%m-%dT%H:%M:%SZ) (RUN_DEADLINE)"
  deadline_watch() {
    trap - TERM INT EXIT
    local left
    while left=$((RUN_DEADLINE - $(date +%s))) && ((left > 0)); do
      sleep $((left < 60 ? left : 60)) </dev/null >/dev/null 2>&1
    done
    log "deadline: RUN_DEADLINE reached (maxRuntimeHours)"
    if [[ -z "${RUNPOD_POD_ID:-}" ]]; then
      log "deadline: no RUNPOD_POD_ID: ending the boot (SIGTERM) instead"
      kill -TERM "$boot"
      return 0
    fi
    until stop_pod; do
      log "deadline: stopping pod $RUNPOD_POD_ID failed; again in ${BOOT_STOP_RETRY_S}s"
      sleep "$BOOT_STOP_RETRY_S" </dev/null >/dev/null 2>&1
    done
  }
  spawn deadline_watch
  DEADLINE_PID=$CHILD
  CHILD=""
}

# Halting never hands control back to the container runtime except in BOOT_HALT=exit.
halt() {
  local status=$1
  if [[ "$BOOT_HALT" == exit ]]; then
    log "halt: exiting with status $status (BOOT_HALT=exit)"
    exit "$status"
  fi
  if [[ "$BOOT_HALT" == stop && -n "${RUNPOD_POD_ID:-}" ]]; then
    log "halt: stopping pod $RUNPOD_POD_ID so it bills no more GPU time (volume kept)"
    stop_pod || log "halt: the pod could not be stopped; parking instead"
  fi
  log "halt: parked; the pod stays up for inspection until stopped (orchestrate pod stop <id>)"
  sleep infinity >/dev/null 2>&1 &
  CHILD=$!
  wait "$CHILD" || true
  exit $((128 + 15))
}

# The child always gets SIGTERM: background jobs of a script start with SIGINT ignored.
on_signal() {
  INTERRUPTED=$1
  log "received SIG$1"
  if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null || true
  else
    exit $((128 + $2))
  fi
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
on_exit() {
  if [[ -n "$TB_PID" ]]; then kill "$TB_PID" 2>/dev/null || true; fi
  if [[ -n "$DEADLINE_PID" ]]; then kill -- "-$DEADLINE_PID" 2>/dev/null || true; fi
}
trap on_exit EXIT

# Wait for $CHILD and return its status.
wait_child() {
  local status=0
  while :; do
    status=0
    wait "$CHILD" || status=$?
    if [[ -n "$INTERRUPTED" ]] && kill -0 "$CHILD" 2>/dev/null; then
      continue  # the trap interrupted wait; the child is still saving its state
    fi
    break
  done
  CHILD=""
  return "$status"
}

# One line of progress in RUN_HEARTBEAT, the format training/heartbeat.py writes, renamed into
# place so that the watchdog never reads half of it.
beat() {  # stage, unit, progress
  local tmp="${RUN_HEARTBEAT%/*}/.tmp-${RUN_HEARTBEAT##*/}.$BASHPID"
  printf '{"stage": "%s", "unit": "%s", "progress": %s, "time": %s}\n' "$1" "$2" "$3" \
    "$(date +%s.%N)" >"$tmp" && mv -f "$tmp" "$RUN_HEARTBEAT"
}

# Copy stdin to stdout, beating once a second at most while lines arrive (pip's output).
beat_lines() {  # stage
  local line count=0 last=-1
  while IFS= read -r line; do
    printf '%s\n' "$line"
    count=$((count + 1))
    if ((SECONDS != last)); then
      last=$SECONDS
      beat "$1" "output lines" "$count"
    fi
  done
}

watchdog_var() {  # stage -> the variable that sets its limit: BOOT_WATCHDOG_MINUTES_SFT_DATA
  printf 'BOOT_WATCHDOG_MINUTES_%s' "$(tr 'a-z-' 'A-Z_' <<<"$1")"
}

# A stage's watchdog limit in seconds: its own variable, else the stage's default.
watchdog_limit() {  # stage
  local var minutes
  var=$(watchdog_var "$1")
  case "$1" in install) minutes=20 ;; prep) minutes=5 ;; *) minutes=$BOOT_WATCHDOG_MINUTES ;; esac
  minutes="${!var:-$minutes}"
  awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 0.5 }'
}

# Run one stage under the watchdog (see the header). Returns the stage's status, or 124 when the
# watchdog stopped it (WATCHDOG_FIRED then says why).
run_watched() {  # stage, command...
  local stage=$1 limit seen now changed current
  shift
  limit=$(watchdog_limit "$stage")
  beat "$stage" start 0
  spawn "$@"
  if ((limit <= 0)); then
    wait_child
    return
  fi
  seen=$(cat "$RUN_HEARTBEAT" 2>/dev/null || true)
  changed=$SECONDS
  while kill -0 "$CHILD" 2>/dev/null && [[ -z "$INTERRUPTED" ]]; do
    # a tenth of a second at first (quick stages end quickly), then once a second
    if ((SECONDS - changed < 2)); then sleep 0.1 & else sleep 1 & fi
    wait $! 2>/dev/null || true  # a trap interrupts this wait at once
    current=$(cat "$RUN_HEARTBEAT" 2>/dev/null || true)
    if [[ "$current" != "$seen" ]]; then
      seen=$current
      changed=$SECONDS
    fi
    now=$SECONDS
    if ((now - changed >= limit)) && [[ -z "$INTERRUPTED" ]]; then
      WATCHDOG_FIRED="no progress for ${limit}s, its limit (minutes in $(watchdog_var "$stage")); last heartbeat: ${seen:-none}"
      log "watchdog: stage $stage made no progress in $RUN_HEARTBEAT for ${limit}s: SIGTERM to it" \
        "(a trainer checkpoints if it can), then the pod stops. Last heartbeat: ${seen:-none}"
      kill -TERM "$CHILD" 2>/dev/null || true
      local waited=0
      while kill -0 "$CHILD" 2>/dev/null && ((waited < BOOT_WATCHDOG_KILL_S)); do
        sleep 1
        waited=$((waited + 1))
      done
      if kill -0 "$CHILD" 2>/dev/null; then
        log "watchdog: still running ${BOOT_WATCHDOG_KILL_S}s after SIGTERM: SIGKILL"
      fi
      kill -KILL -- "-$CHILD" 2>/dev/null || true  # whatever the stage started, too
      wait "$CHILD" 2>/dev/null || true
      CHILD=""
      return 124
    fi
  done
  wait_child
}

settings_fingerprint() {
  {
    printf '%s\n' "$RUN_EXPERIMENT" "$RUN_CONFIG" "$RUN_SHARD" "$SHARD_LINES" \
      "${RUN_INPUT:-}" "${RUN_FINEWEB_NAME:-}"
    git -C "$PROJECT" rev-parse HEAD 2>/dev/null || true
    cat "$RUN_CONFIG" 2>/dev/null || true
  } | sha256sum | cut -c1-16
}

fail() {  # stage, status, message
  local tmp="$RUN_DIR/.tmp-BOOT_FAILED.$$"
  log "stage $1: FAILED: $3"
  printf 'stage=%s\nstatus=%s\nsettings=%s\ntime=%s\nerror=%s\n' "$1" "$2" \
    "$(settings_fingerprint)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$3" >"$tmp"
  mv -f "$tmp" "$FAILED_MARKER"
  log "wrote $FAILED_MARKER; a boot with the same settings will refuse to run (BOOT_RETRY=1 to force)"
  halt "$2"
}

run_stage() {  # name, command...
  local name=$1 start=$SECONDS status=0
  shift
  log "stage $name: start: $*"
  run_watched "$name" "$@" || status=$?
  if [[ -n "$INTERRUPTED" ]]; then
    log "stage $name: interrupted by SIG$INTERRUPTED after $((SECONDS - start))s; the next boot resumes"
    [[ "$INTERRUPTED" == INT ]] && exit 130
    exit 143
  fi
  if [[ -n "$WATCHDOG_FIRED" ]]; then
    fail "$name" 124 "stopped by the watchdog: $WATCHDOG_FIRED"
  fi
  if ((status != 0)); then
    fail "$name" "$status" "exit status $status from: $*"
  fi
  log "stage $name: done in $((SECONDS - start))s"
}

# -- knobs are checked before anything is written ------------------------------------------
if [[ ! "$RUN_EXPERIMENT" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  log "RUN_EXPERIMENT='$RUN_EXPERIMENT' is not a folder name (letters, digits, . _ -)"
  halt 2
fi
for name in BOOT_WATCHDOG_MINUTES $(compgen -v BOOT_WATCHDOG_MINUTES_ || true); do
  if [[ ! "${!name}" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    log "$name='${!name}' must be a number of minutes (0: off)"
    halt 2
  fi
done
for name in BOOT_WATCHDOG_KILL_S BOOT_STOP_RETRY_S; do
  if [[ ! "${!name}" =~ ^[0-9]+$ ]]; then
    log "$name='${!name}' must be a whole number of seconds"
    halt 2
  fi
done
if [[ -n "${RUN_DEADLINE:-}" && ! "$RUN_DEADLINE" =~ ^[0-9]+$ ]]; then
  log "RUN_DEADLINE='$RUN_DEADLINE' must be Unix seconds (UTC), as orchestrate pod create sets it"
  halt 2
fi
if [[ -n "${RUN_PREEMPTION_GRACE_S:-}" && ! "$RUN_PREEMPTION_GRACE_S" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
  log "RUN_PREEMPTION_GRACE_S='$RUN_PREEMPTION_GRACE_S' must be a number of seconds"
  halt 2
fi
case "$BOOT_HALT" in stop | park | exit) ;; *)
  log "BOOT_HALT='$BOOT_HALT' must be stop, park or exit"
  BOOT_HALT=stop
  halt 2
  ;;
esac

mkdir -p "$RUN_DIR" "$(dirname "$RUN_HEARTBEAT")"
exec > >(tee -a "$BOOT_LOG") 2>&1

log "---- boot of experiment $RUN_EXPERIMENT (pod ${RUNPOD_POD_ID:-none}, workspace $ROOT) ----"
arm_deadline
unresolved=()
while IFS= read -r name; do
  if [[ "${!name}" =~ ^[[:space:]]*\{\{[[:space:]]*RUNPOD_SECRET_ ]]; then
    unresolved+=("$name")
    unset "$name"
  fi
done < <(compgen -e)
if ((${#unresolved[@]})); then
  log "warning: unset ${unresolved[*]}: RunPod left the secret reference unresolved (no such" \
    "secret in the console's Secrets?); continuing without it"
fi
hf_token_state="unset"  # only whether it is set: a token value is never logged
[[ -n "${HF_TOKEN:-}${HUGGINGFACEHUB_API_TOKEN:-}" ]] && hf_token_state="set"
log "knobs: RUN_SHARD=$RUN_SHARD RUN_CONFIG=$RUN_CONFIG SHARD_LINES=$SHARD_LINES" \
  "RUN_INPUT=${RUN_INPUT:-<hub ${RUN_FINEWEB_NAME:-sample-10BT}>} HF token: $hf_token_state" \
  "watchdog: ${BOOT_WATCHDOG_MINUTES} min grace: ${RUN_PREEMPTION_GRACE_S:-config}"
if git -C "$PROJECT" rev-parse --git-dir >/dev/null 2>&1; then
  log "code: $PROJECT at $(git -C "$PROJECT" rev-parse --short HEAD) (RUN_REF=${RUN_REF:-unset})"
fi
if command -v nvidia-smi >/dev/null; then
  log "gpus: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | paste -sd ';')"
fi

# The RunPod image's own start script (sshd from PUBLIC_KEY, Jupyter) would have been the
# container command; the pod's command replaced it, so it runs beside the boot.
START_SCRIPT="${BOOT_START_SCRIPT:-/start.sh}"
if [[ -x "$START_SCRIPT" ]]; then
  log "starting the image's $START_SCRIPT in the background (SSH, Jupyter): $RUN_DIR/start.log"
  "$START_SCRIPT" >>"$RUN_DIR/start.log" 2>&1 &
fi

if [[ -d "$PROJECT" ]]; then
  cd "$PROJECT"
fi

if [[ -f "$FAILED_MARKER" ]]; then
  failed_stage=$(sed -n 's/^stage=//p' "$FAILED_MARKER")
  failed_settings=$(sed -n 's/^settings=//p' "$FAILED_MARKER")
  if [[ "${BOOT_RETRY:-0}" == 1 ]]; then
    log "BOOT_RETRY=1: retrying after the failed stage '$failed_stage'"
  elif [[ "$failed_settings" == "$(settings_fingerprint)" ]]; then
    log "refusing to boot: stage '$failed_stage' failed on a previous boot with these same" \
      "settings (see $BOOT_LOG and $FAILED_MARKER). Fix it, then change a setting," \
      "set BOOT_RETRY=1 or delete $FAILED_MARKER."
    halt 3
  else
    log "stage '$failed_stage' failed on a previous boot with other settings: retrying"
  fi
  rm -f "$FAILED_MARKER"
fi

# -- 0 install -----------------------------------------------------------------------------
# pip may resolve podtrain's `torch>=...` to another multi-GB build; the constraints file (on the
# container disk) holds it to the exact torch the image ships, and the cuda extra brings liger.
install_podtrain() {
  if command -v orchestrate >/dev/null && command -v fineweb-sharder >/dev/null; then
    log "podtrain is installed: $(command -v orchestrate)"
    return 0
  fi
  if [[ ! -f "$PROJECT/pyproject.toml" ]]; then
    log "no podtrain: clone it to $PROJECT on the volume, or use the image built from infra/Dockerfile"
    return 1
  fi
  local torch_version constraints
  # the installed distribution's version: what pip compares a constraint with (torch.__version__
  # says the same, after seconds of importing torch)
  if ! torch_version=$(python -c 'from importlib.metadata import version; print(version("torch"))'); then
    log "the image's python has no torch: use a RunPod PyTorch image (runpod/pytorch)"
    return 1
  fi
  constraints=$(mktemp "${TMPDIR:-/tmp}/podtrain-constraints.XXXXXX")
  printf 'torch==%s\n' "$torch_version" >"$constraints"
  log "install: pip install -e '$PROJECT[cuda]' pinned to the image's torch $torch_version"
  local status=0
  pip install --no-input -e "$PROJECT[cuda]" -c "$constraints" 2>&1 | beat_lines install || status=$?
  rm -f "$constraints"
  ((status == 0)) && command -v orchestrate >/dev/null && command -v fineweb-sharder >/dev/null
}
run_stage install install_podtrain

# -- 1 prep --------------------------------------------------------------------------------
export HF_HOME="${HF_HOME:-$ROOT/hf_cache}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
prep_dirs() {
  mkdir -p "$ROOT/datasets/train/$RUN_EXPERIMENT" "$ROOT/datasets/val/$RUN_EXPERIMENT" \
    "$ROOT/artifacts/tokenizer/$RUN_EXPERIMENT" "$ROOT/cache/$RUN_EXPERIMENT" \
    "$RUN_DIR/tensorboard" "$HF_HOME" "$HF_DATASETS_CACHE"
  if [[ ! "$RUN_SHARD" =~ ^(auto|0|1)$ ]]; then
    log "RUN_SHARD='$RUN_SHARD' must be auto, 0 or 1"
    return 2
  fi
  if [[ ! "$RUN_STAGES" =~ ^(pretrain|instruct|tool|reasoning)(,(instruct|tool|reasoning))*$ ]]; then
    log "RUN_STAGES='$RUN_STAGES' must be a comma-separated subset of pretrain,instruct,tool,reasoning"
    return 2
  fi
  if [[ ! "$SHARD_LINES" =~ ^[1-9][0-9]*$ ]]; then
    log "SHARD_LINES='$SHARD_LINES' must be a positive integer"
    return 2
  fi
}
run_stage prep prep_dirs

# -- 2 shard -------------------------------------------------------------------------------
# A shard set is complete once the sharder's manifest says so (its source exhausted, or --take
# reached); an interrupted one is resumed by running the sharder again.
shards_complete() {
  python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("complete") else 1)' \
    "$ROOT/datasets/train/$RUN_EXPERIMENT/manifest.json" 2>/dev/null
}
if [[ "$RUN_SHARD" == 1 ]] || { [[ "$RUN_SHARD" == auto ]] && ! shards_complete; }; then
  if [[ -n "${RUN_INPUT:-}" ]]; then
    source_args=(--input "$RUN_INPUT")
  else
    source_args=(--name "${RUN_FINEWEB_NAME:-sample-10BT}")
  fi
  run_stage shard fineweb-sharder --mode split --lines-per-shard "$SHARD_LINES" \
    --experiment "$RUN_EXPERIMENT" --workspace "$ROOT" "${source_args[@]}"
else
  log "stage shard: skipped (RUN_SHARD=$RUN_SHARD): using the shards in $ROOT/datasets/{train,val}/$RUN_EXPERIMENT"
fi

# -- 3 tokenizer + emit --------------------------------------------------------------------
orchestrate_args=(--mode cloud --workspace "$ROOT" --experiment "$RUN_EXPERIMENT"
  --config "$RUN_CONFIG" --train-shard-lines "$SHARD_LINES" --reuse-shards)
if [[ -n "${RUN_PREEMPTION_GRACE_S:-}" ]]; then
  orchestrate_args+=("preemption_grace_s=$RUN_PREEMPTION_GRACE_S")  # spot: RunPod's real window
fi
if [[ ",$RUN_STAGES," == *,pretrain,* ]]; then
  run_stage tokenizer orchestrate "${orchestrate_args[@]}" --stop-after emit
else
  log "stage tokenizer: skipped (RUN_STAGES=$RUN_STAGES has no pretrain): fine-tuning starts from $RUN_DIR/checkpoints/final"
fi

# -- 3b sft-data (RUN_STAGES with instruct/tool/reasoning) ---------------------------------
sft_stages="$(tr ',' '\n' <<<"$RUN_STAGES" | grep -v '^pretrain$' | paste -sd' ' || true)"
if [[ -n "$sft_stages" ]]; then
  sft_args=(--mode cloud --workspace "$ROOT" --experiment "$RUN_EXPERIMENT")
  [[ -n "${RUN_INSTRUCT_LIMIT:-}" ]] && sft_args+=(--instruct-limit "$RUN_INSTRUCT_LIMIT")
  [[ -n "${RUN_TOOL_LIMIT:-}" ]] && sft_args+=(--tool-limit "$RUN_TOOL_LIMIT")
  [[ -n "${RUN_REASONING_LIMIT:-}" ]] && sft_args+=(--reasoning-limit "$RUN_REASONING_LIMIT")
  # shellcheck disable=SC2086  # one word per stage
  run_stage sft-data orchestrate sft prepare "${sft_args[@]}" --stages $sft_stages
fi

# -- 4 train -------------------------------------------------------------------------------
if command -v tensorboard >/dev/null; then
  tensorboard --logdir "$RUN_DIR/tensorboard" --host 0.0.0.0 --port 6006 \
    >>"$RUN_DIR/tensorboard.log" 2>&1 &
  TB_PID=$!
  log "tensorboard on :6006 (pid $TB_PID) from $RUN_DIR/tensorboard;" \
    "https://${RUNPOD_POD_ID:-<podId>}-6006.proxy.runpod.net"
else
  log "tensorboard is not installed: no dashboard on :6006 (training continues)"
fi
run_stage train orchestrate "${orchestrate_args[@]}" --stages "$RUN_STAGES"

log "boot finished: training is complete; checkpoints in $RUN_DIR/checkpoints"
halt 0
