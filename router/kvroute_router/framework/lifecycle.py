"""The request lifecycle every entry point follows, and the hook types around it.

A routed request goes: **route** (resolve, limits, admission hooks, scheduling) → **dispatch**
to the first endpoint (at once, with no ``await`` in between, so concurrent requests see each
other's in-flight counts) → per further attempt: **end the attempt**, dispatch the next → when
it is over: **finish** with an :class:`Outcome` (exactly once: accounting, metrics, admission
hooks' ``on_finish``). :class:`RoutedRequest` is that rule as an object: ``open`` routes and
dispatches the first attempt; ``close`` (also on leaving ``async with``) ends an open attempt and
finishes a request nobody finished, so no exception, cancellation or early return anywhere
after routing can leak an in-flight count, an admission slot or a budget reservation.

The servers (proxy, ext_proc, gRPC Pick) depend only on the Protocols here
(:class:`RequestRouter`, :class:`RoutedRequest`, :class:`DecisionView`), not on the director's
or the datastore's classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kvroute_api.route_policy import RoutePolicy
from prometheus_client import CollectorRegistry

from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.request import LLMRequest


class RoutingError(Exception):
    """The request cannot be routed; carries the HTTP status and an OpenAI-style error code."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None, reason: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.reason = reason or code
        self.param = param
        """The OpenAI error's ``param`` (e.g. the budget limit that refused)."""


@dataclass
class Outcome:
    """How an attempt ended."""

    status: int
    """HTTP status the endpoint answered (0: no answer: connection failure or timeout)."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    witness: Literal["router", "caller", "unverified"] = "router"
    """Who vouches for this outcome (docs/security.md, accounting): ``router`` (the proxy saw
    the engine's answer, or Envoy reported it to ext_proc), ``caller`` (an authenticated Pick
    caller's Report) or ``unverified`` (an anonymous Report, or a Pick never reported)."""
    answered: bool = False
    """The engine's answer had started (a first byte reached the router): an attempt cut after
    that generated an unknown amount, so without usage it pays its reservation."""


@dataclass
class Admission:
    """What an admission hook decided for an admitted request."""

    pools: Sequence[str] | None = None
    """Pool names (of the policy) the request may use; None: any."""
    prefer: Sequence[str] | None = None
    """Pool names to try first among those allowed (difficulty routing); the others stay
    available as fallbacks."""
    on_finish: Callable[[Any, Outcome], None] | None = None
    """Called once when the request finished (accounting, releasing concurrency), with the
    director's ``Decision``; with ``None`` for the decision when the request was refused or
    failed after this hook admitted it (a later hook shed it, no endpoint was available, a
    plugin raised), so reservations are never leaked."""


class DecisionView(Protocol):
    """What a server reads of a routing decision."""

    @property
    def request(self) -> LLMRequest: ...

    @property
    def ranked(self) -> list[ScoredEndpoint]: ...

    @property
    def endpoints(self) -> list[Endpoint]: ...

    @property
    def policy_name(self) -> str: ...

    @property
    def pool_name(self) -> str: ...

    @property
    def served_model(self) -> str:
        """The model name the pool's engines serve (written into the forwarded body)."""
        ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def request_timeout_s(self) -> float: ...

    @property
    def per_try_timeout_s(self) -> float: ...

    @property
    def prefill_wait_s(self) -> float:
        """The policy's ``scoring.prefillWaitMs``, in seconds (0: never wait)."""
        ...

    def prefix_match_ratio(self, endpoint: Endpoint | None = None) -> float | None: ...

    def engine_priority(self, endpoint: Endpoint) -> int | None:
        """The vLLM ``priority`` the body sent to ``endpoint`` carries; None: the client's."""
        ...

    def reasons(self) -> list[str]: ...


class RoutedRequest(Protocol):
    """One routed request, from its first dispatch to its outcome."""

    @property
    def decision(self) -> DecisionView: ...

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint of the attempt in progress (None between attempts)."""
        ...

    def dispatch(self, endpoint: Endpoint) -> None:
        """Start an attempt on ``endpoint`` (ending the one in progress)."""

    def answering(self) -> None:
        """The endpoint of the attempt in progress started answering (its first byte reached
        the router): the prompt is computed, so it leaves the endpoint's prefill backlog
        (no-op when no attempt is in progress or it was already said)."""

    async def wait_for_prefill(self, limit_s: float) -> float:
        """Before sending the attempt in progress: wait (at most ``limit_s``) while its
        endpoint is still computing this prompt's prefix for an earlier request; returns the
        seconds waited (0 at once when nothing is being computed)."""
        ...

    def end_attempt(self) -> None:
        """The attempt in progress is over (no-op when none is)."""

    def finish(self, endpoint: Endpoint | None, outcome: Outcome) -> None:
        """End the attempt in progress and close the request with ``outcome`` (``endpoint``:
        the one that served it); only the first call counts."""

    def close(self, error: BaseException | None = None) -> None:
        """Make sure the request is over: finish it if nobody did (499 when cancelled, 500 on
        ``error``, else 0)."""

    async def __aenter__(self) -> RoutedRequest: ...

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None: ...


class RequestRouter(Protocol):
    """What a server needs of the director."""

    async def open(self, request: LLMRequest, entrypoint: str = "proxy") -> RoutedRequest:
        """Route ``request`` and dispatch its first attempt (raises RoutingError)."""
        ...

    def mark_unavailable(self, endpoint: Endpoint, for_s: float = 2.0) -> None: ...

    def count_retry(self, decision: DecisionView) -> None: ...

    def count_per_try_extension(self, decision: DecisionView) -> None:
        """A per-try timeout found the attempt's endpoint answering others: it waits on."""

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The registry ``/metrics`` exposes."""
        ...


class ModelCatalog(Protocol):
    """What the OpenAI proxy reads of the datastore (``/v1/models``, ``/health``, which tenant
    headers to distrust)."""

    @property
    def version(self) -> int: ...

    @property
    def loaded(self) -> bool: ...

    def models(self, namespace: str | None = None) -> list[str]: ...

    def endpoints(self) -> list[Endpoint]: ...

    def policies(self) -> Mapping[str, RoutePolicy]: ...
