"""How a check verdict looks to CI: plain lines, GitHub Actions annotations, JUnit XML, JSON."""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradscope import rundir
from gradscope.analysis.gate import FAIL, PASS, SAMPLED, SKIP, BlindSpot, CheckResult, CheckVerdict, finding_lines
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


# What a foreign log cannot show the non-finite check (gate.BlindSpot), in words.
_BLIND_SPOT_TEXT = {
    rundir.NAN_LOSSES_DROPPED: ("this log cannot show NaN/inf losses: the trainer dropped them before logging "
                                "(Hugging Face logging_nan_inf_filter=True); only the gradient norms were checked"),
    rundir.NORMS_UNTRUSTED: ("this log's gradient norms look per-rank/per-shard or unset (all NaN, all 0, or one step "
                             "logged with different values): they cannot be trusted as the global norm"),
    rundir.SHARDED_TRAINING: ("trained with DeepSpeed/FSDP: check grad_norm is the global norm, not a "
                              "per-rank/per-shard one"),
    SAMPLED: "the log holds a sample of the steps only: a non-finite step between entries cannot be seen",
}


def blind_spot_text(b: BlindSpot) -> str:
    """One sentence saying what the input cannot show."""
    if b.flag == SAMPLED and b.logging_steps:
        return f"the log holds every {b.logging_steps}th step only: a non-finite step between entries cannot be seen"
    return _BLIND_SPOT_TEXT[b.flag]


def notes(verdict: CheckVerdict) -> list[str]:
    """The verdict's notes as printed: what the input cannot show first, then the rest."""
    return [blind_spot_text(b) for b in verdict.blind_spots] + verdict.notes


def lines(verdict: CheckVerdict, target: str, *, github: bool = False, curves: list[str] | None = None) -> list[str]:
    """What `gradscope check` prints: one line per check, then notes, the curves and the outcome.

    Under GitHub Actions a failing check is an ::error annotation (shown on the run's
    summary page and in the log) and a note a ::warning, instead of a plain line.
    """
    out = []
    for c in verdict.checks:
        if github and c.failed:
            out.append(annotation("error", f"gradscope check {c.name}", f"{target}: {c.message}"))
        else:
            out.append(f"{_MARK[c.status]} {c.name}: {c.message}")
    for w in finding_lines(verdict):  # clipping bugs, when --fail-on clip-bugs is not set
        out.append(annotation("warning", "gradscope clip audit", f"{target}: {w}") if github else f"warning: {w}")
    for n in notes(verdict):
        out.append(annotation("warning", "gradscope check", f"{target}: {n}") if github else f"note: {n}")
    out.extend(curves or [])
    failed = [c.name for c in verdict.checks if c.failed]
    if failed:
        out.append(f"gradscope check: {target}: FAILED ({', '.join(failed)})")
    else:
        out.append(f"gradscope check: {target}: ok ({len(verdict.checks)} check{'s' if len(verdict.checks) != 1 else ''})")
    return out


CURVE_WIDTH = 60


def curve_lines(run, verdict: CheckVerdict, width: int = CURVE_WIDTH) -> list[str]:
    """The shape of the run in a CI log: one sparkline of the grad norm (log scale) and one of
    the loss, of the series with the first bad step (else the longest of rank 0), that step
    marked with the sparkline's mark."""
    import numpy as np

    from gradscope.report.spark import MARK, sparkline

    steps = run.steps
    if steps is None or len(steps) == 0:
        return []
    bad = verdict.first_bad
    if bad is not None:
        rank, opt = bad[0], bad[1]
    else:
        ranks = steps["rank"].to_numpy()
        rank = 0 if (ranks == 0).any() else int(ranks.min())
        opt = int(steps.loc[steps["rank"] == rank, "optimizer"].value_counts().idxmax())
    sel = steps[(steps["rank"] == rank) & (steps["optimizer"] == opt)].sort_values("step", kind="stable")
    step = sel["step"].to_numpy()
    mark = bad[2] if bad is not None else None
    where = ""
    if steps["optimizer"].nunique() > 1 or steps["rank"].nunique() > 1:
        where = f" (optimizer {opt}" + (f", rank {rank}" if steps["rank"].nunique() > 1 else "") + ")"
    out = []
    g = sel["grad_norm"].to_numpy(dtype=float)
    fin = g[np.isfinite(g) & (g > 0)]
    span = f"steps {int(step[0])}-{int(step[-1])}"
    tail = f"; {MARK} step {mark}: {bad[3]}" if bad is not None else ""
    if len(fin):
        out.append(f"grad_norm {sparkline(step, g, width, log=True, mark_step=mark)}  {span}{where}, log scale "
                   f"{_short(fin.min())}-{_short(fin.max())}{tail}")
    loss = sel["loss"].to_numpy(dtype=float)
    lf = loss[np.isfinite(loss)]
    if len(lf):
        keep = ~np.isnan(loss) if run.source != "gradscope" else np.ones(len(loss), dtype=bool)
        out.append(f"loss      {sparkline(step[keep], loss[keep], width, mark_step=mark)}  {span}, "
                   f"{_short(lf.min())}-{_short(lf.max())}{tail}")
    return out


def _short(x: float) -> str:
    return f"{x:.3g}"


