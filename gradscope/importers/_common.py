"""Helpers every importer shares: records -> Run, column names, args files, notes."""
from __future__ import annotations

import ast
import json
import math

import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

from gradscope.errors import GradscopeError
from gradscope.rundir import NORMS_UNTRUSTED

# Names trainers give the pre-clip global gradient norm, best first. Compared after
# lower-casing; "run - " prefixes of W&B CSV exports are stripped first.
GRAD_NORM_NAMES = (
    "grad_norm",
    "train/grad_norm",
    "gradient_norm",
    "train/gradient_norm",
    "grad_2.0_norm_total",
    "grad_2.0_norm_total_step",
    "grad_norm_total",
    "total_norm",
    "total_grad_norm",
    "global_grad_norm",
    "grad_norm/total",
    "train/global_grad_norm",
    "optim/grad_norm",
    "grad-norm",
    "gradnorm",
    "gnorm",
)
STEP_NAMES = ("step", "global_step", "trainer/global_step", "_step", "iteration", "iter", "train/global_step")
LOSS_NAMES = ("loss", "train/loss", "train_loss", "train_loss_step", "loss_step", "training_loss", "train/train_loss")
LR_NAMES = ("learning_rate", "lr", "train/learning_rate", "train/lr", "lr-adamw", "lr-adam", "lr-sgd")

# Keys that hold a norm-clipping threshold in trainers' argument files.
CLIP_KEYS = ("max_grad_norm", "gradient_clip_val", "clip_grad_norm", "grad_clip", "clip_grad", "gradient_clipping", "max_norm")

HF_ARGS_FILES = (
    "training_args.json",
    "args.json",
    "training_args.yaml",
    "training_args.yml",
    "train_args.yaml",
    "train_args.yml",
    "train_args.json",
    "config.yaml",
    "config.json",
    "hparams.yaml",
)


# Hugging Face TrainingArguments.max_grad_norm defaults to 1.0, and the Trainer logs grad_norm
# only when it clips (max_grad_norm > 0); ms-swift and LLaMA-Factory train with that Trainer and
# keep the default. A log of theirs with grad_norm and no args file was clipped, almost surely at 1.0.
TRAINER_DEFAULT_CLIP_NORM = 1.0


def trainer_default(trainer: str, looked_for: str) -> tuple[float, str]:
    """(value, why) for build_run(default_clip_norm=...) of a log written through the HF Trainer."""
    return TRAINER_DEFAULT_CLIP_NORM, (
        f"{trainer}'s default max_grad_norm; the log has grad_norm, which the Hugging Face Trainer logs only "
        f"when it clips, and no {looked_for} beside it names the threshold"
    )


def fail(message: str) -> GradscopeError:
    return GradscopeError(message, exit_code=2)


# ---------------------------------------------------------------- values


def to_float(v: Any) -> float:
    """A logged value as a float: numbers, numeric strings, 'nan'/'inf', None -> nan."""
    if v is None or isinstance(v, bool):
        return math.nan if v is None else float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        try:
            return float(s)  # float() already knows nan, inf, infinity
        except ValueError:
            return math.nan
    return math.nan


def norm_name(name: str) -> str:
    n = str(name).strip()
    if " - " in n:  # W&B CSV export: "<run name> - train/grad_norm"
        n = n.split(" - ", 1)[1]
    return n.lower()


def pick_column(columns: Iterable[str], names: Iterable[str]) -> str | None:
    """The first column whose normalized name is in `names` (in the order of `names`)."""
    by_norm: dict[str, str] = {}
    for c in columns:
        by_norm.setdefault(norm_name(c), c)
    for n in names:
        if n in by_norm:
            return by_norm[n]
    return None


