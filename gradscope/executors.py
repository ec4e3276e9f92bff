"""Where `gradscope tune` runs its pilot and probes: processes on this machine (the node's GPUs
partitioned among them), or tasks on a Ray cluster.

An executor takes a batch of probes (each a ``gradscope run`` command line, a log file and a run
directory name) and runs them all to their end, as many at once as it has room for; it reports
how each ended (:class:`Outcome`). What the probes are and what they mean stays in tune.py.

    LocalExecutor(jobs, gpus_per_probe)   J processes at once; with N GPUs per probe each gets its
                                          own N of the visible devices (CUDA_VISIBLE_DEVICES)
    RayExecutor(address, ...)             one Ray task per probe (num_cpus, num_gpus), retried once
                                          when its worker dies; Ray is imported only here

Concurrent probes of a launcher command (torchrun, python -m torch.distributed.run, accelerate
launch, deepspeed) each get their own rendezvous port (probe_process.with_rendezvous_port).
"""
from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gradscope import probe_process
from gradscope.errors import GradscopeError

EXECUTORS = ("local", "ray")


@dataclass
class Probe:
    name: str  # the run directory's name (pilot, probe-tau0.5-n25)
    argv: list[str]  # the `gradscope run ...` command line
    log: Path  # its output
    describe: str = ""  # what the progress line says when it starts


