#!/usr/bin/env bash
# The pod's boot: install podtrain, then four stages, each logged with a timestamp to the pod log
# (stdout) and to <root>/runs/$RUN_EXPERIMENT/boot.log on the volume. The manifest's start command
# (infra/runpod-pod.yaml) has already cloned or updated RUN_REPO at RUN_REF into $PODTRAIN_PROJECT;
# the Dockerfile image runs this script from /opt/podtrain instead.
#
#   0 install    podtrain from the volume checkout (pip install -e) unless the image has it
#   1 prep       the /workspace layout, with the experiment's subfolders
#   2 shard      RUN_SHARD=1 only: fineweb-sharder into datasets/{train,val}/$RUN_EXPERIMENT
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
# Restart policy (docs/runpod.md): this script never returns to the container runtime on its own,
# because RunPod restarts an exited container and a crash loop bills GPU hours for nothing. A
# failed stage writes runs/$RUN_EXPERIMENT/BOOT_FAILED (stage, settings fingerprint) and halts;
# a boot that finds BOOT_FAILED with the same settings refuses to run and halts again. To halt is
# BOOT_HALT: stop (default: `runpodctl pod stop $RUNPOD_POD_ID` when both exist, else park),
# park (sleep, pod stays up for inspection), exit (return the status: local runs and tests).
# Retry after a fix: change a setting (knobs, config file, git checkout), set BOOT_RETRY=1, or
# delete BOOT_FAILED. SIGTERM/SIGINT (a spot preemption, `pod stop`) go to the running stage and
# are not failures: the next boot resumes.
#
# Watchdog: while training runs, a step must reach runs/$RUN_EXPERIMENT/checkpoints/metrics.jsonl
# at least every BOOT_WATCHDOG_MINUTES (30; 0 turns it off). Otherwise (a hung trainer, an NCCL
# deadlock) the trainer gets SIGTERM (it checkpoints when it can), SIGKILL BOOT_WATCHDOG_KILL_S
# (120) seconds later if it is still there, boot.log says why, and the boot halts (the pod stops) instead of billing a hang.
#
# Spot: RUN_PREEMPTION_GRACE_S (set to 5 by `orchestrate pod create` for spot: true) is passed to
# the trainer as the override preemption_grace_s=<s>.
#
# Secrets: RunPod leaves a `{{ RUNPOD_SECRET_name }}` reference as the literal text when no such
# secret exists; such variables are unset here (one warning line), so e.g. a literal HF_TOKEN
# never turns public downloads into 401s.
#
# Knobs: RUN_SHARD (0) RUN_EXPERIMENT (runpod-1b) RUN_CONFIG (configs/runpod_1b.yaml) RUN_STAGES (pretrain)
# SHARD_LINES (250000) RUN_INPUT (local corpus for the sharder; default: the FineWeb hub dataset
# RUN_FINEWEB_NAME, sample-10BT) RUN_PREEMPTION_GRACE_S PODTRAIN_WORKSPACE (/workspace)
# PODTRAIN_PROJECT (/workspace/transformer) BOOT_HALT BOOT_RETRY BOOT_WATCHDOG_MINUTES (30)
# BOOT_START_SCRIPT (/start.sh, the RunPod image's SSH/Jupyter starter, launched in the background).
set -euo pipefail

ROOT="${PODTRAIN_WORKSPACE:-/workspace}"
PROJECT="${PODTRAIN_PROJECT:-/workspace/transformer}"
RUN_SHARD="${RUN_SHARD:-0}"
RUN_STAGES="${RUN_STAGES:-pretrain}"
RUN_EXPERIMENT="${RUN_EXPERIMENT:-runpod-1b}"
RUN_CONFIG="${RUN_CONFIG:-configs/runpod_1b.yaml}"
SHARD_LINES="${SHARD_LINES:-250000}"
BOOT_HALT="${BOOT_HALT:-stop}"
BOOT_WATCHDOG_MINUTES="${BOOT_WATCHDOG_MINUTES:-30}"
BOOT_WATCHDOG_KILL_S="${BOOT_WATCHDOG_KILL_S:-120}"
RUN_DIR="$ROOT/runs/$RUN_EXPERIMENT"
BOOT_LOG="$RUN_DIR/boot.log"
FAILED_MARKER="$RUN_DIR/BOOT_FAILED"
CHILD=""
INTERRUPTED=""
WATCHDOG_FIRED=""
TB_PID=""

