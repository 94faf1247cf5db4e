"""What a request costs before a route sees it: body limits and the key check.

- Bodies: a multipart upload may be up to LETHE_MAX_UPLOAD_MB (plus form overhead); any
  other body (JSON) up to LETHE_MAX_JSON_MB. A declared Content-Length past the limit is
  refused without reading; a chunked body is counted as it streams and the read fails with
  an HTTPProblem the handlers turn into 413. (A 118 MiB JSON body used to be parsed whole before
  the key was checked: +1.56 GiB of RSS.)
- Keys: a `/v1` request that carries a body is authenticated before any of it is read, so
  a client without a valid key costs a header parse (the route's own check still decides
  the scope: it hits the key cache).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import INVALID_KEY, MISSING_KEY, principal_for, unauthorized
from service.api.problems import HTTPProblem, problem_response

# Multipart framing and the small form fields ride on top of the file itself.
FORM_OVERHEAD_BYTES = 1024 * 1024


def _too_large(limit: int, what: str) -> HTTPProblem:
    return HTTPProblem(
        413,
        "payload-too-large",
        f"the request body exceeds {limit} bytes ({what})",
        title="Payload too large",
    )


class RequestGate:
    def __init__(self, app: ASGIApp, *, upload_limit: int, json_limit: int) -> None:
        self.app = app
        self.upload_limit, self.json_limit = upload_limit, json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        has_body = (declared not in (None, b"0")) or b"transfer-encoding" in headers
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.upload_limit if multipart else self.json_limit
        what = "LETHE_MAX_UPLOAD_MB plus form overhead" if multipart else "LETHE_MAX_JSON_MB"
        if has_body and str(scope.get("path", "")).startswith("/v1/"):
            refusal = await self._key_refusal(scope, headers.get(b"authorization"))
            if refusal is not None:
                await self._answer(refusal, scope, receive, send)
                return
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._answer(_too_large(limit, what), scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, what)
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _key_refusal(scope: Scope, header: bytes | None) -> HTTPProblem | None:
        scheme, _, secret = (header or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return unauthorized(MISSING_KEY)
        try:
            principal = await principal_for(scope["app"].state.lethe, secret.strip())
        except Exception:  # the database: the route's own check answers (503)
            return None
        return None if principal is not None else unauthorized(INVALID_KEY)

    @staticmethod
    async def _answer(problem: HTTPProblem, scope: Scope, receive: Receive, send: Send) -> None:
        # The client may still be sending: answer, and let the server close the connection.
        await problem_response(problem.to_dict(), problem.headers)(scope, receive, send)


__all__ = ["FORM_OVERHEAD_BYTES", "RequestGate"]
