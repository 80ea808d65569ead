"""Seeded request traces for the benchmarks: multi-tenant chat, RAG, hot spot, low sharing.

Every trace is a list of :class:`TraceRequest` with an open-loop arrival time (Poisson process
at ``rate`` requests/s), a prompt and an output length. The same parameters and seed always
give the same trace, byte for byte, so every contender sees exactly the same requests.

Prompts are plain ASCII made from seeded pseudo-words. The test model's tokenizer is
byte-level (one byte, one token), so a prompt's length in characters is its length in tokens,
and two prompts that share their first N characters share N tokens of KV cache. Lengths are
drawn from clipped log-normal distributions (the shape reported for production chat and RAG
traces: a long right tail) scaled to the test model's 4,096-token context; the defaults are in
each ``*Params`` class and documented in ``docs/benchmarks/README.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONTEXT_MARGIN = 8  # tokens kept free for a BOS token and rounding


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    index: int
    arrival_s: float
    prompt: str
    max_tokens: int
    group: str  # tenant, document or prefix label: what the request shares with others
    shared_tokens: int  # how many leading tokens were built to be shared with other requests
    # A chat request (sent to /v1/chat/completions) instead of a completion prompt; ``prompt``
    # then holds the messages' text, for sizes only.
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclass(frozen=True)
class Trace:
    """A named, parameterised, seeded list of requests."""

    workload: str
    params: dict[str, Any]
    requests: list[TraceRequest]

    def summary(self) -> dict[str, Any]:
        """Sizes that describe the trace (for the report)."""
        if not self.requests:
            return {"requests": 0}
        prompts = np.array([r.prompt_tokens for r in self.requests], dtype=float)
        outputs = np.array([r.max_tokens for r in self.requests], dtype=float)
        shared = np.array([r.shared_tokens for r in self.requests], dtype=float)
        return {
            "requests": len(self.requests),
            "duration_s": round(self.requests[-1].arrival_s, 3),
            "prompt_tokens_mean": round(float(prompts.mean()), 1),
            "prompt_tokens_p50": float(np.percentile(prompts, 50)),
            "prompt_tokens_max": float(prompts.max()),
            "output_tokens_mean": round(float(outputs.mean()), 1),
            "designed_shared_fraction": round(float(shared.sum() / prompts.sum()), 3),
            "groups": len({r.group for r in self.requests}),
        }


@dataclass(frozen=True)
class LogNormal:
    """A log-normal length distribution given by its median and log-space sigma, clipped."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator) -> int:
        value = rng.lognormal(math.log(self.median), self.sigma)
        return int(min(self.high, max(self.low, round(value))))


def make_text(rng: np.random.Generator, n: int) -> str:
    """``n`` characters of seeded pseudo-words (lower-case letters, spaces, full stops)."""
    if n <= 0:
        return ""
    chars = rng.integers(ord("a"), ord("z") + 1, size=n, dtype=np.uint8)
    word_ends = rng.random(n) < 0.17
    chars[word_ends] = ord(" ")
    sentence_ends = rng.random(n) < 0.01
    chars[sentence_ends] = ord(".")
    return bytes(chars).decode("ascii")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def poisson_arrivals(rng: np.random.Generator, rate: float, count: int) -> list[float]:
    """Arrival times (s) of ``count`` events of a Poisson process at ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=count)
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]


def zipf_choice(rng: np.random.Generator, n: int, s: float) -> int:
    """An index in [0, n) with probability proportional to 1 / (rank ** s)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return int(rng.choice(n, p=weights / weights.sum()))


@dataclass(frozen=True)
class CommonParams:
    """Parameters every workload has."""

    requests: int = 120
    rate: float = 1.0  # requests per second (open loop, Poisson)
    seed: int = 0
    max_context: int = 4096


# Codes that keep the random streams of different trace parts independent.
_ARRIVALS, _SYSTEM, _TURN, _OUTPUT, _DOC, _QUESTION, _PREFIX, _SUFFIX, _MIX = range(9)


