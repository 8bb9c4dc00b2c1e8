"""huggingface_hub's HTTP as pico uses it: a timeout on every request, and retries that stay quiet.

huggingface_hub 2.x sends its requests through one shared httpx client made without a timeout, so a server
that accepts connections and never answers stalls the caller forever; and its retry loop logs two lines per
attempt before the error that ends it. `configure_hf_http()` gives that client connect and read timeouts, from
huggingface_hub's own settings (HF_HUB_ETAG_TIMEOUT to connect, HF_HUB_DOWNLOAD_TIMEOUT for each read, write
and pool wait; 10 s each by default), and drops the retry lines, so that the cause is the one line pico prints
(docs/hub.md, "Timeouts and retries"). A leaf module: it imports nothing from pico.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time

_RETRY_LINE = re.compile(r"thrown while requesting|\[Retry \d+/\d+\]")  # huggingface_hub's per-attempt lines


class _QuietRetries(logging.Filter):
    """Drops huggingface_hub's per-attempt retry lines; its other warnings (e.g. the server's) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _RETRY_LINE.search(record.getMessage())


_limit = threading.local()  # `deadline`'s, per thread: end (time.monotonic()), seconds, answered


def _timeouts() -> dict[str, float]:
    """huggingface_hub's timeout settings as httpx's per-request timeouts."""
    from huggingface_hub import constants

    read = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    return {"connect": float(constants.HF_HUB_ETAG_TIMEOUT), "read": read, "write": read, "pool": read}


def _fill_timeouts(request) -> None:
    """A request hook: a timeout the caller left unset (None: huggingface_hub passes None on many calls,
    which means no timeout) becomes pico's; one the caller set stays. Inside `deadline`, the timeouts are cut
    to the time left, and once none is left, a retry of a request that got no answer raises TimeoutError
    (huggingface_hub retries only httpx's errors); retries of answered ones (HTTP 503, 429) are bounded by
    huggingface_hub's own count, and end with the answer."""
    given, timeouts = request.extensions.get("timeout") or {}, _timeouts()
    timeouts = {k: v if given.get(k) is None else given[k] for k, v in timeouts.items()}
    if getattr(_limit, "end", None) is not None:
        left = _limit.end - time.monotonic()
        if left <= 0 and not _limit.answered:
            raise TimeoutError(f"no answer within {_limit.seconds:.0f} s (HF_HUB_DOWNLOAD_TIMEOUT sets it)")
        timeouts = {k: min(v, left) for k, v in timeouts.items()} if left > 0 else timeouts
        _limit.answered = False
    request.extensions["timeout"] = timeouts


def _answered(response) -> None:
    """A response hook: inside `deadline`, the request this thread sent last got an answer."""
    if getattr(_limit, "end", None) is not None:
        _limit.answered = True


@contextlib.contextmanager
def deadline():
    """huggingface_hub's requests in this thread inside the block, retries included, stop waiting for a
    server after three read timeouts (30 s by default): for the checks at start-up, which must fail in time
    rather than stall on a server that does not answer."""
    from huggingface_hub import constants

    seconds = 3.0 * constants.HF_HUB_DOWNLOAD_TIMEOUT
    _limit.end, _limit.seconds, _limit.answered = time.monotonic() + seconds, seconds, False
    try:
        yield
    finally:
        _limit.end = None


def _client_with_timeouts():
    """huggingface_hub's default client (its headers, redirects and hooks), every request with timeouts."""
    from huggingface_hub.utils import _http

    client = _http.default_client_factory()
    client.event_hooks["request"].append(_fill_timeouts)
    client.event_hooks["response"].append(_answered)
    return client


@functools.cache
def configure_hf_http() -> None:
    """Once per process, before pico's first Hub request: timeouts on huggingface_hub's client (it replaces
    the client factory: `huggingface_hub.set_client_factory`), and quiet retries."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    set_client_factory(_client_with_timeouts)
    logging.getLogger(_http.__name__).addFilter(_QuietRetries())
