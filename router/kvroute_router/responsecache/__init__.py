"""The response cache: answers reused for identical requests (exact key) and for paraphrased
questions (all-MiniLM-L6-v2 embeddings above a cosine threshold), per tenant or per policy.

* :mod:`.key` — what must be equal for an answer to be reused (exact key, semantic partition,
  query text) and which requests may use the cache at all;
* :mod:`.answer` — recording an engine's answer (JSON or SSE) and replaying it in either form;
* :mod:`.store` — the vector index and the per-replica memory backend; :mod:`.redis_store` — the
  backend shared by replicas;
* :mod:`.embedder` — the sentence embeddings (the router's NumPy MiniLM);
* :mod:`.metrics` — ``kvroute_response_cache_*``;
* :mod:`.service` — :class:`ResponseCache`, the two calls the servers make.

See docs/response-cache.md.
"""

from kvroute_router.responsecache.answer import AnswerRecorder
from kvroute_router.responsecache.service import CACHE_HEADER, CacheLookup, ResponseCache

__all__ = ["CACHE_HEADER", "AnswerRecorder", "CacheLookup", "ResponseCache"]
