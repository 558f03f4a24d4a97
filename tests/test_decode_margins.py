"""benchmarks/decode_margins.py: the tokens a flip at the first near-tie step would cost."""

import importlib.util
import pathlib

import pytest


@pytest.fixture(scope="module")
def dm():
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "decode_margins.py"
  spec = importlib.util.spec_from_file_location("decode_margins", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_at_risk_counts_from_the_first_step_below_the_threshold(dm):
  margins = [[0.5, 0.01, 0.5, 0.001], [0.3, 0.3], [0.04, 0.5, 0.5]]
  assert dm.at_risk(margins, 0.02) == (1, 3, 9)  # answer 0 from its step 1 on
  assert dm.at_risk(margins, 0.05) == (2, 6, 9)  # and all of answer 2
  assert dm.at_risk(margins, 0.001) == (0, 0, 9)  # strictly below
  rows = dm.summarize({"s": margins})["s"]
  assert [r["threshold"] for r in rows] == list(dm.THRESHOLDS)
  assert rows[1]["share"] == pytest.approx(3 / 9)
