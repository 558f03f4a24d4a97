"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream: true` as server-sent events ending in
`data: [DONE]`), with usage counts and `temperature`, `top_p`, `max_tokens`, `stop`, `seed`.

Chat messages are encoded with the tokenizer's template markers as control tokens and
message text as plain text, so a message cannot forge a turn. With reuse "tokendance"
every chat goes to the worker's collective step (`implicit.Request`): its shared spans are
found by content-defined chunks, or taken as marked where its messages mark spans with
<|td:shared|> / <|td:private|>. A request opts out with `"tokendance": {"reuse": false}`
in its body (the `openai` client's `extra_body`). `usage.prompt_tokens_details
.cached_tokens` counts the prompt tokens that were not computed.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tokendance_jax import implicit
from tokendance_jax.rounds import PRIVATE_MARK, SHARED_MARK, Segment
from tokendance_jax.serve.completion import Completion
from tokendance_jax.serve.errors import bad_request, completion_error, stream_error
from tokendance_jax.serve.schemas import (
  ChatRequest,
  CompletionRequest,
  GenerationRequest,
  check_model,
  check_sampling,
  parse_body,
)
from tokendance_jax.serve.worker import Worker
from tokendance_jax.tokenizer import CHAT_ROLES


def add_openai_routes(router: APIRouter, worker: Worker) -> None:
  """The /v1/models, /v1/completions and /v1/chat/completions routes on `router`."""
  cfg = worker.config

  @router.get("/v1/models")
  async def models():
    return {"object": "list", "data": [_model_card(cfg.model_name)]}

  @router.get("/v1/models/{model_id}")
  async def model(model_id: str):
    check_model(model_id, cfg)
    return _model_card(cfg.model_name)

  @router.post("/v1/completions")
  async def completions(request: Request):
    body = parse_body(CompletionRequest, await request.body(), cfg.max_body_bytes)
    prompt = _completion_prompt(body, worker)
    return await _generate(worker, body, prompt, chat=False, default_max=16)

  @router.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = parse_body(ChatRequest, await request.body(), cfg.max_body_bytes)
    if body.max_completion_tokens is not None and body.max_tokens is None:
      body.max_tokens = body.max_completion_tokens
    reuse = worker.implicit is not None and (body.tokendance is None or body.tokendance.reuse)
    segments = _chat_segments(body, worker) if reuse else None
    prompt = ([t for s in segments for t in s.tokens] if segments is not None
              else _chat_prompt(body, worker))
    job = None
    if reuse:
      job = implicit.Request(prompt, None, cuts=implicit.message_cuts(prompt, worker.openers),
                             segments=segments)
    return await _generate(worker, body, prompt, chat=True, default_max=cfg.default_max_tokens,
                           job=job)


def _model_card(name: str) -> dict:
  return {"id": name, "object": "model", "created": 0, "owned_by": "tokendance_jax"}


def _completion_prompt(body: CompletionRequest, worker: Worker) -> list[int]:
  """The prompt's ids. A text prompt is raw text: special-token strings in it (e.g. a
  hand-written "<|im_start|>user") become control ids, as completions clients expect."""
  p = body.prompt
  if isinstance(p, list) and p and isinstance(p[0], str):
    if len(p) != 1:
      raise bad_request("only one prompt per request is supported", param="prompt")
    p = p[0]
  ids = worker.tok.encode(p) if isinstance(p, str) else list(p)
  vocab = worker.engine.cfg.vocab_size
  if any(not 0 <= t < vocab for t in ids):
    raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
  return ids


def _chat_messages(body: ChatRequest, strip_marks: bool) -> list[dict]:
  """The messages as {role, content} dicts (text parts only), marks stripped or kept."""
  if not body.messages:
    raise bad_request("messages is empty; send at least one message", param="messages")
  msgs = []
  for i, m in enumerate(body.messages):
    if m.role not in CHAT_ROLES:
      raise bad_request(f"messages[{i}].role {m.role!r} is not supported; use one of "
                        f"{', '.join(CHAT_ROLES)}", param=f"messages.{i}.role",
                        code="invalid_value")
    content = m.content if isinstance(m.content, str) else "".join(
        part.text for part in m.content if part.type == "text")
    if strip_marks:
      content = content.replace(SHARED_MARK, "").replace(PRIVATE_MARK, "")
    msgs.append({"role": m.role, "content": content})
  return msgs


def _chat_prompt(body: ChatRequest, worker: Worker) -> list[int]:
  """The chat's ids: template markers as control ids, message text as text."""
  try:
    return worker.tok.encode_parts(worker.tok.chat_parts(_chat_messages(body, True)))
  except ValueError as e:
    raise bad_request(str(e), param="messages") from None


def _chat_segments(body: ChatRequest, worker: Worker) -> list[Segment] | None:
  """Segments of a chat whose messages mark shared text (None when nothing is marked).

  Marks apply across the templated conversation: text after <|td:shared|> is
  shared up to the next mark; the template's own text and everything before
  the first mark are private, and the end of each message closes a shared span.
  """
  msgs = _chat_messages(body, False)
  if not any(SHARED_MARK in m["content"] for m in msgs):
    return None
  for m in msgs:  # a shared span never runs into the template text after its message
    m["content"] = m["content"] + (PRIVATE_MARK if SHARED_MARK in m["content"] else "")
  try:
    return _marked_segments(worker.tok.chat_parts(msgs), worker.tok.encode_parts)
  except ValueError as e:
    raise bad_request(str(e), param="messages") from None


def _marked_segments(parts: list[tuple[str, bool]], encode_parts) -> list[Segment]:
  """Split (text, is_template) chat parts at the marks in their user text into segments.

  Like `rounds.parse_text` on the joined text, but each segment's ids come from
  `encode_parts`, so only template parts can produce control tokens. Marks in
  template text are not marks.
  """
  marks = {SHARED_MARK: True, PRIVATE_MARK: False}
  split = re.compile("(" + "|".join(map(re.escape, marks)) + ")")
  segments, run, shared = [], [], False
  pieces = [(p, template) for text, template in parts
            for p in ([text] if template else split.split(text))]
  for piece, template in [*pieces, (PRIVATE_MARK, False)]:  # the last mark flushes the run
    if not template and piece in marks:
      if run:
        segments.append(Segment(tuple(encode_parts(run)), shared=shared))
      run, shared = [], marks[piece]
    elif piece:
      run.append((piece, template))
  if not segments:
    raise ValueError("text holds no segment")
  return segments


async def _generate(worker: Worker, body: GenerationRequest, prompt: list[int], *, chat: bool,
                    default_max: int, job: implicit.Request | None = None):
  params, stop = check_sampling(body, len(prompt), worker, default_max)
  endpoint = "chat" if chat else "completions"
  if job is not None:
    job.params = params
  c = worker.submit(prompt, params, stop, job)
  worker.metrics.prompt_tokens += len(prompt)
  meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
          "created": int(time.time()), "model": worker.config.model_name}
  if body.stream:
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(worker, c, meta, chat, usage, endpoint),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
  try:
    text, info = await _collect(c)
  finally:
    worker.cancel(c)
  if info["error"]:
    worker.metrics.requests[(endpoint, "error")] += 1
    raise completion_error(info["status"], info["error"], worker.config.retry_after_s)
  worker.metrics.requests[(endpoint, "ok")] += 1
  return _full_response(meta, chat, text, info)


async def _collect(c: Completion) -> tuple[str, dict]:
  parts = []
  while True:
    kind, value = await c.events.get()
    if kind == "delta":
      parts.append(value)
    else:
      return "".join(parts), value


def _usage(info: dict) -> dict:
  p, n = info["prompt_tokens"], info["completion_tokens"]
  return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
          "prompt_tokens_details": {"cached_tokens": info.get("cached_tokens", 0)}}


def _full_response(meta: dict, chat: bool, text: str, info: dict) -> dict:
  reason = "length" if info["finish_reason"] == "length" else "stop"
  if chat:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": reason}
    obj = "chat.completion"
  else:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  out = {**meta, "object": obj, "choices": [choice], "usage": _usage(info)}
  if info.get("tokendance") is not None:  # a collective step's own account of the request
    out["tokendance"] = info["tokendance"]
  return out


def _chunk(meta: dict, chat: bool, text: str | None, reason: str | None, role: bool = False):
  if chat:
    delta = {} if text is None else {"content": text}
    if role:
      delta = {"role": "assistant", "content": ""}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  return {**meta, "object": obj, "choices": [choice]}


def _sse(payload) -> str:
  return f"data: {json.dumps(payload)}\n\n"


async def _stream(worker: Worker, c: Completion, meta: dict, chat: bool, usage: bool,
                  endpoint: str):
  try:
    if chat:
      yield _sse(_chunk(meta, chat, None, None, role=True))
    while True:
      kind, value = await c.events.get()
      if kind == "delta":
        yield _sse(_chunk(meta, chat, value, None))
        continue
      if value["error"]:
        worker.metrics.requests[(endpoint, "error")] += 1
        yield _sse(stream_error(value["error"], value["status"]))
      else:
        worker.metrics.requests[(endpoint, "ok")] += 1
        reason = "length" if value["finish_reason"] == "length" else "stop"
        yield _sse(_chunk(meta, chat, None, reason))
        if usage:
          yield _sse({**meta, "object": _chunk(meta, chat, None, None)["object"], "choices": [],
                      "usage": _usage(value)})
      yield "data: [DONE]\n\n"
      return
  finally:
    worker.cancel(c)
