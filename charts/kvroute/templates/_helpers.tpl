{{/*
Names, labels and shared fragments of the kvroute chart.
*/}}

{{- define "kvroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvroute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvroute.operator.fullname" -}}
{{- printf "%s-operator" (include "kvroute.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvroute.router.fullname" -}}
{{- printf "%s-router" (include "kvroute.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kvroute.labels" -}}
helm.sh/chart: {{ include "kvroute.chart" . }}
app.kubernetes.io/name: {{ include "kvroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvroute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component ("operator" or "router"); call with (list $ "router"). */}}
{{- define "kvroute.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "kvroute.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kvroute.componentLabels" -}}
{{- $ := index . 0 -}}
{{ include "kvroute.labels" $ }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kvroute.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "kvroute.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvroute.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create -}}
{{- default (include "kvroute.router.fullname" .) .Values.router.serviceAccount.name -}}
{{- else -}}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The kvroute image (one image: the `kvroute` CLI runs both the operator and the router). */}}
{{- define "kvroute.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
Resources that are cluster-scoped: rules naming them cannot live in a namespaced Role. In
namespaced mode (watchNamespaces set) such rules stay in a ClusterRole, which the chart then
requires to be read-only (see the rbac.yaml templates).
*/}}
{{- define "kvroute.clusterScopedResources" -}}
{{- list "namespaces" "nodes" "persistentvolumes" "customresourcedefinitions" "storageclasses" "clusterroles" "clusterrolebindings" "priorityclasses" "ingressclasses" "runtimeclasses" "apiservices" "mutatingwebhookconfigurations" "validatingwebhookconfigurations" | toJson -}}
{{- end -}}

{{/*
Split a list of PolicyRules into {"cluster": [...], "namespaced": [...]}; returns JSON.
A rule that mixes cluster-scoped and namespaced resources fails the render: split it at the source.
Call with (list $ $rules "what").
*/}}
{{- define "kvroute.splitRules" -}}
{{- $ := index . 0 -}}
{{- $rules := index . 1 -}}
{{- $what := index . 2 -}}
{{- $clusterScoped := include "kvroute.clusterScopedResources" $ | fromJsonArray -}}
{{- $cluster := list -}}
{{- $namespaced := list -}}
{{- range $rule := $rules -}}
{{- $nCluster := 0 -}}
{{- range $r := $rule.resources -}}
{{- if has (first (splitList "/" $r)) $clusterScoped -}}{{- $nCluster = add1 $nCluster -}}{{- end -}}
{{- end -}}
{{- if eq $nCluster 0 -}}
{{- $namespaced = append $namespaced $rule -}}
{{- else if eq $nCluster (len $rule.resources) -}}
{{- $cluster = append $cluster $rule -}}
{{- else -}}
{{- fail (printf "%s RBAC rule mixes cluster-scoped and namespaced resources: %v" $what $rule.resources) -}}
{{- end -}}
{{- end -}}
{{- dict "cluster" $cluster "namespaced" $namespaced | toJson -}}
{{- end -}}

{{/* The rules files, parsed. */}}
{{- define "kvroute.operator.rules" -}}
{{- .Files.Get "files/rbac/operator.yaml" | fromYamlArray | toJson -}}
{{- end -}}
{{- define "kvroute.router.rules" -}}
{{- .Files.Get "files/rbac/router.yaml" | fromYamlArray | toJson -}}
{{- end -}}

{{/* Pod-level security context, shared by operator and router. */}}
{{- define "kvroute.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* Container-level security context, shared by every container the chart runs. */}}
{{- define "kvroute.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* Namespace the example objects go to. */}}
{{- define "kvroute.examples.namespace" -}}
{{- default .Release.Namespace .Values.examples.namespace -}}
{{- end -}}
