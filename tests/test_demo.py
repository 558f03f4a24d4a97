"""`tokendance demo`: argument checks and the verdict a newcomer reads (no model needed)."""

import pytest

from tokendance_jax import cli, demo

MIB = 2**20


@pytest.mark.parametrize("argv, message", [
    (["demo", "--rounds", "1"], "--rounds 1 must be >= 2"),
    (["demo", "--agents", "1"], "--agents 1 must be >= 2"),
    (["demo", "--eval-agents", "0"], "--eval-agents 0 must be >= 1"),
])
def test_bad_arguments_are_refused_before_the_model_loads(argv, message, capsys, monkeypatch):
  from tokendance_jax import api

  monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err


def _point(kv, shared, prefill, top1, reproduced):
  return dict(kv_bytes_per_agent=kv * MIB, shared_kv_bytes_per_agent=shared * MIB,
              prefill_seconds_net=prefill, compile_seconds=1.0, computed_fraction=0.3,
              forced_top1=top1, outputs_reproduced=reproduced)


def _report(td, prefix):
  args = cli.build_parser().parse_args(["demo"])
  result = dict(points={"prefix": prefix, "tokendance": td}, judged=4)
  return demo.report(result, demo.demo_config(args))


def test_the_report_gives_the_ratios_and_no_note_when_tokendance_wins():
  text = _report(_point(20, 5, 40, 0.995, 1.0), _point(50, 30, 80, 1.0, 1.0))
  assert "2.5x less KV per agent (6.0x in the shared region), prefill 2.00x faster" in text
  assert "Note:" not in text


def test_the_report_says_where_tokendance_loses():
  """Each way of losing is named: more KV, slower prefill, below the bar, changed outputs."""
  text = _report(_point(60, 40, 90, 0.95, 0.5), _point(50, 30, 80, 1.0, 1.0))
  note = text.split("Note:")[1]
  assert "does NOT use less KV" in note and "prefill is NOT faster" in note
  assert "forced top-1 (0.950) is below the 0.99 quality bar" in note
  assert "50% of its outputs differ" in note


def test_the_demo_runs_prefix_then_tokendance_on_the_defaults():
  assert demo.DEMO_METHODS == ("prefix", "tokendance")
  args = cli.build_parser().parse_args(["demo"])
  bc = demo.demo_config(args)
  assert (bc.preset, bc.agents, bc.rounds) == ("agent_society", [16], 2)
  assert (bc.select, bc.recompute, bc.masters) == ("block", 0.10, ["context"])
