"""``remote_rm``: score a sample with a reward model served over HTTP (``--rm-url``).

Request: ``POST rm_url`` with the JSON object
``{"prompt": ..., "response": ..., "label": ..., "metadata": {...}}`` (slime sends the first
three). Reply: a JSON number, or an object ``{"reward": number}``.

Each request may take ``--rm-timeout`` seconds in all (connecting, sending, waiting for and
reading the reply); the whole reward call, retries included, is bounded by ``--reward-timeout``
(:mod:`miles.rewards.scoring`). The server is not trusted: a reply body over
:data:`MAX_REPLY_BYTES` is refused while it is being read, as is a compressed one (Miles asks
for ``identity``), so a hostile or broken server cannot make Miles read unbounded data.

Failures:

- connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff
  (``backoff_s * 2**attempt``, capped at ``max_backoff_s``) up to ``--rm-max-retries`` retries,
  then :class:`RemoteRewardError` says how many attempts failed and the last error;
- HTTP 4xx (other than 429) fails at once with the status and the start of the body: the
  request itself is wrong and repeating it cannot help;
- a reply that is not a number or ``{"reward": number}``, is too large or is compressed fails
  at once, quoting (the start of) it.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import httpx

from miles.types import Sample

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "MAX_REPLY_BYTES",
    "RemoteRewardError",
    "RemoteRewardModel",
    "remote_rm",
]

# The defaults of --rm-timeout and --rm-max-retries (RolloutConfig), for hooks called without them.
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 3
# A reply is one number; anything this large is a broken or hostile server.
MAX_REPLY_BYTES = 4 * 1024 * 1024
_QUOTE = 200  # bytes of a bad reply quoted in errors
_RETRY_STATUS = 429  # "too many requests" is transient like a 5xx


class RemoteRewardError(RuntimeError):
    """The remote reward model could not score a sample."""


class _Transient(Exception):
    """A failed attempt worth retrying; the message is the error reported after the last one."""


@dataclass
class RemoteRewardModel:
    """Client of one remote reward model. Pass ``client`` to share connections between calls;
    without it each :meth:`score` opens (and closes) its own ``httpx.AsyncClient``.

    ``timeout_s`` bounds one request (connecting, sending and reading the reply, in all);
    ``max_retries`` failed requests are retried."""

    url: str
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = 0.5
    max_backoff_s: float = 16.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_reply_bytes: int = MAX_REPLY_BYTES
    client: httpx.AsyncClient | None = None

    async def score(self, prompt: Any, response: str, label: Any, metadata: dict[str, Any]) -> float:
        payload = {"prompt": prompt, "response": response, "label": label, "metadata": metadata}
        if self.client is not None:
            return await self._post_with_retries(self.client, payload)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            return await self._post_with_retries(client, payload)

    async def _post_with_retries(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> float:
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                # httpx's timeout bounds each read, not the whole reply: a server trickling one
                # byte at a time would never trip it, so the request as a whole is bounded too.
                status, body = await asyncio.wait_for(self._post(client, payload), self.timeout_s)
            except _Transient as e:
                last_error = str(e)
                continue
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            except TimeoutError:
                last_error = f"no complete reply within {self.timeout_s:g} s (--rm-timeout)"
                continue
            if status >= 400:
                raise RemoteRewardError(
                    f"reward model {self.url} rejected the request: HTTP {status}: {_quote(body, 500)}"
                )
            return self._parse(body)
        raise RemoteRewardError(
            f"reward model {self.url} failed {self.max_retries + 1} attempts; last error: {last_error}"
        )

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> tuple[int, bytes]:
        """One request: the status and the body (at most ``max_reply_bytes``, read as it streams)."""
        headers = {"Accept-Encoding": "identity"}
        async with client.stream(
            "POST", self.url, json=payload, headers=headers, timeout=self.timeout_s
        ) as r:
            if r.status_code >= 500 or r.status_code == _RETRY_STATUS:
                raise _Transient(f"HTTP {r.status_code}: {_quote(await _read_start(r, _QUOTE))}")
            if r.status_code >= 400:
                return r.status_code, await _read_start(r, 500)
            encoding = r.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RemoteRewardError(
                    f"reward model {self.url} replied with Content-Encoding {encoding!r}; "
                    "Miles asks for an uncompressed reply (Accept-Encoding: identity)"
                )
            declared = r.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_reply_bytes:
                raise self._too_large(f"declares {int(declared)} bytes")
            body = bytearray()
            async for chunk in r.aiter_raw():
                body += chunk
                if len(body) > self.max_reply_bytes:
                    raise self._too_large(f"sent more than {self.max_reply_bytes} bytes")
            return r.status_code, bytes(body)

    def _too_large(self, what: str) -> RemoteRewardError:
        return RemoteRewardError(
            f"reward model {self.url} reply {what}; the limit is {self.max_reply_bytes} bytes "
            '(a reply is a number or {"reward": number})'
        )

    def _parse(self, body: bytes) -> float:
        try:
            value_or_obj = json.loads(body)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
            raise RemoteRewardError(
                f"reward model {self.url} replied with non-JSON {_quote(body)!r}; "
                'expected a number or {"reward": number}'
            ) from None
        value = value_or_obj.get("reward") if isinstance(value_or_obj, dict) else value_or_obj
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RemoteRewardError(
                f'reward model {self.url} replied {_quote(body)}; expected a number or {{"reward": number}}'
            )
        return float(value)


async def _read_start(reply: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of an error reply: enough to quote, and never the whole of a huge one."""
    body = bytearray()
    async for chunk in reply.aiter_raw():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _quote(body: bytes, limit: int = _QUOTE) -> str:
    return body[:limit].decode("utf-8", errors="replace")


async def remote_rm(args: Any, sample: Sample) -> float:
    """The built-in ``remote_rm`` hook: POST the sample to ``args.rm_url``, each request bounded by
    ``args.rm_timeout`` and retried ``args.rm_max_retries`` times (the flags' defaults where
    ``args`` lacks them)."""
    url = getattr(args, "rm_url", None)
    if not url:
        raise RemoteRewardError("rm_type remote_rm needs --rm-url")
    model = RemoteRewardModel(
        url,
        max_retries=int(getattr(args, "rm_max_retries", DEFAULT_MAX_RETRIES)),
        timeout_s=float(getattr(args, "rm_timeout", DEFAULT_TIMEOUT_S)),
    )
    return await model.score(sample.prompt, sample.response, sample.label, sample.metadata)
