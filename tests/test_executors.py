"""Where tune's probes run (gradscope/executors.py, gradscope/probe_process.py): each concurrent
launcher probe gets its own rendezvous port, each concurrent GPU probe its own devices (checked by
the environment real probes receive: no GPU needed, the visible devices are named by
CUDA_VISIBLE_DEVICES), and the checks a Ray worker runs before the first probe."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from gradscope import probe_process
from gradscope.errors import GradscopeError
from gradscope.executors import LocalExecutor, Probe, gpu_slots, max_overlap, visible_gpus
from gradscope.launch import Target
from gradscope.tune import gradscope_argv

HEAD = ["python", "-c", "cli", "run", "--out", "o", "--"]


@pytest.mark.parametrize("cmd, expect", [
    (["torchrun", "--nproc-per-node", "2", "train.py", "--master-port", "1"],
     ["torchrun", "--master-port", "4242", "--nproc-per-node", "2", "train.py", "--master-port", "1"]),
    (["torchrun", "--master_port=29500", "--nnodes", "1", "t.py"], ["torchrun", "--master_port=4242", "--nnodes", "1", "t.py"]),
    (["/usr/bin/python3", "-m", "torch.distributed.run", "--master-port", "29500", "t.py"],
     ["/usr/bin/python3", "-m", "torch.distributed.run", "--master-port", "4242", "t.py"]),
    (["accelerate", "launch", "--num_processes", "2", "t.py"],
     ["accelerate", "launch", "--main_process_port", "4242", "--num_processes", "2", "t.py"]),
    (["deepspeed", "--num_gpus", "2", "t.py"], ["deepspeed", "--master_port", "4242", "--num_gpus", "2", "t.py"]),
    (["torchrun", "--rdzv-endpoint", "localhost:29400", "t.py"], ["torchrun", "--rdzv-endpoint", "localhost:4242", "t.py"]),
    (["torchrun", "--standalone", "--nproc-per-node", "2", "t.py"], None),  # picks its own port
    (["python", "t.py", "--master-port", "1"], None),  # not a launcher: the script's own option
])
def test_each_launcher_gets_the_port_in_its_own_option(cmd, expect):
    got = probe_process.with_rendezvous_port(HEAD + cmd, 4242)
    assert got[:len(HEAD)] == HEAD
    assert got[len(HEAD):] == (cmd if expect is None else expect)
    # resuming compares commands without the port tune gave: the same probe either way
    assert probe_process.without_rendezvous_port(got[len(HEAD):]) == probe_process.without_rendezvous_port(cmd)


def test_visible_gpus_and_their_groups():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,1,GPU-ab12,7"}) == ["3", "1", "GPU-ab12", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}) == ["0", "1"]  # CUDA stops at an invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == ["0,1", "2,3"]
    assert LocalExecutor(None, 2, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}).jobs == 4  # 8 GPUs // 2
    assert LocalExecutor(None, 3, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}).jobs == 2
    assert LocalExecutor(2, 1, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}).jobs == 2
    with pytest.raises(GradscopeError, match="only 1 GPU visible"):
        LocalExecutor(None, 2, environ={"CUDA_VISIBLE_DEVICES": "5"})
    with pytest.raises(GradscopeError, match="--jobs 3 with --gpus-per-probe 2 needs 6 GPUs; 4 visible"):
        LocalExecutor(3, 2, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_max_overlap():
    assert max_overlap([]) == 0
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2  # one ending as another starts: not both
    assert max_overlap([(0, 10), (1, 2), (3, 4), (5, 6)]) == 2
    assert max_overlap([(0, 10), (1, 9), (2, 8)]) == 3


RECORD_ENV = """\
import json, os, sys, time
start = time.time()
time.sleep(1.5)  # long enough that the executor's two slots are both busy
out = os.path.join(sys.argv[1], os.environ.get("RANK", "x") + "-" + str(os.getpid()) + ".json")
json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "port": os.environ.get("MASTER_PORT"),
           "run_dir": os.environ.get("GRADSCOPE_RUN_DIR"), "start": start, "end": time.time()}, open(out, "w"))
