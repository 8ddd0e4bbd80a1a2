"""run.sh's last step: everything the run left in its work folder -> ``$OUT/gpu_results.json``,
and a summary on stdout (which run.sh's log keeps). Standard library only, so that it reports
even when the installation failed.

    python experiments/gpu/report.py WORK OUT_JSON

WORK holds (each optional; what is missing is reported as missing): phases.jsonl (one line a
phase: name, rc, seconds, limit_s), install.json, devices.json, nvidia_smi.txt, junit.xml
(pytest -m gpu), bench.json (bench.py).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{path.name}: {type(e).__name__}: {e}"}


def read_junit(path: Path) -> dict:
    """pytest's junit XML -> counts and one entry a test (outcome, seconds, message,
    the properties the test recorded)."""
    if not path.exists():
        return {"error": "no junit.xml: pytest did not finish (time limit, or it could not start)"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"junit.xml unreadable: {e}"}
    cases = []
    for tc in root.iter("testcase"):
        case = {"name": tc.get("name"), "seconds": float(tc.get("time") or 0), "outcome": "passed"}
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                case["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                case["message"] = ((el.get("message") or "") + "\n" + (el.text or ""))[-3000:]
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        if props:
            case["properties"] = props
        cases.append(case)
    outcomes = {"passed": "passed", "failed": "failed", "errors": "error", "skipped": "skipped"}
    counts = {k: sum(c["outcome"] == v for c in cases) for k, v in outcomes.items()}
    return {**counts, "total": len(cases), "cases": cases}


def main(work: str, out_json: str) -> int:
    work, out = Path(work), Path(out_json)
    phases = []
    if (work / "phases.jsonl").exists():
        phases = [json.loads(x) for x in (work / "phases.jsonl").read_text().splitlines() if x]
    meta = _json(work / "meta.json") if (work / "meta.json").exists() else {}
    tests = read_junit(work / "junit.xml")
    bench = (
        _json(work / "bench.json") if (work / "bench.json").exists() else {"error": "no bench.json"}
    )
    smi = work / "nvidia_smi.txt"
    result = {
        **meta,
        "phases": phases,
        "install": _json(work / "install.json") if (work / "install.json").exists() else None,
        "devices": _json(work / "devices.json") if (work / "devices.json").exists() else None,
        "nvidia_smi": smi.read_text() if smi.exists() else None,
        "tests": tests,
        "bench": bench,
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n")

    print("=" * 72)
    print(f"gpu_results: {out}")
    for p in phases:
        print(
            f"  phase {p['name']:<8} rc={p['rc']:<4} {p['seconds']:6.1f} s (limit {p['limit_s']} s)"
        )
    if "error" in tests:
        print(f"  tests: {tests['error']}")
    else:
        print(f"  tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped")  # fmt: skip
        for c in tests["cases"]:
            print(f"    {c['outcome']:<7} {c['seconds']:6.1f} s  {c['name']}")
            for k, v in (c.get("properties") or {}).items():
                print(f"              {k}: {v[:160]}")
            if c["outcome"] != "passed":
                print("              " + c.get("message", "").strip().splitlines()[0][:300])
    summary = bench.get("summary") or {}
    for task, s in summary.items():
        if isinstance(s, dict):
            print(f"  bench {task}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in s.items()))
        else:
            print(f"  bench {task}: {_fmt(s)}")
    for e in bench.get("errors") or ([bench["error"]] if "error" in bench else []):
        print(f"  bench error: {e[:300]}")
    return 0


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
