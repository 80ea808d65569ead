# Reviewed whitelist of `vulture` (the dead-code check of scripts/test.sh and `make lint`).
# Each entry is a name vulture cannot see used, grouped by why it is not dead. Add an entry only
# with a reason that fits one of the groups (or a new group saying why); dead code is removed.
# Regenerate candidates with:
#   vulture crds/kvroute_api operator/kvroute_operator router/kvroute_router cli/kvroute_cli \
#           bench tests --exclude proto_gen --make-whitelist
# ruff: noqa

# API fields: pydantic models of the CRDs, read by the API server, users and crdgen, not by name in Python
key_prefix  # unused variable (crds/kvroute_api/cache_tier.py:36)
embedding_model  # unused variable (crds/kvroute_api/cache_tier.py:54)
similarity_threshold  # unused variable (crds/kvroute_api/cache_tier.py:57)
ttl_seconds  # unused variable (crds/kvroute_api/cache_tier.py:60)
max_entries  # unused variable (crds/kvroute_api/cache_tier.py:62)
observed_generation  # unused variable (crds/kvroute_api/cache_tier.py:83)
effect  # unused variable (crds/kvroute_api/inference_pool.py:174)
toleration_seconds  # unused variable (crds/kvroute_api/inference_pool.py:176)
observed_generation  # unused variable (crds/kvroute_api/inference_pool.py:322)
prefix_cache_hit_rate  # unused variable (crds/kvroute_api/inference_pool.py:331)
recommended_replicas  # unused variable (crds/kvroute_api/inference_pool.py:334)
model_config  # unused variable (crds/kvroute_api/meta.py:57)
_._check_rules  # unused method (crds/kvroute_api/meta.py:67)
model_config  # unused variable (crds/kvroute_api/meta.py:84)
annotations  # unused variable (crds/kvroute_api/meta.py:91)
last_transition_time  # unused variable (crds/kvroute_api/meta.py:107)
observed_generation  # unused variable (crds/kvroute_api/meta.py:109)
_._check_kind  # unused method (crds/kvroute_api/meta.py:140)
similarity_threshold  # unused variable (crds/kvroute_api/route_policy.py:226)
ttl_seconds  # unused variable (crds/kvroute_api/route_policy.py:230)
allow_sampling  # unused variable (crds/kvroute_api/route_policy.py:234)
observed_generation  # unused variable (crds/kvroute_api/route_policy.py:307)
resolved_pools  # unused variable (crds/kvroute_api/route_policy.py:309)
budget_used_percent  # unused variable (crds/kvroute_api/route_policy.py:313)

# kopf: handlers registered by decorator, operator settings set as attributes
_.standalone  # unused attribute (operator/kvroute_operator/handlers.py:36)
_.finalizer  # unused attribute (operator/kvroute_operator/handlers.py:37)
_.progress_storage  # unused attribute (operator/kvroute_operator/handlers.py:38)
_.diffbase_storage  # unused attribute (operator/kvroute_operator/handlers.py:39)
_.server_timeout  # unused attribute (operator/kvroute_operator/handlers.py:41)
_.client_timeout  # unused attribute (operator/kvroute_operator/handlers.py:42)
_.connect_timeout  # unused attribute (operator/kvroute_operator/handlers.py:43)
_.worker_limit  # unused attribute (operator/kvroute_operator/handlers.py:44)
_.level  # unused attribute (operator/kvroute_operator/handlers.py:45)
_.reporting_component  # unused attribute (operator/kvroute_operator/handlers.py:46)
_.max_workers  # unused attribute (operator/kvroute_operator/handlers.py:47)
_.cancellation_polling  # unused attribute (operator/kvroute_operator/handlers.py:49)
_.instant_exit_timeout  # unused attribute (operator/kvroute_operator/handlers.py:50)
pool_changed  # unused function (operator/kvroute_operator/handlers.py:82)
pool_deleted  # unused function (operator/kvroute_operator/handlers.py:92)
policy_changed  # unused function (operator/kvroute_operator/handlers.py:97)
tier_changed  # unused function (operator/kvroute_operator/handlers.py:106)


# __exit__ arguments (the protocol requires them)
exc_type  # unused variable (cli/kvroute_cli/localengines.py:306)
tb  # unused variable (cli/kvroute_cli/localengines.py:307)

# tokenizers objects configured by attribute
_.pre_tokenizer  # unused attribute (cli/kvroute_cli/testmodel.py:50)
_.decoder  # unused attribute (cli/kvroute_cli/testmodel.py:51)
_.normalizer  # unused attribute (tests/unit/kvevents/test_tokenization.py:118)

