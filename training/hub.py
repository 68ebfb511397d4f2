"""Whether the Hugging Face Hub can be reached, found out in one DNS lookup instead of ~25 s of retries.

Without ``HF_HUB_OFFLINE``, ``huggingface_hub`` retries a request whose host does not resolve five
times with backoff, printing a line per retry, before `datasets` gives up. A machine with no network
(or a mistyped ``HF_ENDPOINT``) is told at once by resolving the endpoint's host first.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def unreachable_reason() -> str | None:
    """Why the Hub cannot be asked (a host that does not resolve), or None when it may be; None too in
    offline mode, where the local cache answers instead of the Hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return f"HF_ENDPOINT {constants.ENDPOINT!r} names no host"
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror}); is the network up? (HF_HUB_OFFLINE=1 reads the local cache only)"
    return None
