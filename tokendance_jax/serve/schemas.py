"""Request bodies (strict pydantic models), their parsing, and the checks a request passes
before it reaches the worker: the model name, the sampling fields against the engine's
context and page pool, a new session's agents."""

from __future__ import annotations

import json
import secrets

import pydantic

from tokendance_jax.paging import pages_needed
from tokendance_jax.sampling import SamplingParams
from tokendance_jax.serve.config import ServerConfig
from tokendance_jax.serve.errors import ApiError, bad_request

MAX_STOP_STRINGS = 4


class _Body(pydantic.BaseModel):
  """Strict types (no "5" -> 5 coercion); unknown fields are ignored, like OpenAI's."""

  model_config = pydantic.ConfigDict(strict=True, extra="ignore")


class _StreamOptions(_Body):
  include_usage: bool = False


class GenerationRequest(_Body):
  """The fields /v1/completions and /v1/chat/completions share."""

  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: _StreamOptions | None = None
  n: int = 1


class CompletionRequest(GenerationRequest):
  prompt: str | list[int] | list[str]


class _TextPart(_Body):
  type: str
  text: str = ""


class ChatMessage(_Body):
  role: str
  content: str | list[_TextPart]


class TokendanceOptions(_Body):
  """The request's own reuse switch (the body's "tokendance" field); unknown keys are
  refused, so a misspelt option is not silently ignored."""

  model_config = pydantic.ConfigDict(strict=True, extra="forbid")
  reuse: bool = True


class ChatRequest(GenerationRequest):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None
  tokendance: TokendanceOptions | None = None


class SessionRequest(_Body):
  system: str = ""
  agents: dict[str, str]
  method: str = "tokendance"
  select: str = "block"
  recompute: float = 0.05
  check_layer: int = 1
  tau: float | None = None
  masters: str = "context"
  temperature: float = 0.0
  seed: int = 0
  max_tokens: int = 64


class RoundRequest(_Body):
  agents: list[str] | None = None
  max_tokens: int | None = None
  message: str | None = None  # the same instruction for every agent
  messages: dict[str, str] | None = None  # per-agent instructions (override `message`)


def parse_body(model_cls, raw: bytes, limit: int):
  """JSON bytes -> a validated body, or ApiError(400/413)."""
  if len(raw) > limit:
    raise ApiError(413, f"request body of {len(raw)} bytes exceeds {limit}", code="too_large")
  try:
    data = json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
  try:
    return model_cls.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    raise bad_request(f"invalid field {param or 'body'}: {err['msg']}", param=param,
                      code="invalid_type") from None


def check_model(name: str, cfg: ServerConfig) -> None:
  if name != cfg.model_name:
    raise ApiError(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}",
                   param="model", code="model_not_found")


def check_sampling(body: GenerationRequest, n_prompt: int, worker, default_max: int):
  """Validate the sampling fields against `worker`'s engine (its context and KV pool) and
  config; returns (SamplingParams, stop strings)."""
  check_model(body.model, worker.config)
  if body.n != 1:
    raise bad_request("only n=1 is supported", param="n")
  if n_prompt == 0:
    raise bad_request("prompt is empty", param="prompt")
  ctx = worker.engine.cfg.max_seq_len
  room = ctx - n_prompt
  if room < 1:
    raise bad_request(f"prompt has {n_prompt} tokens; the model context is {ctx}",
                      param="messages", code="context_length_exceeded")
  max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, room)
  if max_tokens < 1:
    raise bad_request(f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
  if max_tokens > room:
    raise bad_request(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the "
                      f"model context {ctx}", param="max_tokens",
                      code="context_length_exceeded")
  cc = worker.engine.cache_cfg
  if pages_needed(n_prompt + max_tokens, cc.page_size) > cc.num_pages - 1:
    raise bad_request(f"prompt + max_tokens needs more than the {cc.num_pages - 1} pages of "
                      "the KV pool", param="max_tokens", code="context_length_exceeded")
  temperature = 1.0 if body.temperature is None else body.temperature
  top_p = 1.0 if body.top_p is None else body.top_p
  if not 0.0 <= temperature <= 2.0:
    raise bad_request(f"temperature={temperature} must be in [0, 2]", param="temperature")
  if not 0.0 <= top_p <= 1.0:
    raise bad_request(f"top_p={top_p} must be in [0, 1]", param="top_p")
  if top_p == 0.0:
    temperature, top_p = 0.0, 1.0  # only the most likely token survives
  seed = body.seed if body.seed is not None else secrets.randbits(32)
  if not 0 <= seed < 2**32:
    raise bad_request(f"seed={seed} must be in [0, 2**32)", param="seed")
  stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
  if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
    raise bad_request(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
  params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                          top_p=float(top_p), seed=seed)
  return params, stop


def check_session_body(body: SessionRequest, cfg: ServerConfig) -> None:
  if not body.agents:
    raise bad_request("agents is empty; give at least one {id: persona}", param="agents")
  if len(body.agents) > cfg.max_agents:
    raise bad_request(f"{len(body.agents)} agents; at most {cfg.max_agents}", param="agents")
  if any(not a.strip() or len(a) > 64 for a in body.agents):
    raise bad_request("agent ids must be non-blank and at most 64 characters", param="agents")
  if body.max_tokens < 1:
    raise bad_request(f"max_tokens={body.max_tokens} must be >= 1", param="max_tokens")
  if not 0.0 <= body.temperature <= 2.0:
    raise bad_request(f"temperature={body.temperature} must be in [0, 2]", param="temperature")
  if not 0 <= body.seed < 2**32:
    raise bad_request(f"seed={body.seed} must be in [0, 2**32)", param="seed")
