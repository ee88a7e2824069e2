# Shared by the job scripts in scripts/slurm/ (sourced, not run): the run folder, the job log, and a
# step that survives preemption by checkpointing and requeueing itself.
#
# How preemption works, measured on slurm-wlm 22.05 with torch 2.14 (tests/test_slurm.py runs it):
#  * `#SBATCH --signal=B:USR1@300` asks SLURM for SIGUSR1 to the batch shell ~300 s before the time
#    limit (SLURM checks every ~30 s, so it may come up to a minute early). `B:` (the batch shell only,
#    not the steps) so that the shell knows the allocation is ending, even if the trainer dies of a
#    signal that came before it installed its handler; without `B:` plain torchrun would die of it.
#  * bash runs a trap only between commands, so the step runs in the background and the shell `wait`s.
#    The trap sends SIGUSR1 to `srun`, which forwards it to every process of the step. SIGUSR1 also for
#    a SIGTERM the shell gets (`scancel -b --signal=TERM`): srun answers SIGTERM by killing the step.
#  * `scancel --signal=TERM|USR1 <job>` (steps only) reaches the trainers directly.
#  * The trainer finishes its step, writes last.pth, exits 75; scripts/slurm/launch.py (torchrun that
#    keeps the workers' exit code) exits 75, srun exits 75, and this script runs
#    `scontrol requeue $SLURM_JOB_ID`. The job goes back to the queue with the same id, the same run
#    folder and a fresh time limit; SLURM 22.05 holds a requeued job ~2 min (Reason=BeginTime) before it
#    is eligible again. The new start resumes from last.pth (run.resume=auto, the default).
#  * If the shell got a stop signal, the job requeues even when the step did not exit 75 (a signal that
#    came before the trainer installed its handler): the allocation ends anyway, and the resumed run
#    starts from the newest checkpoint. A plain `scancel` cancels: SLURM refuses to requeue a cancelled
#    job, so it stays cancelled.
#  * A SIGTERM to every process of the job (`scancel --full`, preemption with GraceTime unless the site
#    sets PreemptParameters=send_user_signal) also reaches srun, which answers SIGTERM by SIGKILLing
#    its step at once (it does so even when started with SIGTERM ignored). The trainer then gets
#    no time to checkpoint; the job still requeues (the shell got SIGTERM) and resumes from the newest
#    periodic checkpoint: set run.ckpt_every_steps to bound what is lost. Prefer the USR1 warning.
#  * Without the warning signal, the time limit sends SIGTERM to everything and, KillWait (often 30 s)
#    later, SIGKILL: the job ends TIMEOUT and is not requeued.

PYTHON=${PYTHON:-python}          # the interpreter of your environment (activate it before sbatch)
MAX_REQUEUES=${MAX_REQUEUES:-100}  # safety valve against a requeue loop

# resolve_run_dir ARGS...: RUN_DIR, the folder train.py will write to: a `run.output_dir=` override,
# else $RUN_DIR (then appended as that override: OUTPUT_OVERRIDE), else the config's run.output_dir
# (scripts/slurm/run_dir.py reads it as train.py does). One fixed folder per config, as with torchrun:
# a requeued start resumes from it, and configs/tresnet_m_448.yaml finds runs/tresnet_m/best.pth.
# Returns 2 on a config error (its message goes to the job's --output file).
resolve_run_dir() {
  OUTPUT_OVERRIDE=()
  local arg given=""
  for arg in "$@"; do
    case "$arg" in run.output_dir=*) given=${arg#run.output_dir=} ;; esac
  done
  if [ -n "$given" ]; then
    RUN_DIR=$given
  elif [ -n "${RUN_DIR:-}" ]; then
    OUTPUT_OVERRIDE=("run.output_dir=$RUN_DIR")
  else
    RUN_DIR=$("$PYTHON" scripts/slurm/run_dir.py "$@") || return
  fi
  mkdir -p "$RUN_DIR"
}

# log_to_run_dir: from here on, copy this job's output into $RUN_DIR/slurm-<job id>.out as well.
log_to_run_dir() {
  # tee ignores SIGTERM: a job-wide SIGTERM (preemption, `scancel --full`) must not kill the log, or the
  # shell's next line dies of SIGPIPE before it can requeue.
  exec > >(trap '' TERM; exec tee -a "$RUN_DIR/slurm-${SLURM_JOB_ID}.out") 2>&1
  echo "[$(date +%FT%T)] job ${SLURM_JOB_ID} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}," \
       "run folder ${RUN_DIR}"
}

# run_preemptible CMD...: run CMD (an srun line) so that a stop signal makes it checkpoint, then
# requeue the job when it stopped that way. Returns CMD's exit code otherwise.
run_preemptible() {
  STOP_SIGNAL="" STEP_PID=""
  trap 'STOP_SIGNAL=USR1; echo "[$(date +%T)] batch shell got SIGUSR1: passing it to the step"; kill -USR1 $STEP_PID' USR1
  trap 'STOP_SIGNAL=TERM; echo "[$(date +%T)] batch shell got SIGTERM: passing SIGUSR1 to the step"; kill -USR1 $STEP_PID' TERM
  "$@" &
  STEP_PID=$!
  local rc
  while true; do
    wait "$STEP_PID"; rc=$?
    # a trap interrupts `wait` with 128+signal while the step is still running: wait again
    if [ "$rc" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1 TERM
  echo "[$(date +%FT%T)] step exited with $rc${STOP_SIGNAL:+ after SIG$STOP_SIGNAL}"
  if [ "$rc" -eq 75 ] || { [ -n "$STOP_SIGNAL" ] && [ "$rc" -ne 0 ]; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      echo "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)"
      return 75
    fi
    echo "[$(date +%FT%T)] requeueing job ${SLURM_JOB_ID}: the next start resumes from ${RUN_DIR}/last.pth"
    scontrol requeue "$SLURM_JOB_ID" && sleep 60  # requeue ends this allocation; wait to be stopped
    return 75  # requeue refused (e.g. the job was cancelled): report the stop
  fi
  return "$rc"
}
