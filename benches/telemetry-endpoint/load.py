#!/usr/bin/env python3
"""Fills generation_metrics with a realistic month of measurements (stdlib only).

    load.py sqlite PATH/seidra.db [--rows N] [--days D] [--seed S] [--end ISO]
    load.py postgres-csv [--rows N] ...  > rows.csv   (for psql \\copy ... FROM STDIN CSV)
    load.py columns                                    (the column list, for \\copy)

The table must exist already (`seidra migrate up`). Rows are appended in commit order, so
`id` grows with `created_at`, as the service's writer does. The mix:
- media: ~80 % image, ~20 % video; three models (two image models, one video model);
- two hosts with two GPUs each named cuda:0 and cuda:1 (so two device names);
- status: ~96 % succeeded, ~3 % failed, ~1 % cancelled;
- inference time: log-normal, never under 0.2 s, images median ~3 s, videos median ~90 s
  with a long tail (a few hundred rows over an hour);
- VRAM in MiB from the allocator (allocated <= peak <= reserved), NULL for a job that
  failed before touching the device;
- queue wait: exponential, mean ~2 s, with occasional bursts of minutes;
- created_at: spread over the last D days up to --end (default now, UTC) with a daily
  rhythm; on SQLite the text shape 'YYYY-MM-DD HH:MM:SS.SSS' (UTC) that the column holds, for
  PostgreSQL an ISO timestamp with +00 for a timestamptz.
"""

import argparse
import csv
import datetime as dt
import json
import math
import random
import sqlite3
import sys
import time
import uuid

COLUMNS = (
    "job_id", "user_id", "persona_id", "media_type", "model_name", "prompt", "outputs",
    "duration_seconds", "throughput", "vram_allocated_mb", "vram_reserved_mb", "vram_peak_mb",
    "vram_delta_mb", "extra", "created_at", "status", "device", "queue_wait_seconds", "host",
)

IMAGE_MODELS = (("sdxl-base-1.0", 0.6), ("flux-1-schnell", 0.4))
VIDEO_MODEL = "svd-xt-1.1"
HOSTS = ("gpu-host-a", "gpu-host-b")
DEVICES = ("cuda:0", "cuda:1")
SUBJECTS = ("a lighthouse", "a red fox", "waves on a shore", "a city at night", "a bowl of ramen",
            "mountains in fog", "a robot portrait", "a cat astronaut", "autumn forest", "a desert road")
STYLES = ("watercolor", "photorealistic", "35mm film", "isometric", "oil painting", "anime",
          "cinematic lighting", "low poly")
SIZES = ((512, 512), (768, 768), (1024, 1024), (832, 1216), (1216, 832))


def timestamps(rng, rows, days, end):
    """`rows` sorted POSIX times over the `days` before `end`, denser in the day than at night."""
    span = days * 86400.0
    start = end - span
    out = []
    while len(out) < rows:
        t = start + rng.random() * span
        hour = (t % 86400.0) / 3600.0
        # Daily rhythm: twice as busy at 15:00 UTC as at 03:00 UTC.
        if rng.random() < (2.0 + math.cos((hour - 15.0) / 24.0 * 2 * math.pi)) / 3.0:
            out.append(t)
    out.sort()
    return out


def sqlite_text(t):
    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def postgres_text(t):
    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}+00"


