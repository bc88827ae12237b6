"""The endpoint's edge, before a request reaches the protocol layer: optional API keys, the request
body cap, and a local `serve run` kept on 127.0.0.1.

    TAH_API_KEY=secret serve run serve.tah:app       # clients then send `Authorization: Bearer secret`
    serve run serve.tah:app max_request_bytes=1048576

No Ray needed to use or test these (`keep_local_ray_on_loopback` only touches Ray's settings).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from serve.protocol import APIError

API_KEY_ENV = "TAH_API_KEY"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """Make a Ray that this process starts itself (no RAY_ADDRESS) advertise and bind 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a constant when it is imported, and `serve run`
    imports Ray before it imports the app, so setting the variable here (as jobs/common.py does for
    the jobs) would come too late: the constant is set as well. The variable still matters for the
    processes Ray starts. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 in the environment keeps Ray's default
    (the machine's external interface); joining a cluster (RAY_ADDRESS) is not affected."""
    if os.environ.get("RAY_ADDRESS"):
        return
    os.environ.setdefault(CLUSTER_ENV, "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ[CLUSTER_ENV].lower() in ("1", "true")


def bind_replica_grpc_to_loopback() -> bool:
    """In a replica on a node whose address is 127.0.0.1 (a local start), make the replica's
    inter-deployment gRPC server listen on 127.0.0.1 rather than on every interface. Returns whether
    it did.

    Ray Serve 2.60 opens that server on "[::]:0" whatever the node's address (serve/_private/
    replica.py, when the replica has initialized), which would leave one port of a local start open to
    the network; the proxy and handles reach a replica at its node's address, 127.0.0.1 here. Call it
    in the replica's constructor: the server starts after it."""
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:  # a Ray without that module: nothing to adjust
        return False
    if ray.util.get_node_ip_address() != "127.0.0.1" or not hasattr(replica, "add_port_to_grpc_server"):
        return False
    original = replica.add_port_to_grpc_server
    if getattr(original, "tah_loopback", False):
        return True

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port.tah_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True


# ---------------------------------------------------------------------------------------- API keys
def api_key_digest(configured: str | None) -> str | None:
    """SHA-256 (hex) of the API key: the `api_key` setting, else $TAH_API_KEY; None: no key, the
    endpoint is open. Replicas are given only this digest, so the key itself is never part of a
    deployment's arguments, of a dumped config, or of a log line."""
    key = configured or os.environ.get(API_KEY_ENV) or None
    return None if key is None else _digest(key)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_api_key(authorization: str | None, digest: str | None) -> None:
    """Raise APIError(401, OpenAI's shape) unless `authorization` is `Bearer <the key>` (or no key is set)."""
    if digest is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                       code="invalid_api_key")
    # Digests of equal length compared in constant time: the time taken says nothing about the key.
    if not hmac.compare_digest(_digest(token.strip()), digest):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ---------------------------------------------------------------------------------------- body cap
def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    code="request_too_large")


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, at most `limit` bytes, else APIError(413).

    A declared Content-Length over the limit is refused before reading anything; a body without one
    (chunked) or lying about it is counted while it streams in, so no more than `limit` bytes (plus
    one chunk) are ever held."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.strip().isdigit()):
            raise APIError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)