def find_grad_norm_column(columns: list[str], column: str | None, where: str) -> str:
    """The grad-norm column: the one the user named, a common name, or the only 'grad..norm' one."""
    if column is not None:
        if column in columns:
            return column
        hit = pick_column(columns, [norm_name(column)])
        if hit is not None:
            return hit
        raise fail(f"no column '{column}' in '{where}' (columns: {preview(columns)})")
    hit = pick_column(columns, GRAD_NORM_NAMES)
    if hit is not None:
        return hit
    for n in GRAD_NORM_NAMES:  # a prefixed name: "grad/grad_2.0_norm_total", "model/grad_norm"
        ends = [c for c in columns if norm_name(c).endswith("/" + n)]
        if len(ends) == 1:
            return ends[0]
    # Anything else that looks like a global norm: one column with 'grad' and 'norm'
    # in its name, not a per-parameter one ('grad_2.0_norm/layer.weight'), not min/max.
    fuzzy = [
        c
        for c in columns
        if "grad" in norm_name(c) and "norm" in norm_name(c) and "/" not in norm_name(c).split("norm", 1)[1]
        and not norm_name(c).endswith(("__min", "__max", "_epoch"))
    ]
    l2 = [c for c in fuzzy if "inf" not in norm_name(c) and "1.0" not in norm_name(c)]
    if len(l2) == 1:
        return l2[0]
    if len(l2) > 1:
        raise fail(
            f"several gradient-norm-like columns in '{where}' ({', '.join(l2)}); name one with --column"
        )
    raise fail(f"no gradient-norm column in '{where}' (columns: {preview(columns)}); name one with --column")


def read_sparse_csv(path: Path, sep: str = ","):
    """A CSV as strings, one row per step value of `step_col` later: empty cells are missing
    (None) while a written 'nan'/'inf' stays a value -- sparse loggers (one metric per row)
    leave cells empty, and a NaN gradient norm must not vanish with them."""
    import io

    import pandas as pd

    try:
        data = path.read_bytes()
        df = pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(f"cannot parse '{path}' as CSV ({msg})") from None
    df.columns = [str(c) for c in df.columns]
    return df.replace("", None)


def group_first(df, step_col: str):
    """Sparse rows -> one row per step: the first non-missing value of each column."""
    import pandas as pd

    steps = pd.to_numeric(df[step_col], errors="coerce")
    df = df[steps.notna()].drop(columns=[step_col])
    steps = steps[steps.notna()].astype("int64")
    return df.groupby(steps.values, sort=True).first()


def preview(items: list[str], limit: int = 12) -> str:
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items) if items else "none"
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


# ---------------------------------------------------------------- python-dict console lines

_NAMES = {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "Infinity": math.inf, "None": None,
          "True": True, "False": False, "null": None, "true": True, "false": False}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and node.args:
        # tensor(2.31, device='cuda:0') printed by a careless logger: the number is all we want
        fname = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        if fname in ("tensor", "float", "float32", "float64", "array"):
            return _literal(node.args[0])
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    raise ValueError(f"not a literal: {ast.dump(node)[:40]}")


