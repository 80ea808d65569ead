"""Golden-test oracle: prints vLLM's own block hashes, run by the *engine* venv's interpreter.

Reads a JSON list of cases on stdin — ``{"algorithm", "block_size", "tokens", "lora_name",
"lora_path", "cache_salt"}`` — builds a real ``vllm.v1.request.Request`` for each, hashes it with
vLLM's ``get_request_block_hasher`` (after ``init_none_hash``, which honours ``PYTHONHASHSEED``)
and prints a JSON list of per-case lists of hex digests. Not imported by the dev venv: vLLM lives
only in the engine venv, by design.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    cases = json.load(sys.stdin)
    results: list[list[str]] = []
    for number, case in enumerate(cases):
        hash_fn = get_hash_fn_by_name(case["algorithm"])
        kv_cache_utils.init_none_hash(hash_fn)
        hasher = kv_cache_utils.get_request_block_hasher(case["block_size"], hash_fn)
        lora = None
        if case.get("lora_name"):
            lora = LoRARequest(lora_name=case["lora_name"], lora_int_id=1,
                               lora_path=case.get("lora_path") or "")
        request = Request(request_id=f"golden-{number}", prompt_token_ids=case["tokens"],
                          sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
                          lora_request=lora, cache_salt=case.get("cache_salt"),
                          block_hasher=hasher)
        results.append([bytes(h).hex() for h in request.block_hashes])
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