log() { printf '%s boot: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# Halting never hands control back to the container runtime except in BOOT_HALT=exit.
halt() {
  local status=$1
  if [[ "$BOOT_HALT" == exit ]]; then
    log "halt: exiting with status $status (BOOT_HALT=exit)"
    exit "$status"
  fi
  # Every pod ships runpodctl with a pod-scoped key; without it, the same key through podtrain.
  if [[ "$BOOT_HALT" == stop && -n "${RUNPOD_POD_ID:-}" ]]; then
    if command -v runpodctl >/dev/null; then
      log "halt: stopping pod $RUNPOD_POD_ID so it bills no more GPU time (volume kept)"
      runpodctl pod stop "$RUNPOD_POD_ID" || runpodctl stop pod "$RUNPOD_POD_ID" \
        || log "halt: runpodctl could not stop the pod; parking instead"
    elif [[ -n "${RUNPOD_API_KEY:-}" ]] && command -v orchestrate >/dev/null; then
      log "halt: stopping pod $RUNPOD_POD_ID so it bills no more GPU time (volume kept)"
      orchestrate pod stop "$RUNPOD_POD_ID" || log "halt: could not stop the pod; parking instead"
    fi
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
stop_tensorboard() { if [[ -n "$TB_PID" ]]; then kill "$TB_PID" 2>/dev/null || true; fi; }
trap stop_tensorboard EXIT

# Run one command in the background and wait for it, so a signal reaches this shell's trap (bash
# defers traps while a foreground child runs) and is forwarded to the child.
run_child() {
  "$@" &
  CHILD=$!
  wait_child
}

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

mtime() { stat -c %Y "$1" 2>/dev/null || echo 0; }

# The newest step logged by any stage of the run: pretraining's, or a fine-tuning stage's (runs/<exp>/<stage>/checkpoints).
newest_progress() {
  local newest=0 t f
  for f in "$RUN_DIR/checkpoints/metrics.jsonl" "$RUN_DIR"/*/checkpoints/metrics.jsonl; do
    t=$(mtime "$f")
    ((t > newest)) && newest=$t
  done
  echo "$newest"
}

# The training run under the progress watchdog (see the header). It runs in a session of its own
# so that SIGKILL reaches the trainer under orchestrate too; SIGTERM still goes to orchestrate,
# which passes it on. Returns the run's status, or 124 when the watchdog stopped it.
run_watched() {
  local limit progress="$RUN_DIR/checkpoints/metrics.jsonl (or a fine-tuning stage's)"
  limit=$(awk -v m="$BOOT_WATCHDOG_MINUTES" 'BEGIN { printf "%d", m * 60 }')
  if ((limit <= 0)); then
    run_child "$@"
    return
  fi
  setsid "$@" &
  CHILD=$!
  local started=$SECONDS start_clock last now
  start_clock=$(date +%s)
  while kill -0 "$CHILD" 2>/dev/null && [[ -z "$INTERRUPTED" ]]; do
    sleep 1 &
    wait $! 2>/dev/null || true  # a trap interrupts this wait at once
    last=$(newest_progress)
    ((last < start_clock)) && last=$start_clock
    now=$(date +%s)
    if ((now - last >= limit)) && [[ -z "$INTERRUPTED" ]]; then
      log "watchdog: no training step logged to $progress for ${BOOT_WATCHDOG_MINUTES} min" \
        "(BOOT_WATCHDOG_MINUTES): the trainer is hung; SIGTERM to it (it checkpoints if it can)," \
        "then the pod stops"
      kill -TERM "$CHILD" 2>/dev/null || true
      local waited=0
      while kill -0 "$CHILD" 2>/dev/null && ((waited < BOOT_WATCHDOG_KILL_S)); do
        sleep 1
        waited=$((waited + 1))
      done
      if kill -0 "$CHILD" 2>/dev/null; then
        log "watchdog: still running ${BOOT_WATCHDOG_KILL_S}s after SIGTERM: SIGKILL"
        kill -KILL -- "-$CHILD" 2>/dev/null || true
      fi
      wait "$CHILD" 2>/dev/null || true
      CHILD=""
      WATCHDOG_FIRED=1
      log "watchdog: training stopped after $((SECONDS - started))s in the stage"
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

run_stage() {  # name, command...  (the train stage runs under the watchdog)
  local name=$1 start=$SECONDS status=0 runner=run_child
  shift
  [[ "$name" == train ]] && runner=run_watched
  log "stage $name: start: $*"
  "$runner" "$@" || status=$?
  if [[ -n "$INTERRUPTED" ]]; then
    log "stage $name: interrupted by SIG$INTERRUPTED after $((SECONDS - start))s; the next boot resumes"
    [[ "$INTERRUPTED" == INT ]] && exit 130
    exit 143
  fi
  if [[ -n "$WATCHDOG_FIRED" ]]; then
    # Not BOOT_FAILED: a hang can be transient, and the next boot resumes from the checkpoint.
    log "stage $name: stopped by the watchdog; halting so the pod bills no more"
    halt 124
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
if [[ ! "$BOOT_WATCHDOG_MINUTES" =~ ^[0-9]+(\.[0-9]+)?$ || ! "$BOOT_WATCHDOG_KILL_S" =~ ^[0-9]+$ ]]; then
  log "BOOT_WATCHDOG_MINUTES='$BOOT_WATCHDOG_MINUTES' must be a number of minutes (0: off)," \
    "BOOT_WATCHDOG_KILL_S='$BOOT_WATCHDOG_KILL_S' a whole number of seconds"
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

mkdir -p "$RUN_DIR"
exec > >(tee -a "$BOOT_LOG") 2>&1

log "---- boot of experiment $RUN_EXPERIMENT (pod ${RUNPOD_POD_ID:-none}, workspace $ROOT) ----"
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
install_podtrain() {
  if command -v orchestrate >/dev/null && command -v fineweb-sharder >/dev/null; then
    log "podtrain is installed: $(command -v orchestrate)"
    return 0
  fi
  if [[ ! -f "$PROJECT/pyproject.toml" ]]; then
    log "no podtrain: clone it to $PROJECT on the volume, or use the image built from infra/Dockerfile"
    return 1
  fi
  pip install --no-input -e "$PROJECT"
  command -v orchestrate >/dev/null && command -v fineweb-sharder >/dev/null
}
run_stage install install_podtrain

# -- 1 prep --------------------------------------------------------------------------------
export HF_HOME="${HF_HOME:-$ROOT/hf_cache}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
prep_dirs() {
  mkdir -p "$ROOT/datasets/train/$RUN_EXPERIMENT" "$ROOT/datasets/val/$RUN_EXPERIMENT" \
    "$ROOT/artifacts/tokenizer/$RUN_EXPERIMENT" "$ROOT/cache/$RUN_EXPERIMENT" \
    "$RUN_DIR/tensorboard" "$HF_HOME" "$HF_DATASETS_CACHE"
  if [[ ! "$RUN_SHARD" =~ ^[01]$ ]]; then
    log "RUN_SHARD='$RUN_SHARD' must be 0 or 1"
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
if [[ "$RUN_SHARD" == 1 ]]; then
  if [[ -n "${RUN_INPUT:-}" ]]; then
    source_args=(--input "$RUN_INPUT")
  else
    source_args=(--name "${RUN_FINEWEB_NAME:-sample-10BT}")
  fi
  run_stage shard fineweb-sharder --mode split --lines-per-shard "$SHARD_LINES" \
    --experiment "$RUN_EXPERIMENT" --workspace "$ROOT" "${source_args[@]}"
else
  log "stage shard: skipped (RUN_SHARD=0): using the shards in $ROOT/datasets/{train,val}/$RUN_EXPERIMENT"
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
