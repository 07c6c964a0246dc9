{{/* Names, labels and the computed values the templates share. */}}

{{- define "tokenwire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, plus the chart name when the release name does not contain it. */}}
{{- define "tokenwire.fullname" -}}
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

{{/* Component names: <fullname>-<suffix>, cut so the suffix always survives the 63-character limit. */}}
{{- define "tokenwire.componentName" -}}
{{- $root := index . 0 }}{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "tokenwire.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "tokenwire.server.fullname" -}}{{ include "tokenwire.componentName" (list . "server") }}{{- end }}
{{- define "tokenwire.gateway.fullname" -}}{{ include "tokenwire.componentName" (list . "gateway") }}{{- end }}
{{- define "tokenwire.grpc.serviceName" -}}{{ include "tokenwire.componentName" (list . "grpc") }}{{- end }}
{{- define "tokenwire.grpc.headlessName" -}}{{ include "tokenwire.componentName" (list . "grpc-headless") }}{{- end }}
{{- define "tokenwire.modelClaimName" -}}
{{- .Values.persistence.existingClaim | default (include "tokenwire.componentName" (list . "models")) }}
{{- end }}

{{- define "tokenwire.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenwire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenwire.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokenwire.labels" -}}
helm.sh/chart: {{ include "tokenwire.chart" . }}
{{ include "tokenwire.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenwire
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels / selector labels of one component: (list $ "server"). */}}
{{- define "tokenwire.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "tokenwire.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "tokenwire.componentSelectorLabels" -}}
{{- $root := index . 0 -}}
{{ include "tokenwire.selectorLabels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "tokenwire.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokenwire.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: (list $ "cpu"|"cuda"). A digest pins it; the cuda variant's tag ends in -cuda. */}}
{{- define "tokenwire.image" -}}
{{- $root := index . 0 }}{{- $variant := index . 1 }}
{{- $img := $root.Values.image }}
{{- $tag := default $root.Chart.AppVersion $img.tag }}
{{- if eq $variant "cuda" }}{{ $tag = printf "%s-cuda" $tag }}{{ end }}
{{- if $img.digest }}
{{- printf "%s:%s@%s" $img.repository $tag $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/* The gateway's upstream: the headless Service through gRPC's DNS resolver, so round_robin sees every pod. */}}
{{- define "tokenwire.gateway.upstream" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "tokenwire.grpc.headlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.grpcService.port) }}
{{- end }}

{{/* The torch device: explicit, else cuda when GPUs are requested. */}}
{{- define "tokenwire.server.device" -}}
{{- if .Values.model.device }}{{ .Values.model.device }}{{ else if .Values.server.gpu.enabled }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{/* The --model argument: a directory on the volume, a hub id, or nothing (the embedded demo model). */}}
{{- define "tokenwire.server.modelArg" -}}
{{- if .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.persistence.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- else if .Values.model.id }}
{{- .Values.model.id }}
{{- end }}
{{- end }}

{{- define "tokenwire.hfHome" -}}
{{- printf "%s/.hf" (trimSuffix "/" .Values.persistence.mountPath) }}
{{- end }}

{{- define "tokenwire.usesClaim" -}}
{{- if or .Values.persistence.enabled .Values.persistence.existingClaim }}true{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the pod's budget from the start of preStop to SIGKILL must cover
preStop sleep + drain + grace (+ 5 s for the process to exit). An explicit value below that fails rendering.
(list $ "server"|"gateway")
*/}}
{{- define "tokenwire.terminationGracePeriodSeconds" -}}
{{- $root := index . 0 }}{{- $component := index . 1 }}
{{- $c := index $root.Values $component }}
{{- $needed := addf $c.shutdown.preStopSleepSeconds (default 0 $c.shutdown.drainSeconds) $c.shutdown.graceSeconds 5 | ceil | int }}
{{- if kindIs "invalid" $c.terminationGracePeriodSeconds }}
{{- $needed }}
{{- else if lt (int $c.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "%s.terminationGracePeriodSeconds=%v is below preStopSleepSeconds + drainSeconds + graceSeconds + 5 = %d" $component $c.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- int $c.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
preStop: the `sleep` action where the cluster has it (1.30+, GA 1.34), else the image's `sleep` binary.
(list $ seconds)
*/}}
{{- define "tokenwire.preStop" -}}
{{- $root := index . 0 }}{{- $seconds := int (index . 1) }}
{{- if semverCompare ">=1.30-0" $root.Capabilities.KubeVersion.Version -}}
preStop:
  sleep:
    seconds: {{ $seconds }}
{{- else -}}
preStop:
  exec:
    command: ["sleep", "{{ $seconds }}"]
{{- end }}
{{- end }}

{{/* The API keys Secret the gateway mounts, or "" when the gateway is open. */}}
{{- define "tokenwire.apiKeys.secretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- include "tokenwire.componentName" (list . "api-keys") }}
{{- end }}
{{- end }}

{{- define "tokenwire.apiKeys.secretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}api-keys{{ end }}
{{- end }}

{{/* topologySpreadConstraints with the component's pods as the default labelSelector: (list $ "server" list). */}}
{{- define "tokenwire.topologySpread" -}}
{{- $root := index . 0 }}{{- $component := index . 1 }}
{{- $selector := dict "labelSelector" (dict "matchLabels" (include "tokenwire.componentSelectorLabels" (list $root $component) | fromYaml)) }}
{{- $constraints := list }}
{{- range index . 2 }}
{{- $constraints = append $constraints (merge (deepCopy .) $selector) }}
{{- end }}
{{- toYaml $constraints }}
{{- end }}

{{/* autoscaling/v2 metrics for (list $ "server"|"gateway"). */}}
{{- define "tokenwire.hpaMetrics" -}}
{{- $a := (index (index . 0).Values (index . 1)).autoscaling }}
{{- if not (kindIs "invalid" $a.targetCPUUtilizationPercentage) }}
- type: Resource
  resource:
    name: cpu
    target:
      type: Utilization
      averageUtilization: {{ int $a.targetCPUUtilizationPercentage }}
{{- end }}
{{- if not (kindIs "invalid" $a.targetMemoryUtilizationPercentage) }}
- type: Resource
  resource:
    name: memory
    target:
      type: Utilization
      averageUtilization: {{ int $a.targetMemoryUtilizationPercentage }}
{{- end }}
{{- with $a.metrics }}
{{ toYaml . }}
{{- end }}
{{- end }}