def parse_dict_text(text: str) -> dict | None:
    """A JSON object or a printed Python dict ({'loss': 2.4, 'grad_norm': inf}) -> dict, else None.

    Never evaluates code: the text is parsed to an AST and only literals (plus the names
    nan/inf and tensor(x) calls, reduced to x) are accepted.
    """
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    try:
        tree = ast.parse(text, mode="eval")
        obj = _literal(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return obj if isinstance(obj, dict) else None


_STEP_PREFIX = re.compile(r"\b(?:global[_ ]step|step|iter(?:ation)?)\s*[:=#]?\s*(\d+)", re.IGNORECASE)


def read_records(path: Path) -> tuple[list[dict], list[int | None], int]:
    """Dict records of a JSON Lines file or a console log, with a 'Step N' printed before
    the dict on the same line (None if none) and the number of lines that held no dict."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise fail(f"cannot read '{path}': {e.strerror or e}") from None
    records: list[dict] = []
    prefix_steps: list[int | None] = []
    other = 0
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        start, end = s.find("{"), s.rfind("}")
        rec = parse_dict_text(s[start : end + 1]) if 0 <= start < end else None
        if rec is None:
            other += 1
            continue
        m = _STEP_PREFIX.search(s[:start]) if start > 0 else None
        records.append(rec)
        prefix_steps.append(int(m.group(1)) if m else None)
    return records, prefix_steps, other


# ---------------------------------------------------------------- args files / clip threshold


def _find_key(obj: Any, keys: tuple[str, ...], depth: int = 0) -> tuple[str, Any] | None:
    if depth > 4:
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            kl = str(k).lower()
            leaf = kl.rsplit(".", 1)[-1]  # LlamaBoard writes "train.max_grad_norm"
            if leaf in keys and not isinstance(v, (dict, list)):
                return str(k), v
        for v in obj.values():
            if isinstance(v, (dict, list)):
                hit = _find_key(v, keys, depth + 1)
                if hit is not None:
                    return hit
    elif isinstance(obj, list):
        for v in obj[:50]:
            hit = _find_key(v, keys, depth + 1)
            if hit is not None:
                return hit
    return None


def load_mapping(path: Path) -> dict | None:
    """A JSON or YAML file as a dict; None if it is neither (never raises)."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None
    try:
        import yaml

        obj = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - python/object tags and the like: fall back to lines
        obj = {}
        for line in text.splitlines():
            m = re.match(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([^\s#]+)\s*$", line)
            if m:
                obj.setdefault(m.group(1), m.group(2))
    return obj if isinstance(obj, dict) else None


def clip_from_value(v: Any) -> float | None:
    f = to_float(v)
    if math.isnan(f) or f <= 0 or math.isinf(f):
        return None  # 0 / None / inf: the trainer does not clip
    return f


def find_args(dirs: Iterable[Path], names: Iterable[str], keys: tuple[str, ...] = CLIP_KEYS) -> tuple[dict, Path] | None:
    """The first args file in `dirs` (in order) that holds one of `keys`: (mapping, path)."""
    for d in dirs:
        for name in names:
            f = d / name
            if not f.is_file():
                continue
            obj = load_mapping(f)
            if obj and _find_key(obj, keys) is not None:
                return obj, f
    return None


def lookup(obj: dict, keys: tuple[str, ...]) -> Any:
    hit = _find_key(obj, keys)
    return None if hit is None else hit[1]


def pickle_scalars(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Scalar attributes of a pickled object (torch.save'd TrainingArguments) read from the
    opcode stream with pickletools -- nothing is unpickled, no code runs.

    A dataclass's state is pickled as alternating key and value opcodes, so a string
    opcode naming a key followed directly by a number/bool/None opcode is that field.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not names:
                    return {}
                data = z.read(names[0])
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return {}
    found: dict[str, Any] = {}
    pos = 0
    import io

    buf = io.BytesIO(data)
    while pos < len(data) and len(found) < len(keys):
        buf.seek(pos)
        prev_str: str | None = None
        try:
            for op, arg, p in pickletools.genops(buf):
                if prev_str is not None and prev_str in keys and prev_str not in found:
                    if op.name in ("BINFLOAT", "FLOAT", "BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG"):
                        found[prev_str] = float(arg) if not isinstance(arg, bool) else arg
                    elif op.name in ("NEWTRUE", "NEWFALSE"):
                        found[prev_str] = op.name == "NEWTRUE"
                    elif op.name == "NONE":
                        found[prev_str] = None
                    elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                        found[prev_str] = arg
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    prev_str = arg
                elif op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    prev_str = None
        except Exception:  # noqa: BLE001 - a corrupt or exotic pickle: keep what was found
            break
        nxt = buf.tell()
        if nxt <= pos:
            break
        pos = nxt  # legacy torch.save files are several pickles in a row
    return found


# ---------------------------------------------------------------- records -> Run


def dedupe_by_step(rows: list[dict]) -> tuple[list[dict], int, int]:
    """One row per step (the last written wins), plus counts of exact repeats dropped and
    of steps logged more than once with different grad_norm values."""
    by_step: dict[int, dict] = {}
    repeats = conflicts = 0
    for r in rows:
        s = r["step"]
        old = by_step.get(s)
        if old is not None:
            a, b = to_float(old.get("grad_norm")), to_float(r.get("grad_norm"))
            same = (a == b) or (math.isnan(a) and math.isnan(b))
            if same:
                repeats += 1
                # keep the first copy's other fields filled in, take any the repeat adds
                r = {**old, **{k: v for k, v in r.items() if v is not None}}
            else:
                conflicts += 1
        by_step[s] = r
    return [by_step[s] for s in sorted(by_step)], repeats, conflicts


def spacing(steps: list[int]) -> int | None:
    """The usual distance between logged steps (the median difference)."""
    if len(steps) < 2:
        return None
    diffs = sorted(b - a for a, b in zip(steps, steps[1:]) if b > a)
    if not diffs:
        return None
    return int(diffs[len(diffs) // 2])


def norm_health_notes(grad_norms: list[float]) -> list[str]:
    """Notes for norms that look per-rank/per-shard or broken rather than global."""
    notes = []
    vals = [g for g in grad_norms if g is not None]
    if not vals:
        return notes
    if all(math.isnan(g) for g in vals):
        notes.append(
            "every grad_norm is NaN: under DeepSpeed ZeRO/FSDP some trainers log no global norm "
            "(or a per-rank one); these values cannot be trusted"
        )
    elif len(vals) >= 3 and all(g == 0.0 for g in vals):
        notes.append(
            "every grad_norm is exactly 0.0: under DeepSpeed ZeRO/FSDP some trainers log a "
            "per-rank/per-shard or unset norm; these values cannot be trusted"
        )
    return notes


def build_run(
    path: Path,
    fmt: str,
    rows: list[dict],
    *,
    notes: list[str],
    clip_norm: float | None,
    status: str = "unknown",
    layers=None,
    extra_meta: dict | None = None,
    dedupe: bool = True,
    default_clip_norm: tuple[float, str] | None = None,
):
    """Rows of {'step', 'grad_norm', 'loss', 'lr'} -> a Run with the contract's columns and meta.

    default_clip_norm: (value, why) when no file names the threshold but the trainer is known
    to have clipped at its default (meta clip_norm_default: judged with source "default")."""
    import pandas as pd

    from gradscope.rundir import Run, normalize_steps

    rows = [r for r in rows if r.get("step") is not None]
    from gradscope.validate import check_logged_norms

    check_logged_norms(path, rows)  # text or a negative norm: exit 2 naming the line, not a "non-finite" step
    untrusted = False  # structured flag (rundir.NORMS_UNTRUSTED); the notes are for people
    if dedupe:
        rows, repeats, conflicts = dedupe_by_step(rows)
        if repeats:
            notes.append(f"{repeats} repeated log entries (same step, same grad_norm) were counted once")
        if conflicts:
            untrusted = True
            notes.append(
                f"{conflicts} steps were logged more than once with different grad_norm values: "
                "norms look per-rank/per-shard (DeepSpeed ZeRO/FSDP) or a resumed run appended to the "
                "same log; the last value per step is used"
            )
    steps = [int(r["step"]) for r in rows]
    gn = [to_float(r.get("grad_norm")) for r in rows]
    if not any(not math.isnan(g) or r.get("grad_norm") is not None for g, r in zip(gn, rows)):
        raise fail(f"no gradient norms in '{path}' ({fmt} format, {len(rows)} steps)")
    health = norm_health_notes(gn)
    untrusted = untrusted or bool(health)
    notes.extend(health)

    df = pd.DataFrame(
        {
            "rank": 0,
            "optimizer": 0,
            "step": steps,
            "grad_norm": gn,
            "loss": [to_float(r.get("loss")) for r in rows],
            "lr": [to_float(r.get("lr")) for r in rows],
        }
    )
    if clip_norm is not None:
        # The trainer clipped every step at this threshold (HF/Lightning clip whenever it is > 0).
        df["clip_max_norm"] = clip_norm
        df["clipped"] = df["grad_norm"] > clip_norm
    df = normalize_steps(df)

    k = spacing(steps)
    meta: dict[str, Any] = {
        "status": status,
        "exit_code": None,
        "format": fmt,
        "clip_norm": clip_norm,
        "clip_norm_default": default_clip_norm[0] if default_clip_norm and clip_norm is None else None,
        "clip_norm_default_reason": default_clip_norm[1] if default_clip_norm and clip_norm is None else None,
        "sampled": bool(k is not None and k > 1),
        "logging_steps": k,
        "notes": notes,
        "source_path": str(path),
    }
    if untrusted:
        meta[NORMS_UNTRUSTED] = True
    if extra_meta:
        meta.update(extra_meta)
    if layers is None:
        layers = pd.DataFrame({"rank": [], "optimizer": [], "step": []}, dtype="int64")
    return Run(path=Path(path), steps=df, layers=layers, meta=meta, source=fmt)


def sampled_note(k: int | None, what: str = "grad_norm") -> str | None:
    if k is None or k <= 1:
        return None
    return (
        f"the log holds every {k}th optimizer step only: {what} is the norm of the last step before "
        f"each entry, so spikes between entries are invisible"
    )
