{{/*
Names: DNS-1123 labels, at most 63 characters.
*/}}
{{- define "extauthz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "extauthz.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service: room for the suffix within 63 characters. */}}
{{- define "extauthz.headlessName" -}}
{{- printf "%s-headless" (include "extauthz.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "extauthz.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "extauthz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "extauthz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "extauthz.labels" -}}
helm.sh/chart: {{ include "extauthz.chart" . }}
{{ include "extauthz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: ext-authz
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "extauthz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "extauthz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "extauthz.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the policy, and the policy file's path in the container. */}}
{{- define "extauthz.configMapName" -}}
{{- default (include "extauthz.fullname" .) .Values.existingConfigMap }}
{{- end }}

{{- define "extauthz.configPath" -}}
{{- if .Values.existingConfigMap }}
{{- printf "/etc/extauthz/%s" .Values.existingConfigMapKey }}
{{- else }}
{{- print "/etc/extauthz/config.yaml" }}
{{- end }}
{{- end }}

{{/* The gRPC Service as Envoy and Istio address it. */}}
{{- define "extauthz.grpcHost" -}}
{{- printf "%s.%s.svc.%s" (include "extauthz.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "extauthz.headlessHost" -}}
{{- printf "%s.%s.svc.%s" (include "extauthz.headlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
Settings that cannot be expressed in values.schema.json: fail the render with the reason.
*/}}
{{- define "extauthz.validate" -}}
{{- $drain := add .Values.server.preStopSleepSeconds .Values.server.graceSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed server.preStopSleepSeconds + server.graceSeconds (%v): the kubelet would kill extauthz while it drains" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if not (or .Values.existingConfigMap .Values.config) }}
{{- fail "set `config` (the policy) or `existingConfigMap`: extauthz does not start without a policy" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.resources)) }}
{{- fail "autoscaling.enabled needs resources.requests.cpu: the HorizontalPodAutoscaler scales on CPU utilization of the request" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- end }}
