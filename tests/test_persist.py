"""Session snapshots: a restored session continues exactly as the original, and a snapshot
killed half-written leaves the previous one loadable."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_session import CFG, POOL, Workload, params  # noqa: F401  (fixture)

from tokendance_jax import persist
from tokendance_jax.rounds import ReusePolicy
from tokendance_jax.session import METHODS, RoundSession

POLICY = ReusePolicy(select="block", recompute=0.3)


def _session(params, method):
  return RoundSession(params, CFG, method=method, policy=POLICY, cache_cfg=POOL, quality=False)


@pytest.mark.parametrize("method", METHODS)
def test_restored_session_continues_with_same_outputs(params, method, tmp_path):  # noqa: F811
  wl, prev = Workload(seed=3), None
  a = _session(params, method)
  for r in range(2):
    prev = a.run_round(wl.round(r, prev)).outputs
  arrays, meta = persist.capture(a)
  store = persist.SnapshotStore(tmp_path)
  step = store.save({"s": arrays}, {"s": meta})
  got_step, got_arrays, got_meta = persist.SnapshotStore(tmp_path).load()
  assert got_step == step
  b = _session(params, method)
  persist.restore(b, got_arrays.get("s"), got_meta["s"])
  assert b.allocator.state_dict() == a.allocator.state_dict()
  live = np.asarray(meta["allocator"]["live"], np.int32)
  np.testing.assert_array_equal(np.asarray(b.engine.cache.k[:, :, live]),
                                np.asarray(a.engine.cache.k[:, :, live]))
  rnd = wl.round(2, prev)
  want = a.run_round(rnd)
  got = b.run_round(rnd)
  assert got.outputs == want.outputs
  assert got.round == want.round == 2
  assert got.pages_in_use == want.pages_in_use
  a.close()
  b.close()
  assert a.allocator.num_used == b.allocator.num_used == 0
  store.close()


def test_restore_refuses_mismatch_and_corruption(params, tmp_path):  # noqa: F811
  a = _session(params, "tokendance")
  a.run_round(Workload().round(0, None))
  arrays, meta = persist.capture(a)
  with pytest.raises(ValueError, match="method"):
    persist.restore(_session(params, "prefix"), arrays, meta)
  other = RoundSession(params, CFG, method="tokendance", policy=ReusePolicy(recompute=0.5),
                       cache_cfg=POOL, quality=False)
  with pytest.raises(ValueError, match="policy"):
    persist.restore(other, arrays, meta)
  assert arrays is not None
  bad = {"k": arrays["k"] + 1, "v": arrays["v"]}
  with pytest.raises(ValueError, match="checksum"):
    persist.restore(_session(params, "tokendance"), bad, meta)
  with pytest.raises(ValueError, match="fresh session"):
    persist.restore(a, arrays, meta)
  with pytest.raises(ValueError, match="format"):
    persist.restore(_session(params, "tokendance"), arrays, {**meta, "format": 99})
  fresh = _session(params, "tokendance")
  persist.restore(fresh, arrays, meta)  # the refusals above left nothing behind
  assert fresh.allocator.num_used == a.allocator.num_used


_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    import orbax.checkpoint as ocp
    from tokendance_jax import persist
    store = persist.SnapshotStore(sys.argv[1], keep=3)
    for n in (1, 2):
      # ~16 MB per step, every value equal to the step number: a torn step would show.
      arrays = {"s": {"k": np.full((4, 1 << 20), n, np.float32), "v": np.full(8, n, np.float32)}}
      print(store.save(arrays, {"step": n}), flush=True)
    # Step 3 stalls between writing its arrays and its JSON, where the parent kills it.
    write_json = ocp.JsonCheckpointHandler._save_fn
    def stall(self, *args, **kwargs):
      print("writing", flush=True)
      time.sleep(60)
      return write_json(self, *args, **kwargs)
    ocp.JsonCheckpointHandler._save_fn = stall
    store.save({"s": {"k": np.full((4, 1 << 20), 3, np.float32)}}, {"step": 3})
""")


def test_kill_9_during_snapshot_leaves_previous_loadable(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    lines = [proc.stdout.readline().strip() for _ in range(3)]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert lines == ["1", "2", "writing"], lines
  # The half-written step is on disk, but not as a committed step.
  assert any("tmp" in p.name for p in tmp_path.iterdir()), list(tmp_path.iterdir())
  loaded = persist.SnapshotStore(tmp_path, keep=3).load()
  assert loaded is not None
  step, arrays, meta = loaded
  assert step == 2 and meta == {"step": 2}
  assert np.all(np.asarray(arrays["s"]["k"]) == 2)
  assert np.all(np.asarray(arrays["s"]["v"]) == 2)
  # The store keeps working after the crash: the next step lands and loads.
  store = persist.SnapshotStore(tmp_path, keep=3)
  nxt = store.save({"s": {"k": np.ones(3, np.float32)}}, {"step": "after"})
  assert nxt == 3
  assert store.load()[2] == {"step": "after"}
