#!/usr/bin/env python3
"""The SQL the service runs for each benchmarked request, taken from its own log.

The service logs every statement sqlx runs (target `sqlx::query`, level DEBUG) with the time
it took, when started with RUST_LOG=sqlx::query=debug and --log-format json; each line names
the request URI in its span. (On PostgreSQL the service turns sqlx's statement logging off,
so statements are read on SQLite: src/storage/queries.rs builds the same SQL text on both,
with `$n` placeholders instead of `?` on PostgreSQL.)

    statements.py extract LOG URI...                      -> JSON: URI -> statements
    statements.py sqlite-run STATEMENTS.json URI SINCE MEDIA_TYPE DB [--runs N]
    statements.py sqlite-script STATEMENTS.json URI SINCE MEDIA_TYPE [--runs N]
    statements.py postgres-script STATEMENTS.json URI SINCE MEDIA_TYPE [--runs N]
    statements.py service-times STATEMENTS.json URI       -> in-service time per statement
    statements.py answer < ANSWER.json                    -> one line about an endpoint answer
    statements.py psql-times < PSQL_OUTPUT                -> median `Time:` per statement

sqlite-run plans and times each statement through apsw, whose bundled SQLite is the version
the service links (libsqlite3-sys 0.40 bundles 3.54.1; Debian's sqlite3 shell is older);
sqlite-script writes the same for the sqlite3 shell (`.timer on`), to run by hand.
postgres-script prints each prepared statement, EXPLAIN (ANALYZE, BUFFERS) of it, and N runs
under `\\timing on` with the rows sent nowhere.
SINCE is the window's start as the service would bind it ('' without a window), MEDIA_TYPE
the media_type parameter ('' without one).
"""

import json
import re
import statistics
import sys

NAMES = (
    ("SELECT * FROM generation_metrics", "list_items (page of items)"),
    ("SELECT COUNT(*) AS total", "summarize: aggregates"),
    ("SELECT model_name AS key", "summarize: GROUP BY model_name"),
    ("SELECT device AS key", "summarize: GROUP BY device"),
    ("SELECT model_name AS key, duration_seconds, ROW_NUMBER", "percentiles by model_name"),
    ("SELECT device AS key, duration_seconds, ROW_NUMBER", "percentiles by device"),
    ("SELECT 'all' AS key, duration_seconds, ROW_NUMBER", "percentiles overall"),
)


def name_of(sql):
    found = "?"
    for marker, name in NAMES:
        if marker in sql:
            found = name
    return found


def normalise(sql):
    return " ".join(sql.split())


def extract(log_path, uris):
    wanted = set(uris)
    out = {uri: [] for uri in uris}
    index = {uri: {} for uri in uris}
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if '"sqlx::query"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            uri = (event.get("span") or {}).get("uri")
            if uri not in wanted:
                continue
            fields = event.get("fields") or {}
            sql = normalise(fields.get("db.statement", ""))
            if not sql.startswith("SELECT"):
                continue
            position = index[uri].get(sql)
            if position is None:
                index[uri][sql] = len(out[uri])
                out[uri].append({"name": name_of(sql), "sql": sql, "elapsed_secs": []})
                position = index[uri][sql]
            out[uri][position]["elapsed_secs"].append(float(fields.get("elapsed_secs", 0.0)))
    return out


def parameters(sql, since, media_type):
    """The values the service binds, in placeholder order: created_at >= ?, media_type = ?."""
    values = []
    for match in re.finditer(r"(\w+)\s*(?:>=|=|<)\s*\?", sql):
        column = match.group(1)
        if column == "created_at":
            values.append(since)
        elif column == "media_type":
            values.append(media_type)
        else:
            raise SystemExit(f"unknown parameter for column {column} in: {sql}")
    return values


def quote(value):
    return "'" + value.replace("'", "''") + "'"


def literal_sql(sql, since, media_type):
    literal = sql
    for value in parameters(sql, since, media_type):
        literal = literal.replace("?", quote(value), 1)
    return literal


def plan_tree(rows):
    """EXPLAIN QUERY PLAN rows (id, parent, notused, detail) drawn as the sqlite3 shell does."""
    children = {}
    for row_id, parent, _, detail in rows:
        children.setdefault(parent, []).append((row_id, detail))
    lines = []

    def walk(parent, depth):
        for row_id, detail in children.get(parent, []):
            lines.append("    " + "   " * depth + "|--" + detail)
            walk(row_id, depth + 1)

    walk(0, 0)
    return "\n".join(lines)


def sqlite_run(db_path, statements, since, media_type, runs):
    """Plans and times each statement with apsw, whose SQLite is the service's own version."""
    import time

    import apsw

    print(f"SQLite {apsw.sqlite_lib_version()} (apsw {apsw.apsw_version()}), {db_path}")
    db = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
    totals = []
    for number, statement in enumerate(statements, 1):
        values = parameters(statement["sql"], since, media_type)
        print(f"--- [{number}] {statement['name']}")
        print(f"  {literal_sql(statement['sql'], since, media_type)}")
        print("  EXPLAIN QUERY PLAN:")
        print(plan_tree(db.execute("EXPLAIN QUERY PLAN " + statement["sql"], values).fetchall()))
        times = []
        rows = 0
        for _ in range(runs):
            started = time.perf_counter()
            rows = len(db.execute(statement["sql"], values).fetchall())
            times.append((time.perf_counter() - started) * 1000)
        median = statistics.median(times)
        totals.append((number, statement["name"], median))
        print(f"  time: {', '.join(f'{t:.2f}' for t in times)} ms ({rows} rows); median {median:.2f} ms")
    whole = sum(t for _, _, t in totals)
    print("  summary (median of each statement, share of their sum):")
    for number, name, median in totals:
        print(f"    [{number}] {name:<32} {median:10.2f} ms  {100 * median / whole if whole else 0:5.1f} %")
    print(f"    {'sum':<36} {whole:10.2f} ms")


