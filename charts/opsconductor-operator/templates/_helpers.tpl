{{/* The chart's name, or nameOverride. */}}
{{- define "opsconductor-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release name when it already
contains the chart name (`helm install opsconductor-operator ...` gives opsconductor-operator),
else <release>-<chart>.
*/}}
{{- define "opsconductor-operator.fullname" -}}
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

{{/*
Names of cluster-scoped objects: the full name, plus the namespace when the release is not in
opsconductor-system, so that two releases in different namespaces cannot collide.
*/}}
{{- define "opsconductor-operator.clusterName" -}}
{{- if eq .Release.Namespace "opsconductor-system" }}
{{- include "opsconductor-operator.fullname" . }}
{{- else }}
{{- printf "%s-%s" (include "opsconductor-operator.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "opsconductor-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "opsconductor-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "opsconductor-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "opsconductor-operator.labels" -}}
helm.sh/chart: {{ include "opsconductor-operator.chart" . }}
{{ include "opsconductor-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: opsconductor
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's ServiceAccount: also the identity the admission policies exempt. */}}
{{- define "opsconductor-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "opsconductor-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "opsconductor-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The leader-election Lease's name: leaderElection.leaseName, by default the release's full name,
so that two releases in one namespace elect their leaders independently.
*/}}
{{- define "opsconductor-operator.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (include "opsconductor-operator.fullname" .) }}
{{- end }}
