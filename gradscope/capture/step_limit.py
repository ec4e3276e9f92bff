"""`gradscope run --max-steps N` (the step limit; stopper.py is --stop-on-nan): end the training cleanly once the first optimizer has made N steps.

The recorder calls :func:`StepLimit.after_step` when a step is complete (after
``optimizer.step()`` returned, closure and all; after a ``GradScaler`` step it
skipped; after a clip call that is the step of a loop without optimizer). The
count is the recorder's own row count of optimizer 0 (a Python int: no host read
of a tensor), so a step the loss scaler skipped counts as a step, as it does in
the ``step`` column and in trainers' own step counters (Hugging Face's
``global_step``). Other optimizers are not counted: the run ends when optimizer 0
completes its Nth step, whatever the others have done by then.

With ``before_next`` (`gradscope run --max-steps N --metric-name NAME`, which tune's
``--metric`` probes use) the stop comes when the next step begins instead (the step
pre-hook, before anything of that step is applied; or the script's own end): what the
script reports after its Nth step, an evaluation say, is recorded (capture/metrics.py).

How the training ends:
- one process: ``SystemExit(0)`` is raised from the hook, so the script's
  ``finally`` blocks and atexit handlers run (gradscope's flush among them) and the
  process exits 0. A script that swallows it and steps on gets it again at every
  further step.
- under ``torch.distributed`` (a process group of more than one rank): every rank
  reaches the same step (SPMD), so all ranks meet at a barrier there, the process
  group is destroyed, the atexit handlers run and the process ends with status 0
  by ``os._exit``. Interpreter finalisation is skipped on purpose: gloo's threads
  can abort a rank there (pytorch/pytorch#179291); the script's own ``finally``
  blocks do not run in that case.
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import Any

STOPPED = "stopped"


class StepLimit:
    """Stops the process after the ``max_steps``-th step of optimizer 0."""

    def __init__(self, max_steps: int, before_next: bool = False) -> None:
        self.max_steps = int(max_steps)
        self.before_next = before_next
        self._announced = False

    def after_step(self, recorder: Any) -> None:
        if not self.before_next:
            self._stop_if_reached(recorder)

    def before_step(self, recorder: Any) -> None:
        if self.before_next:
            self._stop_if_reached(recorder)

    def _stop_if_reached(self, recorder: Any) -> None:
        if recorder.current_step() + 1 < self.max_steps:  # optimizer 0's steps (none yet: 0)
            return
        recorder.status = STOPPED
        if not self._announced:
            self._announced = True
            if recorder.rank == 0:
                print(f"gradscope: stopping the training after {self.max_steps} optimizer steps (--max-steps)",
                      file=sys.stderr)
        if _distributed():
            _end_distributed(recorder)
        raise SystemExit(0)


def _distributed() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except Exception:
        return False


def _end_distributed(recorder: Any) -> None:
    import torch.distributed as dist

    try:
        dist.barrier()  # every rank is at this same step: nobody tears down under a peer's sends
        recorder.stop(STOPPED)
        dist.destroy_process_group()
    except Exception as e:  # a peer died: still end this rank with its data flushed
        print(f"gradscope: --max-steps teardown: {type(e).__name__}: {e}", file=sys.stderr)
        recorder.stop(STOPPED)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
