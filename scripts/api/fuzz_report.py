"""Summarises a schemathesis NDJSON report (schemathesis run --report ndjson).

    python fuzz_report.py REPORT.ndjson [--min-cases N] [--schemathesis-status N]

Counts generated test cases (each with its own request), the cases whose checks all passed
and those where at least one check failed, by phase and by operation; then lists every
distinct failure (check x operation x response status) with one example: the request, the
response, and the check's message, and every error schemathesis reported. Prints the closing
line `fuzz: N passed, N failed` (test cases; a case that got no response counts as failed).
Exits 1 when any case failed or got no response (connection reset, timeout), when a 5xx was
seen, when schemathesis reported an error, when fewer than --min-cases cases were generated,
or when schemathesis's own exit status (--schemathesis-status) says it failed for a reason
other than the cases counted apart: it exits 1 for those too, so 1 passes only when they are
all the report finds wrong, and any other status but 0 fails.
"""

import argparse
import base64
import collections
import json
import re
import sys


def text_of(body, limit=400):
    if body is None:
        return ""
    if isinstance(body, dict) and "$base64" in body:
        raw = base64.b64decode(body["$base64"])
    elif isinstance(body, dict) and "string" in body:
        raw = body["string"].encode()
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"… ({len(raw)} bytes)"


def response_message(response):
    """The `message` of a JSON error answer with quoted input elided, to group answers."""
    try:
        message = json.loads(text_of(response.get("content"), limit=100000)).get("message", "")
    except (ValueError, AttributeError):
        return "(no JSON message)"
    message = re.sub(r"`[^`]*`", "`…`", str(message))
    message = re.sub(r"found `…` at \\d+|found .* at \\d+", "found … at N", message)
    return message[:160]