# status and report fields serialised as a whole (dataclasses.asdict / JSON), not read by name
error_samples  # unused variable (bench/kvroute_bench/harness.py:115)
prompt_tokens_mean  # unused variable (bench/router_cpu.py:163)
idle_window_s  # unused variable (bench/router_cpu.py:164)
idle_cpu_s_per_s  # unused variable (bench/router_cpu.py:165)
idle_cpu_ms_per_scrape  # unused variable (bench/router_cpu.py:166)
gross_cpu_ms_per_request  # unused variable (bench/router_cpu.py:169)
net_cpu_ms_per_request  # unused variable (bench/router_cpu.py:170)
emulator_cpu_ms_per_request  # unused variable (bench/router_cpu.py:171)
loadavg_before  # unused variable (bench/router_cpu.py:172)
loadavg_after  # unused variable (bench/router_cpu.py:173)
probe_ms_before  # unused variable (bench/router_cpu.py:245)
probe_ms_after  # unused variable (bench/router_cpu.py:247)
steal_s  # unused variable (bench/router_cpu.py:248)
achieved_rate  # unused variable (bench/router_cpu.py:236)
via_ttft_p99_ms  # unused variable (bench/router_cpu.py:238)
direct_ttft_p50_ms  # unused variable (bench/router_cpu.py:239)
via_outside_p50_ms  # unused variable (bench/router_cpu.py:241)
via_outside_p99_ms  # unused variable (bench/router_cpu.py:242)
direct_outside_p50_ms  # unused variable (bench/router_cpu.py:243)
decision_p50_ms  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
decision_p99_ms  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
loop_lag_samples  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
loop_lag_p99_ms  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
loop_lag_over_5ms  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
gc_over_5ms  # unused variable (bench/router_cpu.py: CeilingStep, filled from router_view)
direct_outside_p99_ms  # unused variable (bench/router_cpu.py:244)
added_p50_ms  # unused variable (bench/router_cpu.py:245)
router_cpu_cores  # unused variable (bench/router_cpu.py:247)
emulator_cpu_cores  # unused variable (bench/router_cpu.py:249)
admitted_s  # unused variable (bench/kvroute_bench/sim/engine.py:59)
_.busy_until  # unused attribute (bench/kvroute_bench/sim/engine.py:104)
_.admitted_s  # unused attribute (bench/kvroute_bench/sim/engine.py:162)
decisions_per_s  # unused variable (bench/overhead_sweep.py:92)
precise_scored_share  # unused variable (bench/overhead_sweep.py:99)
round_wall_p50_us  # unused variable (bench/overhead_sweep.py:103)
round_cpu_p50_us  # unused variable (bench/overhead_sweep.py:104)
round_grpc_p50_us  # unused variable (bench/overhead_sweep.py:105)
predicted_quality  # unused variable (router/kvroute_router/batching/batcher.py:65)
subject  # unused variable (router/kvroute_router/batching/quality.py:54)
quality_score  # unused variable (router/kvroute_router/budget/pricing.py:29)
mismatched  # unused variable (router/kvroute_router/kvevents/selfcheck.py:44)
unverifiable  # unused variable (router/kvroute_router/kvevents/selfcheck.py:45)
_.unverifiable  # unused attribute (router/kvroute_router/kvevents/selfcheck.py:125)
_.mismatched  # unused attribute (router/kvroute_router/kvevents/selfcheck.py:131)
last_batch_monotonic  # unused variable (router/kvroute_router/kvevents/subscriber.py:107)
disconnected_since  # unused variable (router/kvroute_router/kvevents/subscriber.py:113)
_.disconnected_since  # unused attribute (router/kvroute_router/kvevents/subscriber.py:258)
_.disconnected_since  # unused attribute (router/kvroute_router/kvevents/subscriber.py:267)
_.last_batch_monotonic  # unused attribute (router/kvroute_router/kvevents/subscriber.py:435)

# diagnostic counters, read when debugging
_.reloads  # unused attribute (router/kvroute_router/datastore/file_source.py:76)
_.reloads  # unused attribute (router/kvroute_router/datastore/file_source.py:96)
_.misses  # unused attribute (router/kvroute_router/kvevents/tokenization.py:86)
_.misses  # unused attribute (router/kvroute_router/kvevents/tokenization.py:123)

# public extension API of the director (documented in docs/router.md)
started_at  # unused variable (router/kvroute_router/director.py:116)
_.add_completion_observer  # unused method (router/kvroute_router/director.py:169)

# pytest: module marks and hooks found by name
pytest_generate_tests  # unused function (tests/chart/conftest.py:155)
pytest_asyncio_loop_factories  # unused function (tests/conftest.py:27; pytest-asyncio hook)
REGISTERED  # unused variable (tests/chart/test_chart_envoy.py:26): imported for its side effect
pytestmark  # unused variable (tests/e2e/test_budget_engines.py:36)
pytestmark  # unused variable (tests/e2e/test_engines.py:13)
pytestmark  # unused variable (tests/e2e/test_kvevents.py:35)
pytestmark  # unused variable (tests/e2e/test_router_engines.py:26)
pytestmark  # unused variable (tests/k8s/test_autoscaling.py:17)
pytestmark  # unused variable (tests/k8s/test_lifecycle.py:15)
pytestmark  # unused variable (tests/k8s/test_real_cluster.py:25)
pytestmark  # unused variable (tests/unit/operator/test_operator_prometheus.py:26)

# gRPC server interceptor API: grpc.aio calls it by name
_.intercept_service  # unused method (router/kvroute_router/grpcauth.py)

# logging: a LogRecord attribute the framing filter rewrites (read by the logging machinery)
_.levelname  # unused attribute (router/kvroute_router/proxy/server.py)
# pytest: autouse fixtures are found by name
report_figures  # unused function (tests/loopback/test_fault_suite.py)

# asyncio.Protocol callbacks: the event loop's transport calls them by name
_.connection_made  # unused method (router/kvroute_router/http1/client.py)
_.connection_lost  # unused method (router/kvroute_router/http1/client.py)
