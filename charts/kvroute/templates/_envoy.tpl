{{/*
The Envoy sidecar's bootstrap (router.envoy.enabled): the Gateway API Inference Extension's
"standalone" data path, inside the router pod.

  client -> :envoy.port -> header_mutation (drop any client-sent destination header)
         -> ext_proc (router on 127.0.0.1:extProc; it sets x-gateway-destination-endpoint)
         -> router filter -> ORIGINAL_DST cluster (connects to the host:port in that header)

tests/chart parses it into envoy.config.bootstrap.v3.Bootstrap with xds-protos.
*/}}
{{- define "kvroute.envoy.bootstrap" -}}
{{- $envoy := .Values.router.envoy -}}
{{- $fullDuplexReq := eq $envoy.requestBodyMode "FULL_DUPLEX_STREAMED" -}}
{{- $fullDuplexResp := eq $envoy.responseBodyMode "FULL_DUPLEX_STREAMED" -}}
{{- $failOpen := eq $envoy.failureMode "FailOpen" -}}
{{- if and $failOpen (or $fullDuplexReq $fullDuplexResp) -}}
{{- fail "router.envoy.failureMode=FailOpen needs router.envoy.requestBodyMode=BUFFERED and responseBodyMode STREAMED or NONE: Envoy does not fail open in FULL_DUPLEX_STREAMED mode (the request gets 500 whatever failure_mode_allow says)" -}}
{{- end -}}
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ $envoy.adminPort }}}
static_resources:
  listeners:
    - name: inference
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $envoy.port }}}
      # Request bodies Envoy may hold (BUFFERED mode buffers the whole body before the
      # router sees it); in FULL_DUPLEX_STREAMED mode the router enforces the same bound.
      per_connection_buffer_limit_bytes: {{ $envoy.maxRequestBodyBytes | int64 }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: inference
                codec_type: AUTO
                # The picked pod failed before answering (connection refused or reset): an
                # OpenAI error body instead of Envoy's text, retry-after, and the failure flags
                # for the router, which keeps the pod out of picks for a while. Envoy cannot
                # retry on another pod here: ORIGINAL_DST reads one ip:port (docs/router.md).
                local_reply_config:
                  mappers:
                    - filter:
                        response_flag_filter:
                          flags: [UF, UH, URX, UC, UO]
                      headers_to_add:
                        - header: {key: retry-after, value: "1"}
                          append_action: OVERWRITE_IF_EXISTS_OR_ADD
                        - header: {key: x-kvroute-upstream-failure, value: "%RESPONSE_FLAGS%"}
                          append_action: OVERWRITE_IF_EXISTS_OR_ADD
                      body_format_override:
                        json_format:
                          error:
                            message: "The model server %UPSTREAM_HOST% failed before answering (%RESPONSE_CODE_DETAILS%); it is kept out of picks for a while: retry the request"
                            type: upstream_failed
                            param: null
                            code: upstream_unavailable
                    # Too large for the gateway: Envoy's own limit (BUFFERED bodies) or the
                    # router's (streamed bodies); the same OpenAI error either way.
                    - filter:
                        status_code_filter:
                          comparison: {op: EQ, value: {default_value: 413, runtime_key: kvroute_413}}
                      body_format_override:
                        json_format:
                          error:
                            message: "The request body is larger than the gateway accepts ({{ $envoy.maxRequestBodyBytes | int64 }} bytes)"
                            type: invalid_request_error
                            param: null
                            code: request_too_large
                    # Envoy's own 500s: with FailClose, the router (ext_proc) could not be asked
                    # or broke the protocol. (The router never answers 500 itself.)
                    - filter:
                        status_code_filter:
                          comparison: {op: EQ, value: {default_value: 500, runtime_key: kvroute_500}}
                      body_format_override:
                        json_format:
                          error:
                            message: "The gateway got no pick from the router (%RESPONSE_CODE_DETAILS%); failureMode is FailClose: retry, and check the router"
                            type: server_error
                            param: null
                            code: router_unavailable
                route_config:
                  name: inference
                  virtual_hosts:
                    - name: inference
                      domains: ["*"]
                      routes:
                        # The router named the pod (ext_proc set the header; the client's copy
                        # was removed before): forward there.
                        - match:
                            prefix: /
                            headers:
                              - name: x-gateway-destination-endpoint
                                present_match: true
                          route:
                            cluster: original_destination
                            # Streams (SSE) last as long as generation does.
                            timeout: 0s
                            idle_timeout: 300s
                          # The pod that answered, read back by the router (GIE's
                          # x-gateway-destination-endpoint-served).
                          response_headers_to_add:
                            - header: {key: x-gateway-destination-endpoint-served, value: "%UPSTREAM_REMOTE_ADDRESS%"}
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
                        # No pick: the router was unreachable and failureMode is FailOpen.
                        {{- if and $failOpen $envoy.failOpenBackend }}
                        - match: {prefix: /}
                          route:
                            cluster: fail_open
                            timeout: 0s
                            idle_timeout: 300s
                        {{- else }}
                        - match: {prefix: /}
                          direct_response:
                            status: 503
                            body:
                              inline_string: '{"error":{"message":"The router (endpoint picker) is unavailable and no fail-open backend is configured (router.envoy.failOpenBackend)","type":"service_unavailable","param":null,"code":"router_unavailable"}}'
                          response_headers_to_add:
                            - header: {key: content-type, value: application/json}
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
                        {{- end }}
                http_filters:
                  # A client must not pick the pod itself: only the router sets this header.
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations:
                        request_mutations:
                          - remove: x-gateway-destination-endpoint
                          # Tenant, priority and other kvroute headers are trusted from the
                          # router's side only.
                          - remove_on_match:
                              key_matcher: {prefix: x-kvroute-}
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {cluster_name: kvroute_ext_proc}
                        timeout: 30s
                      # FailClose: without the router's answer the request fails (5xx).
                      # FailOpen: it continues without a pick, to router.envoy.failOpenBackend.
                      failure_mode_allow: {{ $failOpen }}
                      # GIE: the data plane may pass a subset hint; the router reads it here.
                      metadata_options:
                        forwarding_namespaces:
                          untyped: [envoy.lb.subset_hint, envoy.lb]
                      message_timeout: {{ $envoy.messageTimeout }}
                      processing_mode:
                        request_header_mode: SEND
                        request_body_mode: {{ $envoy.requestBodyMode }}
                        request_trailer_mode: {{ ternary "SEND" "SKIP" $fullDuplexReq }}
                        response_header_mode: SEND
                        response_body_mode: {{ $envoy.responseBodyMode }}
                        response_trailer_mode: {{ ternary "SEND" "SKIP" $fullDuplexResp }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: health
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $envoy.healthPort }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: health
                route_config:
                  name: health
                  virtual_hosts:
                    - name: health
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          direct_response: {status: 404}
                http_filters:
                  - name: envoy.filters.http.health_check
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
                      pass_through_mode: false
                      headers:
                        - name: ":path"
                          string_match: {exact: /ready}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    # The router's ext_proc server in the same pod (HTTP/2, plaintext, loopback).
    - name: kvroute_ext_proc
      type: STATIC
      connect_timeout: 1s
      lb_policy: ROUND_ROBIN
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      load_assignment:
        cluster_name: kvroute_ext_proc
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: {{ .Values.router.ports.extProc }}}
    {{- if and $failOpen $envoy.failOpenBackend }}
    # FailOpen: where requests go when the router cannot be asked (no KV/load awareness).
    - name: fail_open
      type: STRICT_DNS
      lb_policy: ROUND_ROBIN
      connect_timeout: {{ $envoy.connectTimeout }}
      load_assignment:
        cluster_name: fail_open
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {{ (splitList ":" $envoy.failOpenBackend) | first }}
                      port_value: {{ (splitList ":" $envoy.failOpenBackend) | last }}
    {{- end }}
    # The model server the router picked, read from the header it set.
    - name: original_destination
      type: ORIGINAL_DST
      lb_policy: CLUSTER_PROVIDED
      connect_timeout: {{ $envoy.connectTimeout }}
      original_dst_lb_config:
        use_http_header: true
        http_header_name: x-gateway-destination-endpoint
      circuit_breakers:
        thresholds:
          - max_connections: 40000
            max_pending_requests: 40000
            max_requests: 40000
            max_retries: 1024
{{- end -}}
