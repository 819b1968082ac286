#!/usr/bin/env bash
# The measurement check to run on an NVIDIA host, in one command:
#
#   scripts/gpu-check.sh
#
# It builds the service with CUDA, serves on every GPU (`--devices auto`) with a fresh SQLite
# database, submits image and video jobs enough to keep every GPU busy, and cross-checks each
# job's row against what the service cannot influence:
#   - the client's own clock: duration_seconds (and queue wait + duration) must fit inside
#     the latency the client observed from before its POST to the first read of the end;
#   - the driver, through nvidia-smi sampled every 50 ms during the run: the device's used
#     memory during the job must cover the allocator's vram_peak_mb, and agree with the NVML
#     figures the service stored in extra.device_memory.
# FIXME: duration_seconds is bounded here only from above (the client's clock); no device-side
# timing (CUDA events around the job) bounds it from below, so a timer stopped before the GPU
# finished would still pass this script. The CPU tests, with a device double whose work ends
# after its submit call returns, are what guard that today.
# It writes ${OUT:-./gpu-check-out}/report.md (and the raw rows, samples and server log beside
# it), prints the report, and exits non-zero if a check failed.
#
# Settings (environment): OUT, DEVICES (default auto), JOBS_PER_GPU (image and video jobs per
# GPU, default 2 each), IMAGE_SIZE (default 256), VIDEO_SIZE (default 128), STEPS (default
# 20), GPU_CHECK_TIMEOUT (whole run, seconds, default 2400), STARTUP_TIMEOUT (seconds the
# service may take to listen, default 300), JOB_TIMEOUT (seconds the jobs may take, default
# 1200), CARGO_FLAGS (extra flags for cargo build), SEIDRA_BIN (a binary to use instead of
# building; only for trying this script out, e.g. with DEVICES=cpu, where the GPU checks fail).
set -euo pipefail

TOTAL_TIMEOUT=${GPU_CHECK_TIMEOUT:-2400}

# The whole run, build included, under one deadline; the inner run cleans up on SIGTERM.
if [[ -z ${GPU_CHECK_INNER:-} ]]; then
    if ! command -v timeout >/dev/null; then
        echo "gpu-check: \`timeout\` (coreutils) is needed" >&2
        exit 2
    fi
    GPU_CHECK_INNER=1 exec timeout --kill-after=30 "$TOTAL_TIMEOUT" bash "$0" "$@"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICES=${DEVICES:-auto}
JOBS_PER_GPU=${JOBS_PER_GPU:-2}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
export IMAGE_SIZE=${IMAGE_SIZE:-256} VIDEO_SIZE=${VIDEO_SIZE:-128} STEPS=${STEPS:-20}

SERVER_PID=""
SMI_PID=""

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $SMI_PID ]] && kill -0 "$SMI_PID" 2>/dev/null; then
        kill "$SMI_PID" 2>/dev/null || true
        wait "$SMI_PID" 2>/dev/null || true
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # The service shuts down in order on SIGINT (it flushes its rows); then TERM, KILL.
        local signal
        for signal in INT TERM KILL; do
            kill -"$signal" "$SERVER_PID" 2>/dev/null || true
            for _ in $(seq 1 300); do
                kill -0 "$SERVER_PID" 2>/dev/null || break 2
                sleep 0.1
            done
            log "the service did not stop on SIG$signal within 30 s"
        done
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if ((status == 124 || status == 143)); then
        log "stopped: the run exceeded GPU_CHECK_TIMEOUT=${TOTAL_TIMEOUT}s"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

for tool in cargo curl python3; do
    command -v "$tool" >/dev/null || die "\`$tool\` is needed"
done
HAVE_SMI=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    HAVE_SMI=1
    nvidia-smi -L >"$OUT/gpus.txt"
    log "GPUs: $(wc -l <"$OUT/gpus.txt")"
else
    log "warning: nvidia-smi is missing or sees no GPU; the driver cross-check is skipped"
fi
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    # The service maps cuda:<i> to the i-th listed GPU for its own NVML figures; this script's
    # nvidia-smi cross-check does not.
    log "warning: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: nvidia-smi indexes may not match cuda:<i>"