def junit_xml(verdict: CheckVerdict, target: str) -> bytes:
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
    warnings = [f"warning: {w}" for w in finding_lines(verdict)]
    said = notes(verdict)
    if said or warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(warnings + [f"note: {n}" for n in said])
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(verdict: CheckVerdict, target: str, path: str | os.PathLike) -> None:
    from gradscope.report import make_parent

    p = Path(path)
    try:
        make_parent(p, "JUnit file")
        p.write_bytes(junit_xml(verdict, target))
    except OSError as e:
        raise GradscopeError(f"cannot write JUnit file '{p}': {e.strerror or e}") from None


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        # JSON has no NaN/inf; the strings keep "which non-finite" visible.
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def to_json(verdict: CheckVerdict, target: str) -> str:
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
            "origin": nf.origin.json() if nf.origin is not None else None,
        },
        "findings": [f.as_json() for f in verdict.findings],
        "notes": notes(verdict),
    }
    return json.dumps(doc, indent=2, allow_nan=False)


# ---------------------------------------------------------------- many runs in one call


@dataclass
class Checked:
    """One input of a many-run `check`: its verdict, or why it could not be judged."""

    target: str
    verdict: CheckVerdict | None
    error: str | None = None
    error_code: int = 2
    curves: list[str] | None = None

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code if self.verdict is not None else self.error_code


def checked_lines(c: Checked, *, github: bool = False) -> list[str]:
    """A run's block of lines (as `check RUN` prints them), or one line saying why it was not judged."""
    if c.verdict is not None:
        return lines(c.verdict, c.target, github=github, curves=c.curves)
    if github:
        return [annotation("error", "gradscope check", f"{c.target}: {c.error}")]
    return [f"ERROR {c.target}: {c.error}"]


def _first_failure(c: Checked) -> str:
    if c.verdict is None:
        return c.error or ""
    failed = [x for x in c.verdict.checks if x.failed]
    if not failed:
        return ""
    nf = c.verdict.non_finite
    if failed[0].name == "non-finite" and nf is not None:
        return f"non-finite {nf.quantity} at step {nf.step}"
    return failed[0].message


def summary_lines(results: list[Checked], width: int = 60) -> list[str]:
    """A plain table (CI logs have no terminal): run, steps, result, the first failure."""
    rows = []
    for c in results:
        if c.verdict is None:
            result, steps = f"error (exit {c.exit_code})", "-"
        else:
            failed = [x.name for x in c.verdict.checks if x.failed]
            result = f"FAILED ({', '.join(failed)})" if failed else "ok"
            steps = str(c.verdict.steps)
        why = _first_failure(c)
        if len(why) > width:
            why = why[: width - 3] + "..."
        rows.append((c.target, steps, result, why))
    head = ("run", "steps", "result", "first failure")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    out = [f"{head[0]:<{w[0]}}  {head[1]:>{w[1]}}  {head[2]:<{w[2]}}  {head[3]}".rstrip()]
    out += [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
    failed = sum(1 for c in results if c.verdict is not None and not c.verdict.ok)
    errors = sum(1 for c in results if c.verdict is None)
    ok = len(results) - failed - errors
    parts = [f"{failed} failed"] if failed else []
    parts += [f"{errors} not judged (bad input)"] if errors else []
    parts.append(f"{ok} ok")
    worst = max(c.exit_code for c in results)
    out.append(f"gradscope check: {len(results)} runs: {', '.join(parts)} (exit {worst})")
    return out


def junit_many_xml(results: list[Checked]) -> bytes:
    """One testsuite per run, named by the run, each as `check RUN --junit` writes it;
    an input that could not be read is a suite with one errored testcase."""
    suites = ET.Element("testsuites", name=SUITE)
    tests = failures = errors = 0
    for c in results:
        if c.verdict is not None:
            suite = ET.fromstring(junit_xml(c.verdict, c.target)).find("testsuite")
            suite.set("name", c.target)
        else:
            suite = ET.Element("testsuite", name=c.target, tests="1", failures="0", errors="1", skipped="0")
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="run", value=c.target)
            case = ET.SubElement(suite, "testcase", name="input", classname=f"{SUITE}.check")
            e = ET.SubElement(case, "error", message=c.error or "", type="bad-input")
            e.text = c.error or ""
        tests += int(suite.get("tests", "0"))
        failures += int(suite.get("failures", "0"))
        errors += int(suite.get("errors", "0"))
        suites.append(suite)
    suites.set("tests", str(tests))
    suites.set("failures", str(failures))
    suites.set("errors", str(errors))
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit_many(results: list[Checked], path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(junit_many_xml(results))
    except OSError as e:
        raise GradscopeError(f"cannot write JUnit file '{p}': {e.strerror or e}") from None


def many_to_json(results: list[Checked]) -> dict:
    """{"runs": [each run's `check --json` object, or {"run", "error", "exit_code"}], "ok", "exit_code"}."""
    docs = []
    for c in results:
        if c.verdict is not None:
            docs.append(json.loads(to_json(c.verdict, c.target)))
        else:
            docs.append({"run": c.target, "error": c.error, "exit_code": c.exit_code})
    return {
        "runs": docs,
        "ok": all(c.exit_code == 0 for c in results),
        "exit_code": max(c.exit_code for c in results),
    }
