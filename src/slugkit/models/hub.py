"""Reaching the Hugging Face hub — or knowing at once that it cannot be reached.

On a machine without network, ``huggingface_hub`` retries every file five times, 2–8 s apart: a hub id took ~52 s to
fail (twelfth trial), for every command that loads a model. Before a load that may download, slugkit opens one TCP
connection to the hub's endpoint (``HF_ENDPOINT``; :data:`PROBE_TIMEOUT_S`); when that fails, the load runs with
``huggingface_hub`` offline — the local cache still serves what it holds — and a missing file fails at once, the error
saying why. Nothing is probed when ``HF_HUB_OFFLINE`` is set (already offline) or a proxy is configured (a direct
connection says nothing about the proxy's).
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub's endpoint accepts a TCP connection within ``timeout`` seconds (or a proxy is set);
    otherwise the reason, e.g. ``"huggingface.co:443: Name or service not known"``."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


@contextlib.contextmanager
def offline_unless_reachable():
    """Run the block with ``huggingface_hub`` offline when the hub cannot be reached (module docstring). Yields the
    reason (None: reachable, a proxy, or already offline); the flag is restored after."""
    if hub_offline():
        yield None
        return
    why = hub_unreachable()
    if why is None:
        yield None
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        constants.HF_HUB_OFFLINE = old


def unreachable_note(why: str | None) -> str:
    """The sentence an error adds when the hub was found unreachable (empty when it was not)."""
    return (f" The Hugging Face hub cannot be reached from this machine ({why}), so only the local cache was "
            "tried." if why else "")