def generate(rows, days, seed, end, stamp):
    rng = random.Random(seed)
    users = [f"user-{i:03d}" for i in range(60)]
    personas = [f"persona-{i:03d}" for i in range(120)]
    for t in timestamps(rng, rows, days, end):
        video = rng.random() < 0.20
        roll = rng.random()
        status = "succeeded" if roll < 0.96 else ("failed" if roll < 0.99 else "cancelled")
        host = HOSTS[rng.random() < 0.5]
        device = DEVICES[rng.random() < 0.5]
        width, height = SIZES[rng.randrange(len(SIZES))]
        seed_value = rng.getrandbits(63)
        extra = {"width": width, "height": height, "scheduler": "ddim", "seed": seed_value, "loras": []}
        if rng.random() < 0.15:
            extra["loras"] = [{"name": "detail-tweaker", "weight": round(rng.uniform(0.3, 1.0), 2)}]
        if video:
            model = VIDEO_MODEL
            frames = rng.choice((16, 24, 48, 96, 120))
            extra.update(frames=frames, fps=rng.choice((8, 12, 24)), steps=rng.choice((20, 25, 30)))
            outputs = frames
            duration = rng.lognormvariate(math.log(90.0), 1.2)
            peak = rng.gauss(18000.0, 2500.0)
        else:
            model = IMAGE_MODELS[0][0] if rng.random() < IMAGE_MODELS[0][1] else IMAGE_MODELS[1][0]
            images = rng.choice((1, 1, 1, 2, 4))
            extra.update(images=images, steps=rng.choice((4, 20, 28, 30, 50)))
            outputs = images
            duration = rng.lognormvariate(math.log(3.0), 0.8)
            peak = rng.gauss(9000.0, 1800.0)
        duration = max(0.2, duration)
        resident = rng.uniform(3500.0, 7000.0)
        peak = max(resident + 200.0, peak)
        allocated = resident + rng.uniform(0.0, 300.0)
        reserved = peak + rng.uniform(256.0, 2048.0)
        throughput = outputs / duration
        vram = (allocated, reserved, peak, peak - resident)
        if status == "failed":
            duration *= rng.uniform(0.01, 0.9)
            outputs, throughput = 0, None
            extra["error"] = rng.choice(("out_of_memory", "invalid_parameters", "device_lost"))
            if extra["error"] == "invalid_parameters":
                vram = (None, None, None, None)
        elif status == "cancelled":
            duration *= rng.uniform(0.05, 0.95)
            outputs, throughput = 0, None
        duration = max(0.2, duration)
        extra["vram_source"] = "allocator" if vram[0] is not None else "none"
        if vram[0] is not None:
            extra["nvml_used_mb"] = round(reserved + rng.uniform(400.0, 900.0), 1)
        wait = rng.expovariate(0.5)
        if rng.random() < 0.01:
            wait += rng.uniform(60.0, 900.0)
        prompt = f"{SUBJECTS[rng.randrange(len(SUBJECTS))]}, {STYLES[rng.randrange(len(STYLES))]}"
        persona = None if rng.random() < 0.4 else personas[rng.randrange(len(personas))]
        yield (
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            users[rng.randrange(len(users))],
            persona,
            "video" if video else "image",
            model,
            prompt,
            outputs,
            round(duration, 6),
            None if throughput is None else round(throughput, 6),
            *(None if v is None else round(v, 1) for v in vram),
            json.dumps(extra, separators=(",", ":")),
            stamp(t),
            status,
            device,
            round(wait, 6),
            host,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("sqlite", "postgres-csv", "columns"))
    parser.add_argument("path", nargs="?", help="the SQLite file (sqlite only)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=20241003)
    parser.add_argument("--end", help="ISO time of the newest row (default: now, UTC)")
    args = parser.parse_args()
    end = dt.datetime.fromisoformat(args.end).timestamp() if args.end else time.time()

    started = time.monotonic()
    if args.target == "columns":
        print(", ".join(COLUMNS))
        return 0
    if args.target == "postgres-csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        for row in generate(args.rows, args.days, args.seed, end, postgres_text):
            writer.writerow(["" if v is None else v for v in row])
        print(f"generated {args.rows} rows in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 0

    if not args.path:
        parser.error("sqlite needs the database path")
    db = sqlite3.connect(args.path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")
    placeholders = ", ".join("?" for _ in COLUMNS)
    insert = f"INSERT INTO generation_metrics ({', '.join(COLUMNS)}) VALUES ({placeholders})"
    batch = []
    db.execute("BEGIN")
    for row in generate(args.rows, args.days, args.seed, end, sqlite_text):
        batch.append(row)
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            batch.clear()
    if batch:
        db.executemany(insert, batch)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"inserted {args.rows} rows in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
