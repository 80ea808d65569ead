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
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ $envoy.adminPort }}}
static_resources:
  listeners:
    - name: inference
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $envoy.port }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: inference
                codec_type: AUTO
                route_config:
                  name: inference
                  virtual_hosts:
                    - name: inference
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          route:
                            cluster: original_destination
                            # Streams (SSE) last as long as generation does.
                            timeout: 0s
                            idle_timeout: 300s
                http_filters:
                  # A client must not pick the pod itself: only the router sets this header.
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations:
                        request_mutations:
                          - remove: x-gateway-destination-endpoint
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {cluster_name: kvroute_ext_proc}
                        timeout: 30s
                      # Without the router's answer there is no destination: fail the request.
                      failure_mode_allow: false
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
