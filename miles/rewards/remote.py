"""``remote_rm``: score a sample with a reward model served over HTTP (``--rm-url``).

Request: ``POST rm_url`` with the JSON object
``{"prompt": ..., "response": ..., "label": ..., "metadata": {...}}`` (slime sends the first
three). Reply: a JSON number, or an object ``{"reward": number}``.

Failures:

- connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff
  (``backoff_s * 2**attempt``, capped at ``max_backoff_s``) up to ``max_retries`` retries,
  then :class:`RemoteRewardError` says how many attempts failed and the last error;
- HTTP 4xx (other than 429) fails at once with the status and the start of the body: the
  request itself is wrong and repeating it cannot help;
- a reply that is not a number or ``{"reward": number}`` fails at once, quoting it.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import httpx

from miles.types import Sample

__all__ = ["RemoteRewardError", "RemoteRewardModel", "remote_rm"]

_RETRY_STATUS = 429  # "too many requests" is transient like a 5xx


class RemoteRewardError(RuntimeError):
    """The remote reward model could not score a sample."""


@dataclass
class RemoteRewardModel:
    """Client of one remote reward model. Pass ``client`` to share connections between calls;
    without it each :meth:`score` opens (and closes) its own ``httpx.AsyncClient``."""

    url: str
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 16.0
    timeout_s: float = 120.0
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
                reply = await client.post(self.url, json=payload, timeout=self.timeout_s)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code >= 500 or reply.status_code == _RETRY_STATUS:
                last_error = f"HTTP {reply.status_code}: {reply.text[:200]}"
                continue
            if reply.status_code >= 400:
                raise RemoteRewardError(
                    f"reward model {self.url} rejected the request: HTTP {reply.status_code}: {reply.text[:500]}"
                )
            return self._parse(reply)
        raise RemoteRewardError(
            f"reward model {self.url} failed {self.max_retries + 1} attempts; last error: {last_error}"
        )

    def _parse(self, reply: httpx.Response) -> float:
        try:
            body = reply.json()
        except json.JSONDecodeError:
            raise RemoteRewardError(
                f"reward model {self.url} replied with non-JSON {reply.text[:200]!r}; "
                'expected a number or {"reward": number}'
            ) from None
        value = body.get("reward") if isinstance(body, dict) else body
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RemoteRewardError(
                f'reward model {self.url} replied {json.dumps(body)[:200]}; expected a number or {{"reward": number}}'
            )
        return float(value)


async def remote_rm(args: Any, sample: Sample) -> float:
    """The built-in ``remote_rm`` hook: POST the sample to ``args.rm_url``."""
    url = getattr(args, "rm_url", None)
    if not url:
        raise RemoteRewardError("rm_type remote_rm needs --rm-url")
    model = RemoteRewardModel(url)
    return await model.score(sample.prompt, sample.response, sample.label, sample.metadata)
