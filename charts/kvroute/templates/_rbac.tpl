{{/*
RBAC of one component, rendered from its rules file (files/rbac/<component>.yaml, a copy of the
component's Python rules list). Call with (list $ "operator"|"router").

- watchNamespaces empty: one ClusterRole with every rule, bound cluster-wide.
- watchNamespaces set: a Role + RoleBinding per namespace with the namespaced rules, and, only
  if the component has rules on cluster-scoped resources, a ClusterRole holding those, which
  must be read-only (get/list/watch): namespaced installs never get cluster-wide writes.
*/}}
{{- define "kvroute.rbac" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
{{- $fullname := include (printf "kvroute.%s.fullname" $component) $ -}}
{{- $sa := include (printf "kvroute.%s.serviceAccountName" $component) $ -}}
{{- $rules := include (printf "kvroute.%s.rules" $component) $ | fromJsonArray -}}
{{- $labels := include "kvroute.componentLabels" (list $ $component) -}}
{{- if not $.Values.watchNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ $fullname }}
  labels:
    {{- $labels | nindent 4 }}
rules:
  {{- toYaml $rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $fullname }}
  labels:
    {{- $labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $fullname }}
subjects:
  - kind: ServiceAccount
    name: {{ $sa }}
    namespace: {{ $.Release.Namespace }}
{{- else }}
{{- $split := include "kvroute.splitRules" (list $ $rules $component) | fromJson -}}
{{- if $split.cluster }}
{{- range $rule := $split.cluster }}
{{- range $verb := $rule.verbs }}
{{- if not (has $verb (list "get" "list" "watch")) }}
{{- fail (printf "%s: namespaced mode grants only read access cluster-wide, but a rule on %v asks for %q" $component $rule.resources $verb) }}
{{- end }}
{{- end }}
{{- end }}
---
# Read-only access to cluster-scoped resources {{ $component }} needs even in namespaced mode.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ $fullname }}-cluster-read
  labels:
    {{- $labels | nindent 4 }}
rules:
  {{- toYaml $split.cluster | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $fullname }}-cluster-read
  labels:
    {{- $labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $fullname }}-cluster-read
subjects:
  - kind: ServiceAccount
    name: {{ $sa }}
    namespace: {{ $.Release.Namespace }}
{{- end }}
{{- range $ns := $.Values.watchNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ $fullname }}
  namespace: {{ $ns }}
  labels:
    {{- $labels | nindent 4 }}
rules:
  {{- toYaml $split.namespaced | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $fullname }}
  namespace: {{ $ns }}
  labels:
    {{- $labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ $fullname }}
subjects:
  - kind: ServiceAccount
    name: {{ $sa }}
    namespace: {{ $.Release.Namespace }}
{{- end }}
{{- end }}
{{- end -}}
