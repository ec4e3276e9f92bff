"""Re-record every sample run: `python sample_runs/record.py [NAME ...]` from anywhere.

Each run is `gradscope run --out sample_runs/<name> --force <script> <args>`:
CPU, seeded, a few seconds each. The scripts live in sample_runs/scripts/.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, script arguments, --layer-stride)
RUNS = {
    "healthy_transformer": ("healthy_transformer.py", [], 1),
    "lstm_nan": ("lstm_lm.py", [], 1),
    "lstm_never_clips": ("lstm_lm.py", ["--lr", "3", "--clip-norm", "100"], 1),
    "lstm_always_clips": ("lstm_lm.py", ["--clip-norm", "0.01"], 1),
    "amp_fp16_skipped": ("amp_fp16.py", [], 1),
    # The loss falls to ~0.4, climbs to ~2.8 at step 70 and stays there, finite: `check --fail-on divergence`.
    "lstm_diverged": ("lstm_lm.py", ["--lr", "20"], 0),
    # Healthy but noisy: one sequence per batch, so the per-step loss jumps about (no divergence).
    "transformer_noisy": ("healthy_transformer.py", ["--batch", "1"], 0),
}


def record(name: str) -> int:
    script, args, stride = RUNS[name]
    # Paths relative to the repository root: meta.json then reads the same on every machine.
    args = ["--quiet", "--force", "--layer-stride", str(stride), "--out", f"sample_runs/{name}",
            f"sample_runs/scripts/{script}", *args]
    print("$ gradscope run " + " ".join(args), flush=True)
    return subprocess.call([sys.executable, "-m", "gradscope", "run", *args], cwd=HERE.parent)


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown sample run(s): {', '.join(unknown)} (known: {', '.join(RUNS)})", file=sys.stderr)
        return 2
    worst = 0
    for name in names or list(RUNS):
        rc = record(name)
        print(f"  -> sample_runs/{name} (script exit code {rc})", flush=True)
        # lstm_nan's script ends normally after printing that training diverged.
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
