"""benchmarks/agents_client.py: its prompt builders and pages-per-agent rule, then the whole
benchmark in-process on the tiny random model (every mode, both styles, 3 agents x 2 rounds).

The end-to-end test needs the server's reuse modes (`ServerConfig.reuse`); it is skipped
until that field exists and runs by itself once it lands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys

import pytest

from tokendance_jax.serve.config import ServerConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_REUSE = "reuse" in {f.name for f in dataclasses.fields(ServerConfig)}


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("agents_client",
                                                REPO / "benchmarks" / "agents_client.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["agents_client"] = mod
  spec.loader.exec_module(mod)
  return mod


def _prompts(bench, style, n=4, previous=None):
  names = [f"Agent{j}" for j in range(n)]
  personas = [f"persona {j}" for j in range(n)]
  return [bench.build_messages(style, i, system="SYSTEM TEXT", personas=personas, names=names,
                               question="What is 6*7?", previous=previous) for i in range(n)]


ANSWERS = [f"answer-{j}-{'xyz' * j}" for j in range(4)]  # none is a substring of another


def _count(msgs, text):
  return sum(m["content"].count(text) for m in msgs)


def test_round_one_holds_the_shared_question_only(bench):
  for style in bench.STYLES:
    prompts = _prompts(bench, style)
    for i, msgs in enumerate(prompts):
      assert [m["role"] for m in msgs] == ["system", "system", "user"]
      assert msgs[0]["content"] == "SYSTEM TEXT" and msgs[1]["content"] == f"persona {i}"
      assert msgs[2]["content"] == "Question: What is 6*7?"


def test_messages_style_one_message_per_other_agent(bench):
  for i, msgs in enumerate(_prompts(bench, "messages", previous=ANSWERS)):
    said = [m["content"] for m in msgs if " said: " in m["content"]]
    others = [j for j in range(4) if j != i]
    assert said == [f"Agent{j} said: {ANSWERS[j]}" for j in others]
    assert all(m["role"] == "user" for m in msgs[2:])
    assert _count(msgs, ANSWERS[i]) == 0  # never its own answer
    assert msgs[:2] == _prompts(bench, "messages")[i][:2]  # shared system, own persona first


def test_concat_style_one_message_holding_every_other_answer_once(bench):
  for i, msgs in enumerate(_prompts(bench, "concat", previous=ANSWERS)):
    assert len(msgs) == 4
    solutions = [m for m in msgs if "One agent solution" in m["content"]]
    assert len(solutions) == 1 and solutions[0] is msgs[-1]
    text = msgs[-1]["content"]
    assert text.count("One agent solution") == 3
    for j in range(4):
      assert _count(msgs, ANSWERS[j]) == (0 if j == i else 1)
      assert text.count(f"```{ANSWERS[j]}```") == (0 if j == i else 1)


def test_unknown_style_is_an_error(bench):
  with pytest.raises(ValueError, match="style"):
    _prompts(bench, "threads", previous=ANSWERS)


def test_pages_per_agent_rule(bench):
  samples = [
      {"kv_pages_active": 10.0, "running": 2.0},
      {"kv_pages_active": 30.0, "running": 4.0},
      {"kv_pages_active": 36.0, "running": 4.0},  # max ratio at the largest running: 9
      {"kv_pages_active": 100.0, "running": 3.0},  # a larger ratio, but fewer running
      {"kv_pages_active": None, "running": 5.0},  # gauge absent: ignored
      {"kv_pages_active": 5.0, "running": 0.0},
      {"error": "ConnectError"},
      {},
  ]
  assert bench.pages_per_agent(samples) == 9.0
  assert bench.pages_per_agent(samples[3:4]) == pytest.approx(100 / 3)
  assert bench.pages_per_agent(samples[4:]) is None
  assert bench.pages_per_agent([]) is None


def test_parse_gauges_reads_present_gauges_and_none_for_absent(bench):
  text = ("# HELP tokendance_running sequences decoding\n# TYPE tokendance_running gauge\n"
          "tokendance_running 3\n# TYPE tokendance_kv_pages_active gauge\n"
          "tokendance_kv_pages_active 42\n# TYPE tokendance_pages_used gauge\n"
          "tokendance_pages_used 7\n")
  assert bench.parse_gauges(text) == {"kv_pages_active": 42.0, "running": 3.0}
  assert bench.parse_gauges("tokendance_running 2\n") == {"kv_pages_active": None,
                                                          "running": 2.0}


def test_token_match_is_position_wise_over_the_reference(bench):
  encode = list  # one "token" per character
  assert bench.token_match(encode, "abcd", "abcd") == (4, 4)
  assert bench.token_match(encode, "abcd", "abxd") == (3, 4)
  assert bench.token_match(encode, "abcd", "ab") == (2, 4)
  assert bench.token_match(encode, "ab", "abcdef") == (2, 2)


def test_targets_hold_value_and_pass(bench):
  assert bench._target(0.3, "<=", 0.40) == {"value": 0.3, "op": "<=", "bound": 0.40,
                                            "pass": True}
  assert bench._target(0.7, "<", 0.60)["pass"] is False
  assert bench._target(None, ">=", 0.95)["pass"] is False


# -- end to end, tiny model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
  if not HAS_REUSE:
    pytest.skip("the server's reuse modes have not landed: ServerConfig has no 'reuse' field "
                "(create_app(..., reuse=MODE, gather_ms=G))")
  out = tmp_path_factory.mktemp("agents_client")
  res = bench.main(["--tiny", "--agents", "3", "--rounds", "2", "--max-tokens", "8",
                    "--styles", "messages,concat", "--modes", "none,prefix,tokendance",
                    "--warmup", "0", "--num-pages", "256", "--page-size", "16",
                    "--request-timeout", "120",  # a stuck server fails the test, never hangs it
                    "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
  return res, out


def test_end_to_end_json_structure(result):
  res, out = result
  saved = json.loads((out / "r.json").read_text())
  assert set(saved) >= {"config", "runs", "summary", "ratios", "targets", "errors"}
  assert saved["failed_servers"] == [] and saved["errors"] == {m: 0 for m in
                                                               ("none", "prefix", "tokendance")}
  for style in ("messages", "concat"):
    assert set(saved["runs"][style]) == {"none", "prefix", "tokendance"}
    for mode, run in saved["runs"][style].items():
      assert run["status"] == "ok" and len(run["rounds"]) == 2, (mode, style)
      for rd in run["rounds"]:
        assert len(rd["requests"]) == 3 and rd["round_latency_s"] > 0
        for key in ("computed_tokens", "prompt_tokens", "cached_tokens", "pages_per_agent",
                    "token_match"):
          assert key in rd
    assert set(saved["targets"][style]) == {
        "tokendance_computed_le_0.40x_prefix", "tokendance_pages_per_agent_le_1/3_prefix",
        "tokendance_token_match_ge_0.95", "tokendance_latency_le_prefix",
        "prefix_computed_lt_0.60x_none"}
    for t in saved["targets"][style].values():
      assert set(t) >= {"value", "pass"} and isinstance(t["pass"], bool)
  assert saved["summary"]["none"]["messages"]["token_match"] == 1.0
  assert res["config"]["agents"] == 3


def test_end_to_end_same_prompts_in_every_mode(result):
  res, _ = result
  for style, by_mode in res["runs"].items():
    ref = by_mode["none"]["rounds"]
    for rd in ref:
      assert rd["token_match"] == 1.0  # "none" against itself
    for mode, run in by_mode.items():
      for r, rd in enumerate(run["rounds"]):
        got = [x["prompt_tokens"] for x in rd["requests"]]
        assert got == [x["prompt_tokens"] for x in ref[r]["requests"]], (mode, style, r)
        for x in rd["requests"]:
          assert 0 <= x["computed_tokens"] <= x["prompt_tokens"]
          assert x["computed_tokens"] == x["prompt_tokens"] - x["cached_tokens"]
    assert ref[1]["prompt_tokens"] > ref[0]["prompt_tokens"]  # round 2 holds other answers


def test_end_to_end_plot_written(result):
  _, out = result
  assert (out / "r.png").stat().st_size > 10_000


def test_server_overrides_are_typed_and_checked(bench):
  args = bench.parse_args(["--server", "chat_recompute=0.6", "--server", "chat_private_tail=32"])
  assert args.server == {"chat_recompute": 0.6, "chat_private_tail": 32}
  for bad in ("chat_recompute=abc", "no_such_field=1", "chat_recompute", "chat_recompute=7"):
    with pytest.raises(SystemExit):
      bench.parse_args(["--server", bad])