"""


@pytest.mark.slow
def test_concurrent_torchrun_probes_get_their_own_gpus_and_ports(tmp_path):
    """Four real probes (`gradscope run -- python -m torch.distributed.run --master-port 29500 ...`,
    the same port for all, as a user would write it) on a node whose visible devices are 0-3 with 2
    GPUs per probe: two run at once, each with its own pair of devices and its own rendezvous port
    (the port each rank really got, MASTER_PORT as torchrun set it), never the user's 29500."""
    (tmp_path / "rec.py").write_text(RECORD_ENV)
    seen = tmp_path / "seen"
    seen.mkdir()
    target = Target("command", sys.executable, ["-m", "torch.distributed.run", "--nproc-per-node", "1",
                                                "--master-port", "29500", str(tmp_path / "rec.py"), str(seen)])
    ex = LocalExecutor(None, 2, environ={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert ex.jobs == 2
    probes = [Probe(f"p{i}", gradscope_argv(target, tmp_path / f"p{i}", 1.0, None, 0), tmp_path / f"p{i}.log")
              for i in range(4)]
    outcomes = ex.run(probes)
    assert [o.returncode for o in outcomes] == [0] * 4, [Path(p.log).read_text()[-2000:] for p in probes]
    recs = [json.loads(f.read_text()) for f in seen.glob("*.json")]
    assert len(recs) == 4 and {Path(r["run_dir"]).name for r in recs} == {"p0", "p1", "p2", "p3"}
    assert {r["cvd"] for r in recs} <= {"0,1", "2,3"}
    ports = [int(r["port"]) for r in recs]
    assert 29500 not in ports
    overlapping = 0
    for i, a in enumerate(recs):
        for b in recs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:  # ran at the same time
                overlapping += 1
                assert a["cvd"] != b["cvd"] and a["port"] != b["port"]
    assert overlapping >= 1  # two at once really happened
    assert max_overlap([(o.started, o.ended) for o in outcomes]) == 2
    # the probe's recorded command is the user's, with the port tune gave it
    meta = json.loads((tmp_path / "p0" / "meta.json").read_text())
    assert meta["command"][meta["command"].index("--master-port") + 1] != "29500"
    assert probe_process.without_rendezvous_port(meta["command"]) == probe_process.without_rendezvous_port(target.argv())


def test_a_worker_without_gradscope_says_so(tmp_path):
    """The check a Ray worker runs before the first probe, with a Python that cannot import
    gradscope (this interpreter without its site directories, where gradscope is installed)."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(bare.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = probe_process.check_worker(str(bare), str(tmp_path), env, str(tmp_path / "out"), "tok")
    assert "cannot import gradscope" in res["error"] and "No module named 'gradscope'" in res["error"]
    ok = probe_process.check_worker(sys.executable, str(tmp_path), dict(os.environ), str(tmp_path / "out"), "tok")
    assert ok["error"] is None and ok["gradscope"].endswith("gradscope/__init__.py")
    assert Path(ok["wrote"]).read_text() == "tok"
    missing = probe_process.check_worker(str(tmp_path / "nope"), str(tmp_path), env, str(tmp_path / "out"), "t")
    assert missing["error"] == f"no Python at {tmp_path / 'nope'}"


def test_bad_executor_options_are_one_line_and_exit_2(tmp_path):
    from gsutil import gradscope as gs, script

    task = script("tune_task.py")
    for args, said in ((["--executor", "foo"], "--executor must be one of local, ray, got 'foo'"),
                       (["--ray-address", "127.0.0.1:1"], "--ray-address goes with --executor ray"),
                       (["--gpus-per-probe", "2"], "--gpus-per-probe 2: only 1 GPU visible (CUDA_VISIBLE_DEVICES=0)")):
        res = gs("tune", *args, "--out", tmp_path / "t", task, cwd=tmp_path,
                 env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
        assert res.returncode == 2 and res.stderr == f"gradscope: error: {said}\n", (args, res.stderr)
        assert not (tmp_path / "t").exists()  # nothing started