@dataclass(frozen=True)
class ChatParams(CommonParams):
    """Multi-tenant chat: per-tenant system prompts, multi-turn sessions.

    Each arrival is either a new session (probability ``1 / mean_turns``) of a tenant chosen by
    Zipf popularity, or the next turn of a session already open. A turn's prompt is the
    tenant's system prompt, the earlier turns (user text, then a stand-in for the assistant's
    answer of that turn's output length) and the new user text.
    """

    tenants: int = 12
    tenant_zipf: float = 0.8
    system: LogNormal = field(default_factory=lambda: LogNormal(1200, 0.35, 400, 2000))
    user: LogNormal = field(default_factory=lambda: LogNormal(80, 0.7, 16, 400))
    output: LogNormal = field(default_factory=lambda: LogNormal(24, 0.5, 8, 64))
    mean_turns: float = 3.0
    max_turns: int = 6


@dataclass(frozen=True)
class RagParams(CommonParams):
    """RAG: a pool of long documents, Zipf-popular, each asked many different questions."""

    documents: int = 24
    document_zipf: float = 1.0
    instructions_tokens: int = 120  # one shared instruction header before every document
    document: LogNormal = field(default_factory=lambda: LogNormal(1600, 0.3, 600, 2600))
    question: LogNormal = field(default_factory=lambda: LogNormal(40, 0.6, 8, 200))
    output: LogNormal = field(default_factory=lambda: LogNormal(24, 0.5, 8, 64))


@dataclass(frozen=True)
class HotspotParams(CommonParams):
    """One prefix dominates: ``hot_fraction`` of requests share it; load must beat affinity."""

    hot_fraction: float = 0.7
    cold_prefixes: int = 8
    prefix: LogNormal = field(default_factory=lambda: LogNormal(1800, 0.2, 1000, 2400))
    suffix: LogNormal = field(default_factory=lambda: LogNormal(120, 0.6, 16, 600))
    output: LogNormal = field(default_factory=lambda: LogNormal(24, 0.5, 8, 64))


@dataclass(frozen=True)
class PrecisePrefixParams(CommonParams):
    """The llm-d precise-prefix-routing shape: tenants, each with a long shared context, and
    several users per tenant sending ~1.2k-token questions after it.

    ``tenants=0`` sizes the tenant count to the fleet: ``kv_fraction`` of its KV capacity holds
    every tenant's context once (``kvroute bench`` fills it in from the engine count and
    profile; llm-d's published run: 150 tenants x 6k tokens on 8 pods). Each question is new
    text, so the shareable part of a prompt is its tenant's context.
    """

    max_context: int = 8192
    tenants: int = 0
    kv_fraction: float = 0.7
    fleet_kv_tokens: int = 0  # engines x KV blocks x block size (set by kvroute bench)
    context_tokens: int = 6000
    users_per_tenant: int = 5
    question: LogNormal = field(default_factory=lambda: LogNormal(1200, 0.1, 900, 1500))
    output: LogNormal = field(default_factory=lambda: LogNormal(128, 0.3, 32, 256))

    def tenant_count(self) -> int:
        if self.tenants > 0:
            return self.tenants
        if self.fleet_kv_tokens <= 0:
            return 150  # llm-d's published count, when the fleet is not known
        return max(1, round(self.kv_fraction * self.fleet_kv_tokens / self.context_tokens))


@dataclass(frozen=True)
class LowSharingParams(CommonParams):
    """Control: every prompt is unique, so cache affinity can gain nothing."""

    prompt: LogNormal = field(default_factory=lambda: LogNormal(900, 0.6, 100, 2600))
    output: LogNormal = field(default_factory=lambda: LogNormal(24, 0.5, 8, 64))


def _fit(prompt_tokens: int, output: int, max_context: int) -> bool:
    return prompt_tokens + output <= max_context - CONTEXT_MARGIN


