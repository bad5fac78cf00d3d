{{/* Chart name, at most 63 characters. */}}
{{- define "fanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: fullnameOverride, else the release name (when it contains the chart name),
else <release>-<chart>; at most 63 characters. Component names are built as
<fullname>-<component>, so keep releases short enough for those too. */}}
{{- define "fanout.fullname" -}}
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

{{/* <fullname>-<component>, at most 63 characters. Call with (list . "server"). */}}
{{- define "fanout.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "fanout.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component. Call with (list . "server"). */}}
{{- define "fanout.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fanout.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of a component. Call with (list . "server"). */}}
{{- define "fanout.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "fanout.chart" $root }}
{{ include "fanout.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: fanout
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The runtime image reference. */}}
{{- define "fanout.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{- define "fanout.serverName" -}}{{ include "fanout.componentName" (list . "server") }}{{- end }}
{{- define "fanout.postgresName" -}}{{ include "fanout.componentName" (list . "postgresql") }}{{- end }}
{{- define "fanout.sharedName" -}}{{ include "fanout.componentName" (list . "shared") }}{{- end }}
{{- define "fanout.workerName" -}}{{ include "fanout.componentName" (list . "worker") }}{{- end }}

{{/* The API URL every client pod uses: the server's Service. */}}
{{- define "fanout.apiUrl" -}}
{{- printf "http://%s:%v/api" (include "fanout.serverName" .) .Values.server.service.port }}
{{- end }}

{{/* "true" when storage goes through the S3 protocol (the user's bucket or the bundled
object server), else empty. */}}
{{- define "fanout.s3Storage" -}}
{{- if has .Values.storage.type (list "s3" "objectStore") }}true{{ end }}
{{- end }}

{{- define "fanout.objectStoreName" -}}{{ include "fanout.componentName" (list . "object-store") }}{{- end }}

{{/* The bundled object server's root keys: the user's Secret, or the generated one. */}}
{{- define "fanout.objectStoreSecretName" -}}
{{- .Values.storage.objectStore.existingSecret | default (include "fanout.objectStoreName" .) }}
{{- end }}

{{/* What the setup hook saves as the s3-bucket block (and, for the bundled server,
creates): bucket, folder, endpoint. */}}
{{- define "fanout.s3Block" -}}
{{- if eq .Values.storage.type "objectStore" }}
{{- toJson (dict "bucket" .Values.storage.objectStore.bucket "folder" .Values.storage.s3.folder "blockName" .Values.storage.s3.blockName "createBucket" true "endpointUrl" (printf "http://%s:7070" (include "fanout.objectStoreName" .))) }}
{{- else if eq .Values.storage.type "s3" }}
{{- toJson .Values.storage.s3 }}
{{- end }}
{{- end }}

{{/* FANOUT_STORAGE: a directory on the shared volume, or a block slug. */}}
{{- define "fanout.storageSetting" -}}
{{- if include "fanout.s3Storage" . }}
{{- printf "s3-bucket/%s" .Values.storage.s3.blockName }}
{{- else }}
{{- print "/shared/fanout" }}
{{- end }}
{{- end }}

{{/* The Secret holding the API's `user:password` (key auth-string): the user's, or the
one auth.yaml generates. */}}
{{- define "fanout.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "fanout.componentName" (list . "auth")) }}
{{- end }}

{{/* PREFECT_API_AUTH_STRING from the auth Secret (nothing when auth is off). */}}
{{- define "fanout.authEnv" -}}
{{- if .Values.auth.enabled }}
- name: PREFECT_API_AUTH_STRING
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.authSecretName" . }}
      key: auth-string
{{- end }}
{{- end }}

{{/* Environment of every pod that talks to the Prefect API: its URL and credentials. */}}
{{- define "fanout.apiEnv" -}}
- name: PREFECT_API_URL
  value: {{ include "fanout.apiUrl" . | quote }}
{{- include "fanout.authEnv" . }}
{{- end }}

{{/* Environment of every pod that submits or runs fanned-out tasks. Our Prefect plugin
(fanout.plugin) points Prefect's default storage at FANOUT_STORAGE, so that a plain @task
needs no storage argument, and makes futures never wait forever; the runtime image turns
it on too, this keeps it on in an image of the user's own. */}}
{{- define "fanout.clientEnv" -}}
{{ include "fanout.apiEnv" . }}
- name: FANOUT_STORAGE
  value: {{ include "fanout.storageSetting" . | quote }}
- name: PREFECT_PLUGINS_ENABLED
  value: "true"
{{- if include "fanout.s3Storage" . }}
{{- include "fanout.s3Env" . }}
{{- end }}
{{- end }}

{{/* S3 credentials from the user's Secret (or the bundled object server's), as
environment variables; boto3 reads them in every process, they are never in a block. */}}
{{- define "fanout.s3Env" }}
{{- $secret := .Values.storage.s3.existingSecret }}
{{- if eq .Values.storage.type "objectStore" }}
{{- $secret = include "fanout.objectStoreSecretName" . }}
- name: AWS_DEFAULT_REGION
  value: us-east-1
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}

{{/* The shared-storage volume (none for s3 and objectStore). */}}
{{- define "fanout.sharedVolume" -}}
{{- if eq .Values.storage.type "pvc" -}}
- name: shared
  persistentVolumeClaim:
    claimName: {{ .Values.storage.pvc.existingClaim | default (include "fanout.sharedName" .) }}
{{- else if eq .Values.storage.type "hostPath" -}}
- name: shared
  hostPath:
    path: {{ .Values.storage.hostPath.path }}
    type: Directory
{{- end }}
{{- end }}

{{- define "fanout.sharedVolumeMount" -}}
{{- if not (include "fanout.s3Storage" .) -}}
- name: shared
  mountPath: /shared
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every runtime pod. */}}
{{- define "fanout.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The emptyDir behind /tmp (HOME, PREFECT_HOME) that a read-only root filesystem needs. */}}
{{- define "fanout.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}
{{- define "fanout.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* {"pool": ["module:attribute", ...]} of every pool (null pools skipped), as JSON. */}}
{{- define "fanout.poolTasks" -}}
{{- $pools := dict }}
{{- range $pool, $spec := .Values.pools }}
{{- if $spec }}{{- $_ := set $pools $pool $spec.tasks }}{{- end }}
{{- end }}
{{- toJson $pools }}
{{- end }}
