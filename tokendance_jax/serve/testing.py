"""`BackgroundServer`: a live uvicorn server for an app on a thread, for tests, benchmarks and
notebooks (`with BackgroundServer(create_app(engine, tok)) as s: httpx.get(s.url + ...)`)."""

from __future__ import annotations

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