def chat_trace(p: ChatParams) -> list[TraceRequest]:
    arrivals = poisson_arrivals(_rng(p.seed, _ARRIVALS), p.rate, p.requests)
    mix = _rng(p.seed, _MIX)
    systems: dict[int, str] = {}
    open_sessions: list[dict[str, Any]] = []
    requests: list[TraceRequest] = []
    next_session = 0
    for i, at in enumerate(arrivals):
        session: dict[str, Any] | None = None
        if open_sessions and mix.random() >= 1.0 / p.mean_turns:
            session = open_sessions[int(mix.integers(len(open_sessions)))]
        user = make_text(_rng(p.seed, _TURN, i), p.user.draw(_rng(p.seed, _TURN, i, 1)))
        output = p.output.draw(_rng(p.seed, _OUTPUT, i))
        if session is not None and not _fit(
                len(session["history"]) + len(user) + 1, output, p.max_context):
            open_sessions.remove(session)
            session = None
        if session is None:
            tenant = zipf_choice(mix, p.tenants, p.tenant_zipf)
            if tenant not in systems:
                srng = _rng(p.seed, _SYSTEM, tenant)
                systems[tenant] = (f"[tenant {tenant} system prompt] "
                                   + make_text(srng, p.system.draw(srng)))
            turns = min(p.max_turns, int(mix.geometric(1.0 / p.mean_turns)))
            session = {"id": next_session, "tenant": tenant, "history": systems[tenant] + "\n",
                       "turns_left": max(1, turns)}
            next_session += 1
            open_sessions.append(session)
        prompt = f"{session['history']}U: {user}\nA:"
        prompt = prompt[: p.max_context - CONTEXT_MARGIN - output]
        requests.append(TraceRequest(
            index=i, arrival_s=at, prompt=prompt, max_tokens=output,
            group=f"tenant-{session['tenant']}", shared_tokens=len(session["history"])))
        answer = make_text(_rng(p.seed, _OUTPUT, i, 1), output)
        session["history"] = f"{prompt} {answer}\n"
        session["turns_left"] -= 1
        if session["turns_left"] <= 0:
            open_sessions.remove(session)
    return requests


def rag_trace(p: RagParams) -> list[TraceRequest]:
    arrivals = poisson_arrivals(_rng(p.seed, _ARRIVALS), p.rate, p.requests)
    mix = _rng(p.seed, _MIX)
    header = "[instructions] " + make_text(_rng(p.seed, _SYSTEM), p.instructions_tokens)
    documents: dict[int, str] = {}
    requests = []
    for i, at in enumerate(arrivals):
        doc = zipf_choice(mix, p.documents, p.document_zipf)
        if doc not in documents:
            drng = _rng(p.seed, _DOC, doc)
            documents[doc] = f"\n[document {doc}] " + make_text(drng, p.document.draw(drng))
        qrng = _rng(p.seed, _QUESTION, i)
        question = make_text(qrng, p.question.draw(qrng))
        output = p.output.draw(_rng(p.seed, _OUTPUT, i))
        shared = header + documents[doc]
        prompt = f"{shared}\nQ: {question}\nA:"[: p.max_context - CONTEXT_MARGIN - output]
        requests.append(TraceRequest(index=i, arrival_s=at, prompt=prompt, max_tokens=output,
                                     group=f"doc-{doc}", shared_tokens=min(len(shared),
                                                                           len(prompt))))
    return requests


def hotspot_trace(p: HotspotParams) -> list[TraceRequest]:
    arrivals = poisson_arrivals(_rng(p.seed, _ARRIVALS), p.rate, p.requests)
    mix = _rng(p.seed, _MIX)
    prefixes: dict[int, str] = {}
    requests = []
    for i, at in enumerate(arrivals):
        which = 0 if mix.random() < p.hot_fraction else 1 + int(mix.integers(p.cold_prefixes))
        if which not in prefixes:
            prng = _rng(p.seed, _PREFIX, which)
            prefixes[which] = f"[prefix {which}] " + make_text(prng, p.prefix.draw(prng))
        srng = _rng(p.seed, _SUFFIX, i)
        suffix = make_text(srng, p.suffix.draw(srng))
        output = p.output.draw(_rng(p.seed, _OUTPUT, i))
        prompt = f"{prefixes[which]}\n{suffix}"[: p.max_context - CONTEXT_MARGIN - output]
        requests.append(TraceRequest(
            index=i, arrival_s=at, prompt=prompt, max_tokens=output,
            group="hot" if which == 0 else f"cold-{which}",
            shared_tokens=min(len(prefixes[which]), len(prompt))))
    return requests


