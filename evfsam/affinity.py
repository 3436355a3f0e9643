"""Image affinity on the wire: the header a proxy hashes on to send an image's requests to one replica.

Each Triton replica keeps its own embedding cache, so a prompt for an image is cheap only on the
replica that encoded that image.  Every request that carries an image (or the key of one sent before)
carries `x-image-key: <sha256 hex of the image bytes>` as gRPC metadata / HTTP header: the key the
embedding cache itself uses (`evfsam.embedding_cache.image_key`).  A proxy that hashes consistently on
this header (serving/routing_policy.py: Envoy, Envoy Gateway, Istio) sends every request for one
image to the same replica.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

from .embedding_cache import image_key

AFFINITY_HEADER = "x-image-key"
# The values the proxies route by hash (anything else by least request): lower-case hex.  Not
# `[0-9a-f]{64}`: that compiles past RE2's default program-size limit in Envoy and Envoy Gateway.
AFFINITY_KEY_PATTERN = "[0-9a-f]+"
KEY_HEX_DIGITS = 64
_AFFINITY_KEY = re.compile(AFFINITY_KEY_PATTERN)


def affinity_key(image: Optional[bytes] = None, key: Optional[str] = None) -> Optional[str]:
    """The affinity key of a request: the image's sha256 hex, or the image key it sends instead.

    None for a key that is not a sha256 hex digest (the server will refuse it anyway; the proxy
    need not hash on it)."""
    if image is not None:
        return image_key(image)
    if key is not None and len(key) == KEY_HEX_DIGITS and _AFFINITY_KEY.fullmatch(key):
        return key
    return None


def affinity_headers(image: Optional[bytes] = None, key: Optional[str] = None) -> Dict[str, str]:
    """`{AFFINITY_HEADER: key}` for a request that carries `image` or `key`; {} if neither is usable."""
    found = affinity_key(image, key)
    return {AFFINITY_HEADER: found} if found is not None else {}