fi

if [[ -n ${SEIDRA_BIN:-} ]]; then
    # For checking this script itself on a host without a GPU: a binary built elsewhere.
    SEIDRA=$SEIDRA_BIN
    log "using $SEIDRA, not building"
else
    log "building (cargo build --release --features cuda)"
    # shellcheck disable=SC2086 # CARGO_FLAGS is a list of flags
    (cd "$ROOT" && cargo build --release --features cuda ${CARGO_FLAGS:-}) >"$OUT/build.log" 2>&1 ||
        die "the build failed; see $OUT/build.log (tail below)
$(tail -n 30 "$OUT/build.log")"
    SEIDRA="$ROOT/target/release/seidra"
fi
[[ -x $SEIDRA ]] || die "no binary at $SEIDRA"

DATA="$OUT/data"
rm -rf "$DATA"
mkdir -p "$DATA"
SEIDRA_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export SEIDRA_JWT_SECRET
unset SEIDRA_DATABASE_URL SEIDRA_PORT SEIDRA_DEVICES SEIDRA_CONFIG

log "starting the service on a free port (--devices $DEVICES)"
"$SEIDRA" serve --data-dir "$DATA" --host 127.0.0.1 --port 0 --devices "$DEVICES" \
    --log-format json >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

BASE=""
for _ in $(seq 1 $((STARTUP_TIMEOUT * 10))); do
    kill -0 "$SERVER_PID" 2>/dev/null || die "the service exited while starting; see $OUT/server.log
$(tail -n 20 "$OUT/server.log")"
    BASE=$(grep '"message":"listening"' "$OUT/server.log" | grep -o '"address":"http://[^"]*"' |
        head -n 1 | cut -d'"' -f4 || true)
    [[ -n $BASE ]] && break
    sleep 0.1
done
[[ -n $BASE ]] || die "the service did not listen within ${STARTUP_TIMEOUT}s; see $OUT/server.log"
curl -fsS "$BASE/health" >/dev/null || die "$BASE/health does not answer"
log "listening at $BASE"

TOKEN=$("$SEIDRA" token --data-dir "$DATA" --user gpu-check --role operator --hours 2)

if ((HAVE_SMI)); then
    nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits \
        -lms 50 >"$OUT/nvidia-smi.csv" 2>"$OUT/nvidia-smi.err" &
    SMI_PID=$!
fi

cat >"$OUT/check.py" <<'PY'
"""Submits the jobs, times each from the client, and cross-checks the rows."""
import csv
import datetime as dt
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

base, token, out, have_smi, per_gpu = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
image_size, video_size, steps = (int(os.environ[k]) for k in ("IMAGE_SIZE", "VIDEO_SIZE", "STEPS"))
deadline = time.monotonic() + float(os.environ.get("JOB_TIMEOUT", "1200"))


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def gpu_count():
    if not have_smi:
        return 1
    with open(os.path.join(out, "gpus.txt")) as listing:
        return max(1, sum(1 for line in listing if line.startswith("GPU ")))


results = []
lock = threading.Lock()


def run(body):
    started = time.monotonic()
    status, answer = call("POST", "/api/jobs", body)
    if status != 202:
        with lock:
            results.append({"body": body, "error": f"submit answered {status}: {answer}"})
        return
    job_id = answer["job_id"]
    while time.monotonic() < deadline:
        status, job = call("GET", f"/api/jobs/{job_id}")
        if status == 200 and job["status"] in ("succeeded", "failed", "cancelled"):
            latency = time.monotonic() - started
            with lock:
                results.append({"body": body, "job": job, "latency": latency})
            return
        time.sleep(0.05)
    with lock:
        results.append({"body": body, "error": f"job {job_id} did not end in time"})