def precise_prefix_trace(p: PrecisePrefixParams) -> list[TraceRequest]:
    arrivals = poisson_arrivals(_rng(p.seed, _ARRIVALS), p.rate, p.requests)
    mix = _rng(p.seed, _MIX)
    tenants = p.tenant_count()
    contexts: dict[int, str] = {}
    requests = []
    for i, at in enumerate(arrivals):
        tenant = int(mix.integers(tenants))
        user = int(mix.integers(max(1, p.users_per_tenant)))
        if tenant not in contexts:
            contexts[tenant] = (f"[tenant {tenant} context] "
                                + make_text(_rng(p.seed, _SYSTEM, tenant), p.context_tokens))
        qrng = _rng(p.seed, _QUESTION, i)
        question = make_text(qrng, p.question.draw(qrng))
        output = p.output.draw(_rng(p.seed, _OUTPUT, i))
        shared = contexts[tenant]
        prompt = f"{shared}\n[user {user}] {question}\nA:"
        prompt = prompt[: p.max_context - CONTEXT_MARGIN - output]
        requests.append(TraceRequest(index=i, arrival_s=at, prompt=prompt, max_tokens=output,
                                     group=f"tenant-{tenant}",
                                     shared_tokens=min(len(shared), len(prompt))))
    return requests


def low_sharing_trace(p: LowSharingParams) -> list[TraceRequest]:
    arrivals = poisson_arrivals(_rng(p.seed, _ARRIVALS), p.rate, p.requests)
    requests = []
    for i, at in enumerate(arrivals):
        prng = _rng(p.seed, _PREFIX, i)
        output = p.output.draw(_rng(p.seed, _OUTPUT, i))
        # The request index first, so no two prompts share even their first block.
        prompt = f"{i:08d} " + make_text(prng, p.prompt.draw(prng))
        prompt = prompt[: p.max_context - CONTEXT_MARGIN - output]
        requests.append(TraceRequest(index=i, arrival_s=at, prompt=prompt, max_tokens=output,
                                     group=f"req-{i}", shared_tokens=0))
    return requests


@dataclass(frozen=True)
class Workload:
    """A named trace generator and its parameter class."""

    name: str
    params_type: type[CommonParams]
    generate: Callable[[Any], list[TraceRequest]]
    description: str


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        Workload("chat", ChatParams, chat_trace,
                 "multi-tenant chat: long per-tenant system prompts, multi-turn sessions"),
        Workload("rag", RagParams, rag_trace,
                 "RAG: a Zipf-popular pool of long documents, many questions per document"),
        Workload("hotspot", HotspotParams, hotspot_trace,
                 "one prefix dominates (70% of requests): load must win over affinity"),
        Workload("low-sharing", LowSharingParams, low_sharing_trace,
                 "control: unique prompts, nothing to gain from cache affinity"),
        Workload("precise-prefix", PrecisePrefixParams, precise_prefix_trace,
                 "llm-d's precise-prefix shape: tenants x long shared context x users with "
                 "~1.2k-token questions, tenants sized to ~70% of the fleet's KV capacity"),
    )
}


def _convert(current: Any, text: str, name: str) -> Any:
    if isinstance(current, bool):
        if text.lower() not in {"true", "false", "1", "0"}:
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in {"true", "1"}
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, LogNormal):
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"{name}: expected MEDIAN:SIGMA:LOW:HIGH, got {text!r}")
        return LogNormal(float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]))
    return text


def build_params(workload: str, overrides: Mapping[str, str] | None = None,
                 **common: Any) -> CommonParams:
    """The workload's parameters: defaults, then ``common`` values, then ``KEY=VALUE`` texts."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; valid: {', '.join(WORKLOADS)}")
    params = WORKLOADS[workload].params_type(**common)
    fields = {f.name for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    for key, text in (overrides or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"workload {workload!r} has no parameter {key!r}; valid: "
                             f"{', '.join(sorted(fields))}")
        changes[name] = _convert(getattr(params, name), text, key)
    return dataclasses.replace(params, **changes)


def generate(params: CommonParams) -> Trace:
    """The trace for ``params`` (whose class names the workload)."""
    for workload in WORKLOADS.values():
        if type(params) is workload.params_type:
            return Trace(workload=workload.name, params=dataclasses.asdict(params),
                         requests=workload.generate(params))
    raise TypeError(f"no workload takes {type(params).__name__}")
