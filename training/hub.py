"""Whether the Hugging Face Hub can be reached, found out in one lookup and one connect instead of ~25 s
of retries.

Without ``HF_HUB_OFFLINE``, ``huggingface_hub`` retries a request whose host does not resolve or
refuses connections five times with backoff, printing a line per retry, before `datasets` gives up.
A machine with no network (or a mistyped ``HF_ENDPOINT``) is told at once by resolving the
endpoint's host and opening one TCP connection to it first. Behind a proxy neither says anything
about the Hub (DNS may be the proxy's job), so the check stands aside and the request decides.
"""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 5.0


def unreachable_reason() -> str | None:
    """Why the Hub cannot be asked (a host that does not resolve or does not accept connections), or
    None when it may be; None too in offline mode, where the local cache answers instead of the Hub,
    and when a proxy carries the request."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlparse(constants.ENDPOINT)
    host = url.hostname
    if not host:
        return f"HF_ENDPOINT {constants.ENDPOINT!r} names no host"
    proxies = urllib.request.getproxies()
    if (url.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(host):
        return None
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror}); is the network up? (HF_HUB_OFFLINE=1 reads the local cache only)"
    try:
        with socket.create_connection(addresses[0][4][:2], timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = exc.strerror or f"no answer in {CONNECT_TIMEOUT_S:g} s"
        return f"{host}:{port} does not accept connections ({why}); is the network up? (HF_HUB_OFFLINE=1 reads the local cache only)"
    return None
