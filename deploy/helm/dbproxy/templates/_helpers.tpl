{{/* The release's name prefix, at most 63 characters with any suffix we add. */}}
{{- define "dbproxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dbproxy.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component ("collector" or "injector"). */}}
{{- define "dbproxy.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dbproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "dbproxy.sidecarImage" -}}
{{- if .Values.injector.sidecar.image -}}
{{- .Values.injector.sidecar.image -}}
{{- else -}}
{{- include "dbproxy.image" . -}}
{{- end -}}
{{- end -}}

{{- define "dbproxy.collectorUrl" -}}
{{- printf "http://%s-collector.%s.svc:%d" (include "dbproxy.fullname" .) .Release.Namespace (int .Values.collector.port) -}}
{{- end -}}

{{- define "dbproxy.collectorDatabaseSecret" -}}
{{- .Values.collector.database.existingSecret | default (printf "%s-collector-db" (include "dbproxy.fullname" .)) -}}
{{- end -}}

{{- define "dbproxy.tlsSecret" -}}
{{- printf "%s-injector-tls" (include "dbproxy.fullname" .) -}}
{{- end -}}

{{/* The pod security context every pod of the chart runs with. */}}
{{- define "dbproxy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The container security context every container of the chart runs with. */}}
{{- define "dbproxy.securityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