@dataclass
class Outcome:
    returncode: int | None  # of the `gradscope run` process; None: it has none (see failure)
    started: float = math.nan  # unix seconds, on the machine that ran it
    ended: float = math.nan
    failure: str | None = None  # why it ended without an exit status (its worker died twice)
    attempts: int = 1
    host: str = ""
    argv: list[str] | None = None  # as run (with the rendezvous port it was given)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an interval ending as another starts: not both)."""
    known = [(s, e) for s, e in intervals if math.isfinite(s) and math.isfinite(e)]
    events = sorted([(s, 1) for s, _ in known] + [(e, -1) for _, e in known])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def visible_gpus(environ: dict | None = None) -> list[str]:
    """The devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs);
    without the variable, every GPU torch sees. CUDA ignores everything from an invalid entry on
    (``-1`` hides all), and so does this."""
    environ = os.environ if environ is None else environ
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        try:
            import torch

            return [str(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - no usable CUDA: no GPU
            return []
    out = []
    for d in cvd.split(","):
        d = d.strip()
        if not d or d.startswith("-"):
            break
        out.append(d)
    return out


def gpu_slots(gpus: list[str], per_probe: int) -> list[str]:
    """Disjoint groups of ``per_probe`` devices, each a CUDA_VISIBLE_DEVICES value."""
    return [",".join(gpus[k * per_probe:(k + 1) * per_probe]) for k in range(len(gpus) // per_probe)]


class LocalExecutor:
    """Today's probes: subprocesses of this machine, ``jobs`` at once. With ``gpus_per_probe``
    N > 0 the visible GPUs are cut into groups of N and each running probe holds one group
    (its CUDA_VISIBLE_DEVICES), so no GPU serves two probes; ``jobs`` defaults to the number of
    groups. With ``cpus_per_probe`` (and no GPUs asked) ``jobs`` defaults to cores // N."""

    name = "local"
    setup_seconds = 0.0

    def __init__(self, jobs: int | None = None, gpus_per_probe: int = 0, cpus_per_probe: int | None = None,
                 environ: dict | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        self.env, self.cwd = environ, os.getcwd()
        self.gpus_per_probe = gpus_per_probe
        self.slots: list[str | None] = [None]
        if gpus_per_probe and gpus_per_probe > 0:
            gpus = visible_gpus(environ)
            where = (f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
                     if "CUDA_VISIBLE_DEVICES" in environ else "torch.cuda.device_count()")
            if len(gpus) < gpus_per_probe:
                raise GradscopeError(f"--gpus-per-probe {gpus_per_probe}: only {len(gpus)} GPU"
                                     f"{'' if len(gpus) == 1 else 's'} visible ({where})", 2)
            self.slots = gpu_slots(gpus, gpus_per_probe)
            if jobs is not None and jobs > len(self.slots):
                raise GradscopeError(f"--jobs {jobs} with --gpus-per-probe {gpus_per_probe} needs "
                                     f"{jobs * gpus_per_probe} GPUs; {len(gpus)} visible ({where}); "
                                     f"use --jobs {len(self.slots)} or fewer", 2)
            jobs = jobs or len(self.slots)
        elif jobs is None:
            jobs = max(1, (os.cpu_count() or 1) // cpus_per_probe) if cpus_per_probe else 1
        self.jobs = max(1, jobs)
        self._procs: set = set()
        self._lock = threading.Lock()
        self._ports: set[int] = set()

    @property
    def describe(self) -> str:
        gpu = (f", {self.gpus_per_probe} GPU{'s' if self.gpus_per_probe > 1 else ''} each "
               f"({'; '.join(s for s in self.slots if s)})" if self.gpus_per_probe else "")
        return f"local, up to {self.jobs} at once{gpu}"

    def run(self, probes: list[Probe], on_start: Callable[[Probe], None] | None = None) -> list[Outcome]:
        free: queue.Queue = queue.Queue()
        for s in self.slots * (1 if self.gpus_per_probe else self.jobs):
            free.put(s)

        def one(p: Probe) -> Outcome:
            slot = free.get()
            port = self._port() if self.jobs > 1 else None  # alone, the command stays as the user wrote it
            try:
                if on_start:
                    on_start(p)
                r = probe_process.run(p.argv, self.cwd, self.env, str(p.log), port=port,
                                      cuda_visible_devices=slot, on_start=self._started)
                return Outcome(r["returncode"], r["started"], r["ended"], host=r["host"], argv=r["argv"])
            finally:
                free.put(slot)
                with self._lock:
                    self._ports.discard(port)

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(one, p) for p in probes]
            try:
                return [f.result() for f in futures]
            except KeyboardInterrupt:
                for f in futures:
                    f.cancel()
                self.stop_all()
                raise

    def _port(self) -> int:
        """A free port no other running probe of this tune holds (the OS could hand one out twice)."""
        with self._lock:
            for _ in range(100):
                p = probe_process.free_port()
                if p not in self._ports:
                    self._ports.add(p)
                    return p
        raise GradscopeError("no free TCP port for a probe's rendezvous", 1)

    def _started(self, proc) -> None:
        with self._lock:
            self._procs.add(proc)

    def stop_all(self) -> None:
        """Ctrl-C: the probes still running are stopped (SIGTERM: each records its outcome)."""
        with self._lock:
            procs = [p for p in self._procs if p.poll() is None]
        for p in procs:
            probe_process._stop(p)

    def close(self) -> None:
        pass


class RayExecutor:
    """Each probe is a Ray task (``num_cpus``, ``num_gpus``) that runs the probe's command on a
    worker, in this process's working directory and environment. Connects to ``address`` (else
    RAY_ADDRESS, else starts a local Ray instance for the run, stopped by :meth:`close`), checks
    that one probe fits on some node, and that every node can run gradscope and shares ``out``."""

    name = "ray"

    def __init__(self, out: Path, address: str | None = None, gpus_per_probe: int = 0, cpus_per_probe: int = 1,
                 jobs: int | None = None, on_event: Callable[[str], None] | None = None,
                 check_timeout: float = 300.0) -> None:
        try:
            import ray
        except ImportError:
            raise GradscopeError("--executor ray needs Ray: pip install 'gradscope[ray]'", 2) from None
        self.ray = ray
        t0 = time.monotonic()
        self.say = on_event or (lambda msg: None)
        self.gpus, self.cpus = max(0, gpus_per_probe or 0), max(0, cpus_per_probe if cpus_per_probe is not None else 1)
        self.jobs = jobs
        self.env, self.cwd = dict(os.environ), os.getcwd()
        self.env.pop("CUDA_VISIBLE_DEVICES", None)  # a worker's devices are the ones Ray gives the task
        address = address or os.environ.get("RAY_ADDRESS") or None
        self.address = address
        import logging

        # Ray's driver prints what its cluster reports ("(raylet) A worker died ...") on sys.stdout,
        # where `tune --json` writes its one object: Ray's words go to stderr while it is connected.
        self._stdout, sys.stdout = sys.stdout, sys.stderr
        # "local": a fresh instance for this run (a bare ray.init() would join any cluster that
        # `ray start` left on this machine).
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=True)
        except Exception as e:  # noqa: BLE001 - Ray's own errors: connection refused, version mismatch
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            sys.stdout = self._stdout
            raise GradscopeError(f"cannot connect to the Ray cluster at {address}: {first}" if address else
                                 f"cannot start a local Ray instance: {first}", 2) from None
        self._started_here = address is None
        # The task code travels by value: a worker needs Ray, not gradscope, in its own interpreter
        # (the probe itself runs the Python of this process: checked below).
        ray.cloudpickle.register_pickle_by_value(probe_process)
        self._task = ray.remote(probe_process.ray_task)
        try:
            self._check_resources()
            self._check_workers(Path(out), check_timeout)
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0  # connecting and checking: part of the tune's wall time

    @property
    def describe(self) -> str:
        where = f"Ray cluster at {self.address}" if self.address else "a local Ray instance"
        res = self.ray.cluster_resources()
        return (f"ray, {where} ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs); "
                f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}, {self.gpus} GPU{'s' if self.gpus != 1 else ''} per probe")

    def _nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def _check_resources(self) -> None:
        nodes = self._nodes()
        fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= self.cpus and n["Resources"].get("GPU", 0) >= self.gpus]
        if not fits:
            biggest = ", ".join(f"{int(n['Resources'].get('CPU', 0))} CPUs and {int(n['Resources'].get('GPU', 0))} GPUs"
                                for n in nodes[:4]) or "no node"
            where = f"the Ray cluster at {self.address}" if self.address else "the local Ray instance"
            raise GradscopeError(
                f"no node of {where} has room for one probe ({self.cpus} CPUs, {self.gpus} GPUs: "
                f"--cpus-per-probe/--gpus-per-probe); its nodes have {biggest}", 2)

    def _check_workers(self, out: Path, timeout: float) -> None:
        """On every node: can the probe's Python import gradscope, and does a file written under OUT
        there reach this machine?"""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        check = self.ray.remote(probe_process.check_worker)
        refs = [check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(sys.executable, self.cwd, self.env, str(out.resolve()), token) for n in self._nodes()]
        ready, pending = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            for r in pending:
                self.ray.cancel(r, force=True)
            raise GradscopeError(f"{len(pending)} of the Ray cluster's {len(refs)} nodes did not answer "
                                 f"within {timeout:.0f} s (a task that needs no CPU)", 2)
        try:
            results = self.ray.get(ready)
        except self.ray.exceptions.RayError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise GradscopeError(f"a Ray worker could not run gradscope's check task: {first}", 2) from None
        for r in results:
            if r["error"]:
                raise GradscopeError(
                    f"gradscope is not importable on the Ray worker {r['host']}: {r['error']}; the workers need "
                    f"the Python environment of this machine ({sys.executable}, with gradscope installed)", 2)
            wrote = Path(r["wrote"])
            try:
                ok = wrote.read_text() == token
            except OSError:
                ok = False
            if not ok:
                raise GradscopeError(
                    f"--out '{out}' is not on storage shared with the Ray workers: the worker {r['host']} wrote "
                    f"{wrote}, which this machine cannot read; give --out a path on a filesystem every node mounts", 2)
            wrote.unlink(missing_ok=True)
        self.say(f"ray: {len(results)} node{'s' if len(results) != 1 else ''} checked: each runs gradscope from "
                 f"{min(r['gradscope'] for r in results)} and shares {out}")

    def run(self, probes: list[Probe], on_start: Callable[[Probe], None] | None = None) -> list[Outcome]:
        ray = self.ray
        task = self._task.options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=1, retry_exceptions=False)
        outcomes: dict[int, Outcome] = {}
        waiting = list(enumerate(probes))
        running: dict = {}  # ObjectRef -> index
        try:
            while waiting or running:
                while waiting and (self.jobs is None or len(running) < self.jobs):
                    i, p = waiting.pop(0)
                    log = os.path.join(self.cwd, p.log)  # the worker's own working directory is Ray's
                    attempts = log + ".attempts"
                    Path(attempts).unlink(missing_ok=True)
                    if on_start:
                        on_start(p)
                    ref = task.remote(p.argv, self.cwd, self.env, log, self.gpus, attempts)
                    running[ref] = i
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    i = running.pop(ref)
                    outcomes[i] = self._outcome(ref, probes[i])
        except KeyboardInterrupt:
            self._cancel(list(running))
            raise
        return [outcomes[i] for i in range(len(probes))]

    def _outcome(self, ref, p: Probe) -> Outcome:
        attempts = _count_lines(os.path.join(self.cwd, p.log) + ".attempts")
        try:
            r = self.ray.get(ref)
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                self.ray.exceptions.OwnerDiedError, self.ray.exceptions.ObjectLostError) as e:
            kind = type(e).__name__
            return Outcome(None, failure=f"its Ray worker died ({kind}) on each of {max(attempts, 2)} attempts",
                           attempts=max(attempts, 2))
        except self.ray.exceptions.RayError as e:
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            return Outcome(None, failure=f"its Ray task failed: {last[:300]}", attempts=attempts)
        if attempts > 1:
            self.say(f"{p.name}: its Ray worker died; retried once, and the retry finished")
        return Outcome(r["returncode"], r["started"], r["ended"], attempts=attempts, host=r["host"], argv=r["argv"])

    def _cancel(self, refs: list) -> None:
        """Ctrl-C: each running probe's task is interrupted (its probe gets SIGTERM and records how it
        ended); tasks that do not end within a minute are killed with their worker."""
        if not refs:
            return
        for r in refs:
            try:
                self.ray.cancel(r, force=False)
            except Exception:  # noqa: BLE001 - already finished
                pass
        _, pending = self.ray.wait(refs, num_returns=len(refs), timeout=60)
        for r in pending:
            try:
                self.ray.cancel(r, force=True)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        try:
            self.ray.shutdown()
        except Exception:  # noqa: BLE001 - closing must not hide what happened before
            pass
        finally:
            sys.stdout = self._stdout


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 1


def make_executor(name: str, *, out: Path, jobs: int | None, gpus_per_probe: int = 0,
                  cpus_per_probe: int | None = None, ray_address: str | None = None,
                  on_event: Callable[[str], None] | None = None):
    """The executor the options ask for (the CLI's --executor, --jobs, --gpus-per-probe, ...)."""
    if name == "local":
        if ray_address:
            raise GradscopeError("--ray-address goes with --executor ray", 2)
        return LocalExecutor(jobs, gpus_per_probe, cpus_per_probe)
    if name == "ray":
        return RayExecutor(out, ray_address, gpus_per_probe, 1 if cpus_per_probe is None else cpus_per_probe,
                           jobs, on_event)
    raise GradscopeError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{name}'", 2)