def sqlite_script(statements, since, media_type, runs):
    """The same statements for the sqlite3 shell, to run by hand (`sqlite3 DB < file`)."""
    lines = [".timer on"]
    for number, statement in enumerate(statements, 1):
        literal = literal_sql(statement["sql"], since, media_type)
        lines.append(f".print '--- [{number}] {statement['name']}'")
        lines.append(f"EXPLAIN QUERY PLAN {literal};")
        lines.append(".output /dev/null")
        lines += [f"{literal};"] * runs
        lines.append(".output stdout")
    return "\n".join(lines) + "\n"


def postgres_script(statements, since, media_type, runs):
    lines = ["\\pset pager off", "\\set ON_ERROR_STOP on"]
    for number, statement in enumerate(statements, 1):
        sql = statement["sql"]
        values = parameters(sql, since, media_type)
        types = []
        counter = 0

        def placeholder(match):
            nonlocal counter
            counter += 1
            return f"${counter}"

        pg_sql = re.sub(r"\?", placeholder, sql)
        for match in re.finditer(r"(\w+)\s*(?:>=|=|<)\s*\?", sql):
            types.append("timestamptz" if match.group(1) == "created_at" else "text")
        name = f"s{number}"
        prepare = f"PREPARE {name}({', '.join(types)}) AS {pg_sql};" if types else f"PREPARE {name} AS {pg_sql};"
        execute = f"EXECUTE {name}({', '.join(quote(v) for v in values)})" if values else f"EXECUTE {name}"
        lines.append(f"\\echo '--- [{number}] {statement['name']}'")
        lines.append(f"\\echo {quote(pg_sql)}")
        if values:
            lines.append(f"\\echo {quote('parameters: ' + ', '.join(values))}")
        lines.append(prepare)
        lines.append("\\echo 'EXPLAIN (ANALYZE, BUFFERS):'")
        lines.append(f"EXPLAIN (ANALYZE, BUFFERS) {execute};")
        lines.append(f"\\echo 'timing ({runs} runs, rows discarded):'")
        lines.append("\\timing on")
        lines.append("\\o /dev/null")
        for _ in range(runs):
            lines.append(f"{execute};")
        lines.append("\\o")
        lines.append("\\timing off")
        lines.append(f"DEALLOCATE {name};")
    return "\n".join(lines) + "\n"


def service_times(statements):
    rows = []
    total = 0.0
    for number, statement in enumerate(statements, 1):
        times = statement["elapsed_secs"]
        median = statistics.median(times) * 1000 if times else float("nan")
        total += median
        rows.append((number, statement["name"], median, len(times)))
    for number, name, median, count in rows:
        share = 100.0 * median / total if total else 0.0
        print(f"  [{number}] {name:<32} {median:10.2f} ms  ({share:4.1f} %, median of {count})")
    print(f"  {'sum of the medians':<36} {total:10.2f} ms")


def psql_times():
    """Median of the `Time:` lines psql printed after each `--- [n] name` header (stdin)."""
    rows = []
    for line in sys.stdin:
        header = re.match(r"--- \[(\d+)\] (.*)", line.strip())
        if header:
            rows.append([header.group(1), header.group(2), []])
            continue
        timing = re.match(r"Time: ([0-9.]+) ms", line.strip())
        if timing and rows:
            rows[-1][2].append(float(timing.group(1)))
    whole = sum(statistics.median(times) for _, _, times in rows if times)
    print("  summary (psql \\timing, median of each statement, share of their sum):")
    for number, name, times in rows:
        if times:
            median = statistics.median(times)
            share = 100 * median / whole if whole else 0.0
            print(f"    [{number}] {name:<32} {median:10.2f} ms  {share:5.1f} %")
    print(f"    {'sum':<36} {whole:10.2f} ms")


def answer():
    """One line about an endpoint answer read on stdin."""
    body = json.load(sys.stdin)
    summary = body["summary"]
    print(f"   {len(body['items'])} items, summary.total={summary['total']}, "
          f"p50={summary['p50_duration_seconds']}, p99={summary['p99_duration_seconds']}, "
          f"by_model={len(summary['by_model'])}, by_device={len(summary['by_device'])}")


def main():
    command = sys.argv[1]
    if command == "answer":
        answer()
        return 0
    if command == "psql-times":
        psql_times()
        return 0
    if command == "extract":
        json.dump(extract(sys.argv[2], sys.argv[3:]), sys.stdout, indent=1)
        return 0
    with open(sys.argv[2], encoding="utf-8") as source:
        statements = json.load(source)[sys.argv[3]]
    if not statements:
        raise SystemExit(f"no statement was logged for {sys.argv[3]}")
    if command == "service-times":
        service_times(statements)
        return 0
    since, media_type = sys.argv[4], sys.argv[5]
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    if command == "sqlite-run":
        sqlite_run(sys.argv[6], statements, since, media_type, runs)
    elif command == "sqlite-script":
        sys.stdout.write(sqlite_script(statements, since, media_type, runs))
    elif command == "postgres-script":
        sys.stdout.write(postgres_script(statements, since, media_type, runs))
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
