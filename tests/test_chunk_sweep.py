"""benchmarks/chunk_sweep.py on the real tokenizer: shared chunks found, pages saved."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.real_model
def test_chunk_sweep_finds_the_repeated_text(tmp_path):
  import chunk_sweep

  out = chunk_sweep.main(["--agents", "4", "--json", str(tmp_path / "c.json"),
                          "--plot", str(tmp_path / "c.png")])
  assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(out))
  assert (tmp_path / "c.png").stat().st_size > 0
  for style, res in out["styles"].items():
    assert 0.5 < res["repeated_fraction"] < 1, style
    for row in res["sizes"]:
      assert 0.5 < row["hit_rate"] <= 1, (style, row)
      assert row["fragmentation"] >= 1, (style, row)  # every chunk starts a page
      # one master copy of each shared chunk: fewer pages per agent than the plain layout
      assert row["pages_per_agent"] < row["plain_pages_per_agent"], (style, row)