gpus = gpu_count()
bodies = []
for n in range(gpus * per_gpu):
    bodies.append({"media_type": "image", "prompt": f"gpu check image {n}", "width": image_size,
                   "height": image_size, "steps": steps, "images": 2, "seed": n})
    bodies.append({"media_type": "video", "prompt": f"gpu check video {n}", "width": video_size,
                   "height": video_size, "steps": max(1, steps // 2), "frames": 16, "fps": 8,
                   "seed": 1000 + n})
threads = [threading.Thread(target=run, args=(body,)) for body in bodies]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()

samples = {}  # gpu index -> [(epoch seconds, MiB)]
if have_smi:
    with open(os.path.join(out, "nvidia-smi.csv")) as smi:
        for row in csv.reader(smi):
            try:
                stamp = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").astimezone()
                samples.setdefault(int(row[1]), []).append((stamp.timestamp(), float(row[2])))
            except (ValueError, IndexError):
                continue

checks = []  # (severity, job, text)


def check(ok, severity, job, text):
    if not ok:
        checks.append((severity, job, text))


lines = []
devices_seen = set()


def fmt(value, digits=1):
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def examine(short, row, latency):
    """Checks one job's row; answers its line of the table."""
    extra = row.get("extra") or {}
    device, status = row.get("device", "?"), row.get("status")
    duration, wait = row.get("duration_seconds"), row.get("queue_wait_seconds")
    peak, allocated = row.get("vram_peak_mb"), row.get("vram_allocated_mb")
    reserved, delta = row.get("vram_reserved_mb"), row.get("vram_delta_mb")
    memory = extra.get("device_memory") or {}
    used_peak, process_peak = memory.get("used_peak_mib"), memory.get("process_peak_mib")
    smi_max = None

    def line():
        return (
            f"| {short} | {row.get('media_type')} | {device} | {status} | {row.get('outputs')} "
            f"| {fmt(duration, 3)} | {fmt(latency, 3)} | {fmt(wait, 3)} | {fmt(allocated)} "
            f"| {fmt(reserved)} | {fmt(peak)} | {fmt(delta)} | {fmt(used_peak)} "
            f"| {fmt(process_peak)} | {fmt(smi_max)} |"
        )

    if status != "succeeded":
        check(False, "FAIL", short, f"status {status}: {extra.get('error')}")
        return line()
    devices_seen.add(device)
    if not device.startswith("cuda:"):
        check(False, "FAIL", short, f"ran on `{device}`: the service found no GPU")
        return line()

    check(duration <= latency, "FAIL", short,
          f"duration_seconds {duration:.4f} > client latency {latency:.4f}")
    check(wait + duration <= latency + 0.005, "FAIL", short,
          f"queue wait {wait:.4f} + duration {duration:.4f} > client latency {latency:.4f}")
    total = extra.get("total_seconds")
    check(total is not None and total >= wait + duration, "FAIL", short,
          f"extra.total_seconds {total} < queue wait {wait:.4f} + duration {duration:.4f}")

    vram_known = None not in (peak, allocated, reserved, delta)
    check(vram_known, "FAIL", short, "a vram_* column is NULL on a GPU")
    if vram_known:
        check(0 <= delta <= peak, "FAIL", short, f"vram_delta_mb {delta} outside [0, peak {peak}]")
        check(peak + 1 >= allocated, "FAIL", short,
              f"vram_peak_mb {peak} < vram_allocated_mb {allocated}")
        check(reserved + 1 >= allocated, "FAIL", short,
              f"vram_reserved_mb {reserved} < vram_allocated_mb {allocated}")

    check(bool(memory), "FAIL", short, "extra.device_memory is missing")
    if memory:
        check(memory.get("source") == "nvml", "FAIL", short,
              f"extra.device_memory.source is {memory.get('source')}, not nvml")
        check(memory.get("samples", 0) >= 2, "WARN", short,
              f"only {memory.get('samples')} NVML readings")
        rate = memory.get("samples_per_second")
        # Over a short job the first and last readings (taken by the meter itself) weigh
        # too much for the rate to say anything about the sampler thread.
        if duration >= 0.2:
            check(rate is not None and rate >= 50, "FAIL", short,
                  f"NVML read {rate} times per second during the job, under 50")
        if used_peak is not None and vram_known:
            check(used_peak + 1 >= peak, "FAIL", short,
                  f"NVML used_peak_mib {used_peak} < allocator vram_peak_mb {peak}")
        if not memory.get("process_visible"):
            check(False, "WARN", short, "the driver does not show this process (container?)")
        elif process_peak is not None and vram_known:
            check(process_peak + 1 >= peak, "FAIL", short,
                  f"NVML process_peak_mib {process_peak} < allocator vram_peak_mb {peak}")

    if have_smi:
        index = int(device.split(":")[1])
        submitted = dt.datetime.fromisoformat(extra["submitted_at"].replace("Z", "+00:00"))
        start = submitted.timestamp() + wait
        window = [mib for (t, mib) in samples.get(index, [])
                  if start - 0.05 <= t <= start + duration + 0.05]
        if not window:
            check(False, "WARN", short, "no nvidia-smi sample in the job's window (under 50 ms?)")
        else:
            smi_max = max(window)
            if vram_known:
                check(smi_max + 1 >= peak, "WARN", short,
                      f"nvidia-smi max {smi_max} MiB in the job's window < vram_peak_mb {peak}")
            if used_peak is not None:
                tolerance = max(64.0, 0.05 * used_peak)
                check(abs(smi_max - used_peak) <= tolerance, "WARN", short,
                      f"nvidia-smi max {smi_max} MiB vs NVML used_peak_mib {used_peak} "
                      f"(tolerance {tolerance:.0f})")
    return line()


for result in sorted(results, key=lambda r: ((r.get("job") or {}).get("metrics") or {}).get("id", 0)):
    if "error" in result:
        checks.append(("FAIL", "-", result["error"]))
        continue
    job = result["job"]
    lines.append(examine(job["job_id"][:8], job.get("metrics") or {}, result["latency"]))

expected = {f"cuda:{i}" for i in range(gpus)} if have_smi else set()
for device in sorted(expected - devices_seen):
    checks.append(("FAIL", "-", f"{device} ran no successful job"))

status, telemetry = call("GET", "/api/system/telemetry/generation?limit=1000")
with open(os.path.join(out, "telemetry.json"), "w") as dump:
    json.dump(telemetry, dump, indent=2)
with open(os.path.join(out, "results.json"), "w") as dump:
    json.dump(results, dump, indent=2)
if status == 200:
    summary = telemetry["summary"]
    check(summary["total"] == len(bodies), "FAIL", "-",
          f"the summary counts {summary['total']} rows for {len(bodies)} jobs")

failed = [c for c in checks if c[0] == "FAIL"]
warned = [c for c in checks if c[0] == "WARN"]
report = [
    "# SEIDRA GPU measurement check",
    "",
    f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}, {gpus} GPU(s), {len(bodies)} jobs "
    f"(images {image_size}x{image_size} x2, {steps} steps; videos {video_size}x{video_size} x16 frames), "
    f"nvidia-smi {'sampled every 50 ms' if have_smi else 'not available'}.",
    "",
    f"**{'FAILED' if failed else 'PASSED'}**: {len(failed)} failed check(s), {len(warned)} warning(s).",
    "",
    "Times in seconds (duration and queue wait from the row, latency from the client: POST to the first",
    "read of the end). Memory in MiB: allocator columns from the row, NVML from extra.device_memory,",
    "smi = nvidia-smi's largest memory.used on the job's GPU during its window.",
    "",
    "| job | media | device | status | outputs | duration | latency | queue wait | allocated | reserved "
    "| peak | delta | NVML used peak | NVML process peak | smi max |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    *lines,
    "",
    "## Checks",
    "",
    *([f"- {severity} {job}: {text}" for severity, job, text in checks] or ["- every check passed"]),
    "",
]
with open(os.path.join(out, "report.md"), "w") as file:
    file.write("\n".join(report))
sys.exit(1 if failed else 0)
PY

log "submitting image and video jobs ($JOBS_PER_GPU of each per GPU) and waiting for them"
set +e
python3 "$OUT/check.py" "$BASE" "$TOKEN" "$OUT" "$HAVE_SMI" "$JOBS_PER_GPU"
CHECK_STATUS=$?
set -e

[[ -f $OUT/report.md ]] || die "no report was written (check.py exited $CHECK_STATUS)"
cat "$OUT/report.md"
log "report: $OUT/report.md"
exit "$CHECK_STATUS"
