{{/* Chart name, at most 63 characters. */}}
{{- define "mongo-watcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "mongo-watcher.fullname" -}}
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

{{- define "mongo-watcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mongo-watcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mongo-watcher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mongo-watcher.labels" -}}
helm.sh/chart: {{ include "mongo-watcher.chart" . }}
{{ include "mongo-watcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mongo-watcher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mongo-watcher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding MONGO_WATCHER_API_TOKEN and MONGO_PASSWORD. */}}
{{- define "mongo-watcher.secretName" -}}
{{- default (include "mongo-watcher.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "mongo-watcher.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The config file: .Values.config with http.listen defaulted to the service port, so the probes
and the Service reach the control plane.
*/}}
{{- define "mongo-watcher.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $http := deepCopy (get $config "http" | default dict) }}
{{- if not (hasKey $http "listen") }}
{{- $_ := set $http "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) }}
{{- end }}
{{- $_ := set $config "http" $http }}
{{- if hasKey $config "leases" }}
{{- fail "config.leases: set leases.enabled, leases.table and leases.ttl instead (the chart writes config.leases from them and sizes the Deployment for them)" }}
{{- end }}
{{- if .Values.leases.enabled }}
{{- if not (get (get $config "checkpoints" | default dict) "table") }}
{{- fail "leases.enabled needs config.checkpoints.table: checkpoint writes are fenced by the lease" }}
{{- end }}
{{- $_ := set $config "leases" (dict "table" .Values.leases.table "ttl" .Values.leases.ttl) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Replicas: replicaCount, or 2 with leases and 1 without when it is empty. More than 1 only with
leases: without them every replica would run every watcher.
*/}}
{{- define "mongo-watcher.replicas" -}}
{{- $replicas := .Values.replicaCount }}
{{- if kindIs "invalid" $replicas }}
{{- $replicas = ternary 2 1 (.Values.leases.enabled | default false) }}
{{- end }}
{{- $replicas = int $replicas }}
{{- if and (gt $replicas 1) (not .Values.leases.enabled) }}
{{- fail (printf "replicaCount %d needs leases.enabled: without leases watchers are not sharded across replicas, and two replicas would conflict on the same checkpoints (0 or 1 without leases)" $replicas) }}
{{- end }}
{{- $replicas }}
{{- end }}
