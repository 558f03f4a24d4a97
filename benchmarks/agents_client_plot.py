"""The client benchmark's plot (`agents_client.py --plot`): four panels per round, every
mode and style."""

from __future__ import annotations

import pathlib


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("computed_tokens", "computed prompt tokens"), ("pages_per_agent", "KV pages / agent"),
            ("round_latency_s", "round latency (s)"), ("token_match", "token match vs none")]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  colors = {"none": "tab:gray", "prefix": "tab:blue", "tokendance": "tab:red"}
  lines = {"messages": "-", "concat": "--"}
  for ax, (key, title) in zip(axes.flat, panels, strict=True):
    for style, by_mode in result["runs"].items():
      for mode, run in by_mode.items():
        pts = [(rd["round"], rd[key]) for rd in run["rounds"] if rd[key] is not None]
        if pts:
          ax.plot(*zip(*pts, strict=True), lines.get(style, ":"), marker="o",
                  color=colors.get(mode), label=f"{mode} / {style}")
    if not ax.lines:
      ax.text(0.5, 0.5, "no data (absent from the server)", ha="center", transform=ax.transAxes)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  c = result["config"]
  fig.suptitle(f"{c['agents']} agents x {c['rounds']} rounds, max_tokens {c['max_tokens']}, "
               f"gather {c['gather_ms']} ms ({c['model']})")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
