"""Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, and how the
worker's failures map onto HTTP: 400 for a bad request the engine refused, 500 for a failed
step, 503 with `Retry-After` (code `out_of_pages`) when a KV page pool ran out.

FastAPI-free: the worker raises these too; `ApiError.response` imports Starlette only when an
HTTP answer is made.
"""

from __future__ import annotations


class ApiError(Exception):
  """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type
    self.param, self.code, self.headers = param, code, headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}

  def response(self):
    """The error as a `JSONResponse` with its status and headers."""
    from starlette.responses import JSONResponse

    return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


def retry_after(seconds: int) -> dict[str, str]:
  """The headers of an answer that asks the client to come back in `seconds`."""
  return {"Retry-After": str(seconds)}


def out_of_pages(message: str, retry_after_s: int | None = None) -> ApiError:
  """503 `out_of_pages`: a page pool ran short; with `Retry-After` when retrying may help."""
  headers = retry_after(retry_after_s) if retry_after_s is not None else None
  return ApiError(503, message, type="server_error", code="out_of_pages", headers=headers)


def completion_error(status: int, message: str, retry_after_s: int) -> ApiError:
  """The answer to a completion the worker finished with an error of `status` (400, 500 or
  503 when the engine ran out of pages: then with `Retry-After`)."""
  if status == 503:
    return out_of_pages(message, retry_after_s)
  return ApiError(status, message,
                  type="invalid_request_error" if status < 500 else "server_error")


def stream_error(message: str, status: int) -> dict:
  """The error event that ends a stream (its status line was sent already)."""
  return {"error": {"message": message, "type": "server_error", "param": None,
                    "code": "out_of_pages" if status == 503 else None}}
