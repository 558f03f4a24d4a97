"""Two processes joined by `jax.distributed` (CPU, gloo collectives) run one round on one
global data=2,model=2 mesh and produce the single-process greedy outputs."""

import json
import socket

from test_sharding import load_example, start_example


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "mh.json"
  common = ["--num-processes", "2", "--local-devices", "2", "--mesh", "data=2,model=2",
            "--coordinator", f"localhost:{free_port()}", "--methods", "tokendance",
            "--rounds", "1"]
  procs = [start_example(out if i == 0 else tmp_path / "unused.json", "--process-id", str(i),
                         *common, devices=2) for i in range(2)]
  try:  # the single-process, single-device reference, computed here meanwhile
    ref = load_example().run_methods(["tokendance"], rounds=1)
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  got = json.loads(out.read_text())
  assert (got["processes"], got["devices"], got["mesh"]) == (2, 4, "data=2,model=2")
  assert not (tmp_path / "unused.json").exists()  # only process 0 writes
  assert got["outputs"] == ref["outputs"]
  assert sum(len(ids) for r in ref["outputs"]["tokendance"] for ids in r.values()) > 0
  assert all(s["devices"] == 4 for s in got["stats"]["tokendance"])
