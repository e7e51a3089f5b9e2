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
{{- toYaml $config }}
{{- end }}