def shell_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    parser.add_argument("--min-cases", type=int, default=0)
    parser.add_argument("--schemathesis-status", type=int, default=0)
    args = parser.parse_args()

    cases = {}  # id -> (phase, label)
    checks = {}  # id -> list of check results
    interactions = {}  # id -> interaction
    errors = []  # (event name, phase, label, message)
    with open(args.report, encoding="utf-8") as report:
        for line in report:
            event = json.loads(line)
            errors.extend(errors_of(event))
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished.get("recorder") or {}
            label = recorder.get("label", "?")
            for case_id, case in (recorder.get("cases") or {}).items():
                value = case.get("value") or {}
                # Stateful scenarios are labelled as a whole: name each step by its own call.
                own = f"{value.get('method', '')} {value.get('path', '')}".strip() or label
                cases.setdefault(case_id, (finished.get("phase", "?"), own))
            for case_id, results in (recorder.get("checks") or {}).items():
                checks.setdefault(case_id, []).extend(results)
            for case_id, interaction in (recorder.get("interactions") or {}).items():
                interactions[case_id] = interaction

    failed_ids = {
        case_id for case_id, results in checks.items()
        if any(result.get("status") == "failure" for result in results)
    }
    # A job whose outputs together need more memory than max_job_memory_mib is refused with a
    # 400 that names the rule; the schema cannot state a rule across width, height and images
    # or frames, so schemathesis sees valid data rejected. Those cases, and only those, are
    # counted apart: each failed check is positive_data_acceptance on that answer.
    def refused_by_the_memory_rule(case_id):
        response = (interactions.get(case_id) or {}).get("response") or {}
        return (
            response.get("status_code") == 400
            and "max_job_memory_mib" in text_of(response.get("content"), limit=100000)
            and all(result.get("name") == "positive_data_acceptance"
                    for result in checks[case_id] if result.get("status") == "failure")
        )
    memory_refused = {case_id for case_id in failed_ids if refused_by_the_memory_rule(case_id)}
    failed_ids -= memory_refused
    checked_ids = set(checks)
    # schemathesis records a request that got no answer (connection reset, timeout) with no
    # response, and reports the error apart; the service failed it as surely as a 5xx would.
    # A case with no checks of its own but a response is a check's extra request (the same
    # call without the token, for one), judged under the case that made it.
    unanswered = {
        case_id for case_id in set(cases) | set(interactions)
        if not (interactions.get(case_id) or {}).get("response")
    }
    auxiliary = set(cases) - checked_ids - unanswered
    passed_ids = checked_ids - failed_ids - memory_refused - unanswered

    by_phase = collections.Counter(phase for phase, _ in cases.values())
    print(f"generated test cases: {len(cases)} ({', '.join(f'{p} {n}' for p, n in sorted(by_phase.items()))})")
    print(f"  with every check run passing: {len(passed_ids)}; with a failed check: {len(failed_ids)}; "
          f"no response (connection reset, timeout; failed): {len(unanswered)}; "
          f"extra requests of a check, judged under their case: {len(auxiliary)}")
    print(f"  schema-valid jobs refused by the documented memory rule (400 naming max_job_memory_mib,"
          f" not counted as failures): {len(memory_refused)}")
    by_label = collections.defaultdict(lambda: [0, 0])
    for case_id in checked_ids - memory_refused:
        by_label[cases.get(case_id, ("?", "?"))[1]][0 if case_id in passed_ids else 1] += 1
    singles = [0, 0]
    for label in sorted(by_label):
        ok, bad = by_label[label]
        if ok + bad == 1:
            singles[0] += ok
            singles[1] += bad
            continue
        print(f"  {label}: {ok} passed, {bad} failed")
    if sum(singles):
        print(f"  one-case probes (undeclared methods on each path): {singles[0]} passed, {singles[1]} failed")

    statuses = collections.Counter()
    server_errors = []
    for case_id, interaction in interactions.items():
        status = (interaction.get("response") or {}).get("status_code")
        statuses[status] += 1
        if isinstance(status, int) and status >= 500:
            server_errors.append(case_id)
    print("response statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=lambda kv: str(kv[0]))))
    print(f"5xx responses: {len(server_errors)}")

    # Distinct failures: one group per check x response status; within a group, the operations
    # it hit and, for schema violations, every schema location violated; one example each.
    groups = collections.OrderedDict()
    for case_id in sorted(failed_ids, key=lambda c: (cases.get(c, ("", ""))[1], c)):
        response = (interactions.get(case_id) or {}).get("response") or {}
        label = cases.get(case_id, ("?", "?"))[1]
        for result in checks[case_id]:
            if result.get("status") != "failure":
                continue
            failure = (result.get("failure_info") or {}).get("failure") or {}
            key = (result.get("name"), failure.get("code") or "", response.get("status_code"))
            group = groups.setdefault(key, {"operations": collections.OrderedDict(), "locations": collections.Counter()})
            group["operations"].setdefault(label, {"cases": set(), "case": case_id, "failure": failure})
            group["operations"][label]["cases"].add(case_id)
            group.setdefault("messages", collections.Counter())[response_message(response)] += 1
            message = str(failure.get("message") or "")
            first_line = message.split("\n", 1)[0]
            for location in re.findall(r"Schema at (\S+?):", message):
                group["locations"][(location, first_line)] += 1

    if groups:
        print(f"\nfailures, by check and response status: {len(groups)} group(s)")
    for (name, code, status), group in groups.items():
        total = len(set().union(*(op["cases"] for op in group["operations"].values())))
        title = next(iter(group["operations"].values()))["failure"].get("title") or ""
        print(f"\n- {code} {title} [check {name}], response {status}: {total} case(s)")
        for location, first_line in sorted(group["locations"]):
            print(f"    violated: {location}: {first_line}")
        messages = group.get("messages") or collections.Counter()
        if len(messages) > 1 and not group["locations"]:
            print("    answers (message, `…` for the quoted input):")
            for message, count in messages.most_common(12):
                print(f"      {count:5d} x {message}")
        operations = list(group["operations"].items())
        if len(operations) > 4:
            print(f"    operations: {', '.join(label for label, _ in operations)}")
            operations = operations[:2]
            print("    two examples:")
        for label, op in operations:
            case_id = op["case"]
            interaction = interactions.get(case_id) or {}
            request = interaction.get("request") or {}
            response = interaction.get("response") or {}
            detail = " ".join(str(op["failure"].get("message") or "").split())
            print(f"  * {label}: {len(op['cases'])} case(s), e.g. case {case_id}")
            print(f"      check says: {detail[:300]}")
            headers = {k: v for k, v in (request.get("headers") or {}).items() if k.lower() != "authorization"}
            has_token = any(k.lower() == "authorization" for k in (request.get("headers") or {}))
            body = text_of(request.get("body"), limit=2000) if request.get("body") else ""
            curl = ["curl -s -i -X", request.get("method", "GET")]
            if has_token:
                curl.append('-H "Authorization: Bearer $TOKEN"')
            for key, values in headers.items():
                for value in values if isinstance(values, list) else [values]:
                    curl.append("-H " + shell_quote(f"{key}: {value}"))
            if body:
                curl.append("--data-binary " + shell_quote(body))
            curl.append(shell_quote(request.get("uri", "")))
            print(f"      request:  {' '.join(curl)}")
            content_type = (response.get("headers") or {}).get("content-type")
            if isinstance(content_type, list):
                content_type = ", ".join(content_type)
            print(f"      response: {status} ({content_type}) {text_of(response.get('content'), limit=300)}")

    if unanswered:
        print(f"\ncases that got no response: {len(unanswered)}")
        for case_id in sorted(unanswered)[:10]:
            request = (interactions.get(case_id) or {}).get("request") or {}
            label = cases.get(case_id, ("?", "?"))[1]
            print(f"  * {label}: case {case_id} {request.get('method', '')} {request.get('uri', '')}")
    if errors:
        print(f"\nerrors schemathesis reported: {len(errors)}")
        for name, phase, label, message in errors[:20]:
            print(f"  * {name} in {phase or '-'} {label or ''}: {message[:300]}")

    failed = failed_ids | unanswered
    print(f"fuzz: {len(passed_ids)} passed, {len(failed)} failed")
    ok = not failed and not server_errors and not errors
    if len(cases) < args.min_cases:
        print(f"only {len(cases)} test cases were generated, fewer than {args.min_cases}")
        ok = False
    explained = args.schemathesis_status == 0 or (
        args.schemathesis_status == 1 and memory_refused and ok
    )
    if ok and not explained:
        print(f"schemathesis exited {args.schemathesis_status} for a reason this report does not"
              " show: see its log")
        ok = False
    return 0 if ok else 1


def errors_of(event):
    """The errors an NDJSON event reports, as (event name, phase, label, message)."""
    found = []
    for name in ("NonFatalError", "FatalError"):
        error = event.get(name)
        if error is None:
            continue
        value = error.get("value") or error.get("exception") or {}
        message = f"{value.get('type', '')}: {value.get('message', '')}" if isinstance(value, dict) else str(value)
        phase = error.get("phase")
        found.append((name, phase if isinstance(phase, str) else None, error.get("label"), message))
    phase = event.get("PhaseFinished")
    if phase and phase.get("status") == "error":
        name = (phase.get("phase") or {}).get("name")
        found.append(("PhaseFinished", name, None, "the phase ended in error"))
    finished = event.get("EngineFinished")
    for failure in (finished or {}).get("failures") or []:
        title = failure.get("title") if isinstance(failure, dict) else str(failure)
        found.append(("EngineFinished", None, "after the run", str(title)))
    return found


if __name__ == "__main__":
    sys.exit(main())
