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
The config's server.drainSeconds: how long extauthz keeps answering, NOT_SERVING, after SIGTERM.
*/}}
{{- define "extauthz.drainSeconds" -}}
{{- if .Values.existingConfigMap }}
{{- .Values.existingConfigMapDrainSeconds }}
{{- else }}
{{- dig "server" "drainSeconds" 5 (.Values.config | default dict) }}
{{- end }}
{{- end }}

{{/*
From the start of termination to the process's exit: the preStop sleep, then (after SIGTERM)
the drain, then the grace for checks in flight. Not rounded.
*/}}
{{- define "extauthz.shutdownSeconds" -}}
{{- addf .Values.server.preStopSleepSeconds (include "extauthz.drainSeconds" . | float64) .Values.server.graceSeconds }}
{{- end }}

{{/* The kubelet's deadline: the value given, else the shutdown rounded up plus the margin. */}}
{{- define "extauthz.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "extauthz.shutdownSeconds" . | float64 | ceil | int) .Values.server.terminationMarginSeconds }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Mi in a "<n>Mi" value, as an integer. */}}
{{- define "extauthz.mebibytes" -}}
{{- trimSuffix "Mi" . | int }}
{{- end }}

{{/*
The container's resources: .Values.resources, with memory = base + workers x perWorker.
*/}}
{{- define "extauthz.resources" -}}
{{- $workers := int .Values.workers }}
{{- $memory := dict }}
{{- range $part := list "request" "limit" }}
{{- $spec := get $.Values.memory $part }}
{{- $mi := add (include "extauthz.mebibytes" $spec.base | int) (mul $workers (include "extauthz.mebibytes" $spec.perWorker | int)) }}
{{- $_ := set $memory $part $mi }}
{{- end }}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- $_ := set $resources "requests" (merge (dict "memory" (printf "%dMi" (int $memory.request))) ($resources.requests | default dict)) }}
{{- $_ := set $resources "limits" (merge (dict "memory" (printf "%dMi" (int $memory.limit))) ($resources.limits | default dict)) }}
{{- toYaml $resources }}
{{- end }}

{{/* Where the TLS files are, in the container. */}}
{{- define "extauthz.tlsDir" -}}
/etc/extauthz/tls
{{- end }}

