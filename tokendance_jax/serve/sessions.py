"""`RoundsSession`: one session of the rounds API (agents, their last outputs, a
`RoundSession`), and how its agents' prompts are laid out as segments.

FastAPI-free; every method runs on the worker thread. User text (system prompt, personas,
messages) is encoded as text with `encode_parts` and only the ChatML markup as control
tokens, so a session's text cannot forge a turn. (`roundrun.PromptBuilder` builds prompts
from a `Workload` with `tokenizer.encode`, which turns special-token strings into control
ids: fine for trusted workload text, not for what clients send.)
"""

from __future__ import annotations

import time

from tokendance_jax.roundrun import SYSTEM_CLOSE, SYSTEM_OPEN, TURN_CLOSE
from tokendance_jax.rounds import AgentPrompt, ReusePolicy, Round, Segment
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.serve.errors import ApiError
from tokendance_jax.serve.schemas import SessionRequest


class RoundsSession:
  """Agents, their last outputs and a `RoundSession`; every method runs on the worker thread.

  Agent a's prompt in a round: [system turn (shared)] [persona (private)]
  [for each other agent b that spoke last round: header "Agent b said:" (shared),
  b's output token ids (shared; its master made by the session's `masters` policy)]
  [instruction + assistant turn (private)].
  """

  def __init__(self, session_id: str, body: SessionRequest, params, cfg, tok, cache_cfg,
               attn):
    from tokendance_jax.session import RoundSession

    policy = ReusePolicy(select=body.select, recompute=body.recompute,
                         check_layer=body.check_layer, tau=body.tau, masters=body.masters)
    sampling = SamplingParams(max_tokens=1, temperature=body.temperature, seed=body.seed)
    self.id, self.tok, self.cfg, self.body = session_id, tok, cfg, body
    self.method, self.policy = body.method, policy
    self.personas = dict(body.agents)
    self.max_tokens = body.max_tokens
    self.rs = RoundSession(params, cfg, method=body.method, policy=policy, cache_cfg=cache_cfg,
                           attn=attn, sampling=sampling, quality=False)
    system = [(SYSTEM_OPEN, True), (body.system, False), (SYSTEM_CLOSE, True)]
    self.system = Segment(tuple(tok.encode_parts(system)), shared=True, name="system")
    self.last_outputs: dict[str, list[int]] = {}
    self.last_stats: dict | None = None
    self.rounds = 0
    self.closed = False
    self.created = int(time.time())

  def build_round(self, agents: list[str], messages: dict[str, str], max_tokens: int) -> Round:
    prompts = []
    for a in agents:
      segs = [self.system, self._private(f"You are agent {a}. {self.personas[a]}")]
      for b, ids in self.last_outputs.items():
        if b != a and ids:
          header = self.tok.encode_parts([(f"\n\nAgent {b} said:\n", False)])
          segs.append(Segment(tuple(header), shared=True, name=f"header:{b}"))
          segs.append(Segment(tuple(ids), shared=True, name=f"out:{b}"))
      msg = messages.get(a, "")
      segs.append(self._private("\n\n" + msg if msg else "", TURN_CLOSE))
      prompts.append(AgentPrompt(a, segs, max_tokens=max_tokens))
    return Round(prompts)

  def _private(self, text: str, template: str = "") -> Segment:
    """A private segment: user `text` encoded as text, then the `template` markup."""
    return Segment(tuple(self.tok.encode_parts([(text, False), (template, True)])), shared=False)

  def run(self, agents: list[str], messages: dict[str, str], max_tokens: int) -> dict:
    if self.closed:
      raise ApiError(404, f"session {self.id!r} was deleted", code="session_not_found")
    res = self.rs.run_round(self.build_round(agents, messages, max_tokens))
    self.last_outputs = {a: list(ids) for a, ids in res.outputs.items()}
    self.rounds += 1
    self.last_stats = {
        "prefill_seconds": res.prefill_seconds, "round_seconds": res.round_seconds,
        "kv_bytes_per_agent": res.kv_bytes_per_agent,
        "shared_kv_bytes_per_agent": res.shared_kv_bytes_per_agent,
        "pages_in_use": res.pages_in_use,
        "computed_fraction": res.stats.get("computed_fraction"),
        "pages_copied": res.stats.get("pages_copied"),
    }
    return {"session": self.id, "round": res.round,
            "outputs": {a: self.tok.decode(ids) for a, ids in res.outputs.items()},
            "output_tokens": {a: len(ids) for a, ids in res.outputs.items()},
            "stats": self.last_stats}

  def describe(self) -> dict:
    page_bytes = self.rs.page_bytes
    agents = {}
    for a in self.personas:
      ids = self.last_outputs.get(a, [])
      key = Segment(tuple(ids), shared=True).key if ids else None
      pages = len(self.rs.masters.get(key).pages) if key in self.rs.masters else 0
      agents[a] = {"persona": self.personas[a], "last_output_tokens": len(ids),
                   "kv_pages": pages, "kv_bytes": pages * page_bytes}
    alloc = self.rs.allocator
    return {"id": self.id, "object": "session", "created": self.created, "method": self.method,
            "select": self.policy.select, "recompute": self.policy.recompute,
            "rounds": self.rounds, "agents": agents, "pages_in_use": alloc.num_used,
            "pages_total": alloc.num_pages - 1, "master_pages": self.rs.masters.num_pages,
            "bytes_per_page": page_bytes, "last_round": self.last_stats}

  def close(self) -> None:
    self.closed = True
    self.rs.close()
    self.last_outputs = {}

  def to_meta(self) -> dict:
    """JSON-ready history (the KV state is `persist.capture(self.rs)`)."""
    return {"id": self.id, "body": self.body.model_dump(), "last_outputs": self.last_outputs,
            "rounds": self.rounds, "created": self.created, "last_stats": self.last_stats}

  @classmethod
  def from_meta(cls, meta: dict, engine, tok, cache_cfg) -> RoundsSession:
    body = SessionRequest.model_validate(meta["body"])
    sess = cls(meta["id"], body, engine.params, engine.cfg, tok, cache_cfg, engine.attn)
    sess.last_outputs = {a: list(ids) for a, ids in meta["last_outputs"].items()}
    sess.rounds, sess.created, sess.last_stats = meta["rounds"], meta["created"], meta["last_stats"]
    return sess
