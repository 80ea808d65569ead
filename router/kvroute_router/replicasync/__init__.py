"""Replica coordination: router replicas share their dispatches (pending KV blocks and
dispatch counts) over Redis pub/sub, so active-active replicas do not pile onto one engine or
prefill one context twice. ``wire`` is the message format, ``sync`` the publisher/subscriber;
the router wires it up with ``--replica-sync-redis-url`` (docs/replica-sync.md)."""