{{/* The Secret holding the serving certificate and key. */}}
{{- define "extauthz.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "extauthz.fullname" . | trunc 59 | trimSuffix "-") }}
{{- else }}
{{- .Values.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* Where the shared cache's files are, in the container: signing-key, password, ca.crt. */}}
{{- define "extauthz.sharedCacheDir" -}}
/var/run/secrets/extauthz-shared-cache
{{- end }}

{{/* The config's server.sharedCache when sharedCache.enabled: the uri and the mounted files. */}}
{{- define "extauthz.sharedCacheSettings" -}}
{{- $dir := include "extauthz.sharedCacheDir" . }}
{{- with .Values.sharedCache }}
{{- $settings := dict "uri" .uri "signingKeyFile" (printf "%s/signing-key" $dir) "timeoutMilliseconds" .timeoutMilliseconds }}
{{- if .passwordSecret.name }}
{{- $_ := set $settings "passwordFile" (printf "%s/password" $dir) }}
{{- end }}
{{- if or .ca.secretName .ca.configMapName }}
{{- $_ := set $settings "caFile" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- toYaml $settings }}
{{- end }}
{{- end }}

{{/*
The TCP port of the shared cache's server: networkPolicy.egress.sharedCache.port, else the port
of sharedCache.uri (after any user name), else Redis's 6379.
*/}}
{{- define "extauthz.sharedCachePort" -}}
{{- $port := .Values.networkPolicy.egress.sharedCache.port }}
{{- if kindIs "invalid" $port }}
{{- $authority := regexReplaceAll "^rediss?://([^/?#]*).*$" .Values.sharedCache.uri "${1}" }}
{{- $hostPort := regexReplaceAll "^.*@" $authority "" }}
{{- $port = regexFind "[0-9]+$" (regexFind ":[0-9]+$" $hostPort) | default "6379" }}
{{- end }}
{{- $port | int }}
{{- end }}

{{/*
The Secrets and ConfigMap the shared cache's files come from, with their resourceVersion when
Helm can read them (install, upgrade; not `helm template`): a pod template annotation that
changes with them, so that `helm upgrade` rolls the pods onto a rotated key or password
(extauthz reads them at start only). Names and versions, never data.
*/}}
{{- define "extauthz.sharedCacheSources" -}}
{{- $sources := list }}
{{- with .Values.sharedCache }}
{{- $secrets := compact (list .signingKeySecret.name .passwordSecret.name .ca.secretName) | uniq }}
{{- range $secrets }}
{{- $found := lookup "v1" "Secret" $.Release.Namespace . }}
{{- $sources = append $sources (printf "Secret/%s@%s" . (dig "metadata" "resourceVersion" "" ($found | default dict))) }}
{{- end }}
{{- with .ca.configMapName }}
{{- $found := lookup "v1" "ConfigMap" $.Release.Namespace . }}
{{- $sources = append $sources (printf "ConfigMap/%s@%s" . (dig "metadata" "resourceVersion" "" ($found | default dict))) }}
{{- end }}
{{- end }}
{{- join "," $sources }}
{{- end }}

{{/*
The policy as the ConfigMap serves it: .Values.config, with server.tls when tls.enabled and
server.sharedCache when sharedCache.enabled.
*/}}
{{- define "extauthz.policy" -}}
{{- $config := deepCopy .Values.config }}
{{- $server := $config.server | default dict }}
{{- if .Values.tls.enabled }}
{{- $dir := include "extauthz.tlsDir" . }}
{{- $tls := dict "certFile" (printf "%s/tls.crt" $dir) "keyFile" (printf "%s/tls.key" $dir) }}
{{- if .Values.tls.requireClientCert }}
{{- $_ := set $tls "clientCaFile" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- end }}
{{- if .Values.sharedCache.enabled }}
{{- $_ := set $server "sharedCache" (include "extauthz.sharedCacheSettings" . | fromYaml) }}
{{- end }}
{{- if $server }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Every Service name a caller may use: short to fully qualified, ClusterIP and headless.
*/}}
{{- define "extauthz.dnsNames" -}}
{{- $names := list }}
{{- $services := list (include "extauthz.fullname" .) }}
{{- if .Values.service.headless }}
{{- $services = append $services (include "extauthz.headlessName" .) }}
{{- end }}
{{- range $services }}
{{- $names = concat $names (list . (printf "%s.%s" . $.Release.Namespace) (printf "%s.%s.svc" . $.Release.Namespace) (printf "%s.%s.svc.%s" . $.Release.Namespace $.Values.clusterDomain)) }}
{{- end }}
{{- toYaml (concat $names .Values.tls.certManager.extraDnsNames) }}
{{- end }}

{{/*
The HTTP wire's Service port, when httpWire.enabled: appProtocol tells Istio and Gateway API
implementations it is HTTP/1.1, over TLS when tls.enabled (server.tls serves both listeners).
*/}}
{{- define "extauthz.httpWireServicePort" -}}
- name: http-authz
  port: {{ .Values.httpWire.port }}
  targetPort: http-authz
  protocol: TCP
  appProtocol: {{ ternary "https" "http" .Values.tls.enabled }}
{{- end }}

{{/*
For the HTTP wire's Istio provider in NOTES.txt, as YAML lists in lower case without
duplicates: the client headers a check must carry (the policy's token headers, then the request
id and the trace context), and the headersFromClaims names an allow sets (sorted). Envoy's
http_service forwards and copies only the headers listed.
*/}}
{{- define "extauthz.checkHeaders" -}}
{{- $headers := list "authorization" }}
{{- range (.Values.config | default dict).deployments }}
{{- with dig "authentication" "tokenHeader" "" . }}
{{- $headers = append $headers (lower .) }}
{{- end }}
{{- end }}
{{- toYaml (concat (uniq $headers) (list "x-request-id" "traceparent" "tracestate")) }}
{{- end }}

{{- define "extauthz.identityHeaders" -}}
{{- $headers := list }}
{{- range (.Values.config | default dict).deployments }}
{{- range $name, $_ := .headersFromClaims }}
{{- $headers = append $headers (lower $name) }}
{{- end }}
{{- end }}
{{- toYaml ($headers | uniq | sortAlpha) }}
{{- end }}

{{/* Probes through the admin port's /readyz and /healthz instead of gRPC health: see values. */}}
{{- define "extauthz.httpProbes" -}}
{{- if or .Values.tls.enabled (gt (int .Values.workers) 1) }}true{{ end }}
{{- end }}

{{/* The labels of the `helm test` Pod: the release's, but never the Deployment's selector. */}}
{{- define "extauthz.testLabels" -}}
helm.sh/chart: {{ include "extauthz.chart" . }}
app.kubernetes.io/name: {{ printf "%s-test" (include "extauthz.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Settings that cannot be expressed in values.schema.json: fail the render with the reason.
*/}}
{{- define "extauthz.validate" -}}
{{- $shutdown := include "extauthz.shutdownSeconds" . | float64 }}
{{- $grace := include "extauthz.terminationGracePeriodSeconds" . | float64 }}
{{- if le $grace $shutdown }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed server.preStopSleepSeconds + drainSeconds + server.graceSeconds (%v + %v + %v = %v): the kubelet would kill extauthz while it drains" $grace .Values.server.preStopSleepSeconds (include "extauthz.drainSeconds" .) .Values.server.graceSeconds $shutdown) }}
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
{{- if or (dig "requests" "memory" "" .Values.resources) (dig "limits" "memory" "" .Values.resources) }}
{{- fail "set memory with memory.request and memory.limit (base + perWorker), not resources.*.memory: it follows `workers`" }}
{{- end }}
{{- range .Values.server.extraArgs }}
{{- if hasPrefix "--workers" . }}
{{- fail "set the number of server processes with `workers`, not server.extraArgs: memory and probes follow it" }}
{{- end }}
{{- if hasPrefix "--http-listen" . }}
{{- fail "turn the HTTP wire on with `httpWire.enabled`, not server.extraArgs: the container port, the Services, the NetworkPolicy and the Istio policy follow it" }}
{{- end }}
{{- end }}
{{- if lt (include "extauthz.mebibytes" .Values.memory.limit.base | int) (include "extauthz.mebibytes" .Values.memory.request.base | int) }}
{{- fail "memory.limit.base must be >= memory.request.base" }}
{{- end }}
{{- if lt (include "extauthz.mebibytes" .Values.memory.limit.perWorker | int) (include "extauthz.mebibytes" .Values.memory.request.perWorker | int) }}
{{- fail "memory.limit.perWorker must be >= memory.request.perWorker" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if eq (len (compact (list .Values.tls.existingSecret (ternary "certManager" "" .Values.tls.certManager.enabled)))) 1 | not }}
{{- fail "tls.enabled needs exactly one of tls.existingSecret and tls.certManager.enabled" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name: the Issuer or ClusterIssuer that signs the certificate" }}
{{- end }}
{{- if and (not .Values.existingConfigMap) (dig "server" "tls" "" (.Values.config | default dict)) }}
{{- fail "tls.enabled sets config.server.tls itself (the mounted files): leave config.server.tls out" }}
{{- end }}
{{- else if or .Values.tls.requireClientCert .Values.tls.existingSecret .Values.tls.certManager.enabled }}
{{- fail "tls.requireClientCert, tls.existingSecret and tls.certManager take effect with tls.enabled: true" }}
{{- end }}
{{- if .Values.httpWire.enabled }}
{{- range $name, $port := .Values.ports }}
{{- if eq (int $port) (int $.Values.httpWire.port) }}
{{- fail (printf "httpWire.port (%v) is also ports.%s: extauthz could not open both listeners" $.Values.httpWire.port $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.sharedCache }}
{{- if .enabled }}
{{- if not .uri }}
{{- fail "sharedCache.enabled needs sharedCache.uri: the redis:// or rediss:// address of your Redis or Valkey (redis://<host>:<port>/<db>)" }}
{{- end }}
{{- if regexMatch "^rediss?://[^/?#@]*:[^/?#@]*@" .uri }}
{{- fail "sharedCache.uri holds a password: put it in a Secret and name it in sharedCache.passwordSecret (the config is no place for a secret)" }}
{{- end }}
{{- if not .signingKeySecret.name }}
{{- fail "sharedCache.enabled needs sharedCache.signingKeySecret.name: an existing Secret holding the fleet's signing key (at least 32 bytes: openssl rand -hex 32) under sharedCache.signingKeySecret.key" }}
{{- end }}
{{- if and .ca.secretName .ca.configMapName }}
{{- fail "sharedCache.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if and (or .ca.secretName .ca.configMapName) (not (hasPrefix "rediss://" .uri)) }}
{{- fail "sharedCache.ca needs a rediss:// sharedCache.uri: a CA is for TLS" }}
{{- end }}
{{- if and (not $.Values.existingConfigMap) (dig "server" "sharedCache" "" ($.Values.config | default dict)) }}
{{- fail "sharedCache.enabled sets config.server.sharedCache itself (the uri and the mounted files): leave config.server.sharedCache out" }}
{{- end }}
{{- if and $.Values.networkPolicy.enabled $.Values.networkPolicy.egress.enabled (not $.Values.networkPolicy.egress.sharedCache.to) }}
{{- fail "networkPolicy.egress.enabled with sharedCache.enabled needs networkPolicy.egress.sharedCache.to: the Redis or Valkey pods (podSelector, namespaceSelector) or its ipBlock. Without it no replica could reach the shared cache" }}
{{- end }}
{{- else if or .uri .signingKeySecret.name .passwordSecret.name .ca.secretName .ca.configMapName }}
{{- fail "sharedCache.uri, signingKeySecret, passwordSecret and ca take effect with sharedCache.enabled: true" }}
{{- end }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.grpcFrom) }}
{{- fail "networkPolicy.grpcFrom is empty: nothing could call extauthz. Name the callers (the gateways' pods), or allow every pod with [{namespaceSelector: {}}]" }}
{{- end }}
{{- if and .Values.istio.enabled (not .Values.istio.principals) }}
{{- fail "istio.principals is empty: the ALLOW policy would let no gateway call extauthz. Name the gateways' service accounts" }}
{{- end }}
{{- end }}
