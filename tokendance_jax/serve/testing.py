"""`BackgroundServer`: a live uvicorn server for an app on a thread, for tests, benchmarks and
notebooks (`with BackgroundServer(create_app(engine, tok)) as s: httpx.get(s.url + ...)`);
`ByteTokenizer`: a stand-in tokenizer for the TINY random model."""

from __future__ import annotations

import re
import threading
import time


class BackgroundServer:
  """A uvicorn server for `app` on a thread: `with BackgroundServer(app) as s:`."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import socket

    import uvicorn

    if port == 0:
      with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    self.host, self.port = host, port
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                lifespan="on"))
    self._thread = threading.Thread(target=self.server.run, name="td-uvicorn", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def __enter__(self):
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"uvicorn did not start on {self.url}")
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self._thread.join(timeout=30)


class ByteTokenizer:
  """A stand-in tokenizer for TINY: text bytes -> ids 3..255; id -> one printable character.

  Like SmolLM2's, the ChatML markers are control tokens (<|im_start|> 1, <|im_end|> 2): raw
  `encode` matches them anywhere, `encode_parts` only in template parts, never in user text.
  """

  SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}
  special_ids = (1, 2)
  _SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")

  def encode(self, text: str) -> list[int]:
    return self.encode_parts([(text, True)])

  def encode_parts(self, parts) -> list[int]:
    ids = []
    for text, template in parts:
      for j, piece in enumerate(self._SPLIT.split(text) if template else [text]):
        ids += [self.SPECIAL[piece]] if j % 2 else [3 + b % 253 for b in piece.encode("utf-8")]
    return ids

  def decode(self, ids) -> str:
    return "".join(chr(33 + int(i) % 94) for i in ids)

  def chat_parts(self, messages) -> list[tuple[str, bool]]:
    if not messages:
      raise ValueError("messages is empty")
    parts = []
    for m in messages:
      parts += [(f"<|im_start|>{m['role']}\n", True), (m["content"], False), ("<|im_end|>\n", True)]
    return [*parts, ("<|im_start|>assistant\n", True)]

  def apply_chat_template(self, messages) -> str:
    return "".join(text for text, _ in self.chat_parts(messages))
