"""How a check verdict looks to CI: plain lines, GitHub Actions annotations, JUnit XML, JSON."""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gradscope.analysis.gate import FAIL, PASS, SKIP, CheckResult, Verdict
from gradscope.errors import GradscopeError

SUITE = "gradscope"
_MARK = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP"}


def in_github_actions(env: dict | None = None) -> bool:
    return (env if env is not None else os.environ).get("GITHUB_ACTIONS") == "true"


def _escape_data(s: str) -> str:
    # https://github.com/actions/toolkit/blob/main/packages/core/src/command.ts
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, title: str, message: str) -> str:
    """A GitHub Actions workflow command: `::error title=...::message`."""
    return f"::{level} title={_escape_property(title)}::{_escape_data(message)}"


def lines(verdict: Verdict, target: str, *, github: bool = False) -> list[str]:
    """What `gradscope check` prints: one line per check, then notes and the outcome.

    Under GitHub Actions a failing check is an ::error annotation (shown on the run's
    summary page and in the log) and a note a ::warning, instead of a plain line.
    """
    out = []
    for c in verdict.checks:
        if github and c.failed:
            out.append(annotation("error", f"gradscope check {c.name}", f"{target}: {c.message}"))
        else:
            out.append(f"{_MARK[c.status]} {c.name}: {c.message}")
    for n in verdict.notes:
        out.append(annotation("warning", "gradscope check", f"{target}: {n}") if github else f"note: {n}")
    failed = [c.name for c in verdict.checks if c.failed]
    if failed:
        out.append(f"gradscope check: {target}: FAILED ({', '.join(failed)})")
    else:
        out.append(f"gradscope check: {target}: ok ({len(verdict.checks)} check{'s' if len(verdict.checks) != 1 else ''})")
    return out


def junit_xml(verdict: Verdict, target: str) -> bytes:
    """One testsuite 'gradscope', one testcase per check, failures carrying their message."""
    checks: list[CheckResult] = verdict.checks
    failures = sum(c.failed for c in checks)
    skipped = sum(c.status == SKIP for c in checks)
    suites = ET.Element("testsuites", name=SUITE, tests=str(len(checks)), failures=str(failures), errors="0")
    suite = ET.SubElement(
        suites, "testsuite", name=SUITE, tests=str(len(checks)), failures=str(failures),
        errors="0", skipped=str(skipped),
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="run", value=target)
    for c in checks:
        case = ET.SubElement(suite, "testcase", name=c.name, classname=f"{SUITE}.check")
        if c.failed:
            f = ET.SubElement(case, "failure", message=c.message, type=c.name)
            f.text = c.message
        elif c.status == SKIP:
            ET.SubElement(case, "skipped", message=c.message)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = c.message
    if verdict.notes:
        ET.SubElement(suite, "system-out").text = "\n".join(f"note: {n}" for n in verdict.notes)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(verdict: Verdict, target: str, path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(junit_xml(verdict, target))
    except OSError as e:
        raise GradscopeError(f"cannot write JUnit file '{p}': {e.strerror or e}") from None


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        # JSON has no NaN/inf; the strings keep "which non-finite" visible.
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def to_json(verdict: Verdict, target: str) -> str:
    nf = verdict.non_finite
    doc = {
        "run": target,
        "ok": verdict.ok,
        "exit_code": verdict.exit_code,
        "steps": verdict.steps,
        "checks": [{"name": c.name, "status": c.status, "message": c.message} for c in verdict.checks],
        "non_finite": None if nf is None else {
            "rank": nf.rank,
            "optimizer": nf.optimizer,
            "optimizer_class": nf.optimizer_class,
            "step": nf.step,
            "quantity": nf.quantity,
            "loss": _num(nf.loss),
            "grad_norm": _num(nf.grad_norm),
            "bad_steps": nf.bad_steps,
            "absorbed_steps": nf.absorbed_steps,
            "layers": nf.layers,
            "layers_step": nf.layers_step,
            "layers_total": nf.layers_total,
        },
        "notes": verdict.notes,
    }
    return json.dumps(doc, indent=2, allow_nan=False)
