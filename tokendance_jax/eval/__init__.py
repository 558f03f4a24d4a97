"""Evaluation: quality metrics and the benchmark experiments, kept out of the serving runtime.

- `quality`: the quality metrics against a dense full recompute (next-token top-1 / KL,
  forced top-1, trace match); the session, the bench and the demo all use these.
- `config`: `BenchConfig`, the experiments' defaults, --quick sizes and targets, flag parsing.
- `runner`: one method's run through the rounds (`run_method`) and its JSON point.
- `experiments`: storage / prefill / sweep / capacity, the ratios, and `run`.
- `plots`: the figure of a result.
- `bench`: the `tokendance bench` subcommand (`add_parser`, `cmd_bench`).

Nothing is imported here: `session` imports `eval.quality`, and the bench modules import the
session lazily.
"""
