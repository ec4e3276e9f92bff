"""The clip audit's own cost per optimizer step: its events (zero_grad, backward begin/end, a clip,
step begin/end) fed directly, on 2 and 300 parameter tensors, with and without a clip call.

    python benchmarks/audit_overhead.py
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gradscope.capture.audit import ClipAudit


@dataclass
class _St:  # the fields of the recorder's _OptState that the audit reads
    params: list
    id: int = 0
    kind: str = "optimizer"
    steps: int = 0


def main() -> None:
    torch.set_num_threads(1)
    for n_tensors in (2, 300):
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.zeros(4)
        st = _St(params)
        owned = {id(p): st for p in params}
        audit = ClipAudit(owner=owned.get, active=lambda: True)
        opt = torch.optim.SGD(params, lr=0.1)

        def step(clip: bool) -> None:
            audit.optimizer_zero(opt)
            audit.backward_begin()
            audit.backward_end()
            if clip:
                audit.clip(params, "clip_grad_norm_", 1.0)
            audit.step_begin(st)
            st.steps += 1
            audit.step_end(st)

        for clip in (False, True):
            for _ in range(200):
                step(clip)
            best = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(2000):
                    step(clip)
                best.append((time.perf_counter() - t) / 2000 * 1e6)
            assert audit.error is None, audit.error
            print(f"{n_tensors} parameter tensors, {'script clips' if clip else 'no clip'}: "
                  f"{min(best):.1f} us per step (best of 5 x 2000 steps)")


if __name__ == "__main__":
    main()
