"""Caller authentication for the router's gRPC ports (docs/security.md).

``--grpc-tokens-dir DIR`` is a mounted Secret: each file's name is a **caller name**, its
content that caller's token. :class:`CallerTokens` keeps only SHA-256 digests and answers who
a ``authorization: Bearer <token>`` metadata entry belongs to, comparing the token's digest
with every known digest in constant time (``hmac.compare_digest``, all entries every time).
The directory is re-read when it changes (a Secret update swaps the ``..data`` link).

:class:`BearerAuthInterceptor` refuses every call of the protected services that carries no
known token with ``UNAUTHENTICATED``; gRPC health is never protected. Handlers read the
caller with :meth:`CallerTokens.caller_of` (Pick: the caller is the tenant).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class CallerTokens:
    """Caller name ↔ token digest, from a directory (mounted Secret) or a mapping (tests)."""

    def __init__(self, directory: Path | None = None,
                 tokens: dict[str, str] | None = None) -> None:
        self.directory = directory
        self._entries: list[tuple[str, bytes]] = [
            (caller, _digest(token)) for caller, token in (tokens or {}).items()]
        self._stamp: float | None = None
        self._checked = 0.0
        if directory is not None:
            self._reload()

    def _dir_stamp(self) -> float:
        assert self.directory is not None
        latest = self.directory.stat().st_mtime
        for entry in os.scandir(self.directory):
            if not entry.name.startswith("."):
                latest = max(latest, entry.stat().st_mtime)
        return latest

    def _reload(self) -> None:
        assert self.directory is not None
        entries: list[tuple[str, bytes]] = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue  # Kubernetes' ..data and ..<timestamp> entries
            token = Path(entry.path).read_text(encoding="utf-8").strip()
            if token:
                entries.append((entry.name, _digest(token)))
        if not entries:
            log.warning("no caller tokens in %s: every authenticated gRPC call is refused",
                        self.directory)
        self._entries = entries
        self._stamp = self._dir_stamp()
        log.info("gRPC callers: %s", ", ".join(c for c, _ in entries) or "none")

    def _maybe_reload(self) -> None:
        if self.directory is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            if self._dir_stamp() != self._stamp:
                self._reload()
        except OSError:
            log.exception("cannot re-read caller tokens from %s (keeping the old ones)",
                          self.directory)

    def caller_of(self, metadata: Iterable[Any] | None) -> str | None:
        """The caller whose token the ``authorization`` metadata carries, else None."""
        self._maybe_reload()
        token = ""
        for item in metadata or ():
            key, value = (item.key, item.value) if hasattr(item, "key") else item
            if key == "authorization":
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                scheme, _, rest = text.partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
                break
        if not token:
            return None
        digest = _digest(token)
        found: str | None = None
        for caller, known in self._entries:  # every entry, whatever matches: constant time
            if hmac.compare_digest(digest, known) and found is None:
                found = caller
        return found


def _deny_unary(message: str) -> Callable[[Any, Any], Awaitable[Any]]:
    async def deny(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


def _deny_stream(message: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def deny(requests: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield None  # pragma: no cover (abort raises)

    return deny


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls to ``services`` without a known caller token."""

    def __init__(self, tokens: CallerTokens, services: Iterable[str]) -> None:
        self.tokens = tokens
        self.prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        if self.tokens.caller_of(details.invocation_metadata) is not None:
            return handler
        message = ("this port requires a caller token: send gRPC metadata "
                   "'authorization: Bearer <token>' with a token from the router's "
                   "--grpc-tokens-dir Secret")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _deny_unary(message), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _deny_stream(message), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        log.error("refusing %s: unsupported RPC kind for authentication", details.method)
        return grpc.unary_unary_rpc_method_handler(
            _deny_unary(message), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


__all__ = ["BearerAuthInterceptor", "CallerTokens"]
