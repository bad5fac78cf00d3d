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

{{/* "true" when the server runs in Prefect's HA layout (API replicas, services, Redis,
migrations Job): every database but SQLite, which one process must own. */}}
{{- define "fanout.serverHA" -}}
{{- if ne .Values.database.type "sqlite" }}true{{ end }}
{{- end }}

{{- define "fanout.redisName" -}}{{ include "fanout.componentName" (list . "redis") }}{{- end }}
{{- define "fanout.servicesName" -}}{{ include "fanout.componentName" (list . "server-services") }}{{- end }}
{{/* The headless Service whose addresses are the API replicas (workers' FANOUT_API_REPLICAS). */}}
{{- define "fanout.replicasName" -}}{{ include "fanout.componentName" (list . "server-replicas") }}{{- end }}

{{/* Environment of every Prefect server process (API replicas, services, migrations):
database, auth, the HA layout's Redis (fanout.settings.HA_SERVER_SETTINGS; a chart test
keeps them equal) and server.settings. */}}
{{- define "fanout.serverEnv" -}}
{{- $db := .Values.database }}
- name: PREFECT_SERVER_ANALYTICS_ENABLED
  value: "false"
- name: PREFECT_UI_API_URL
  value: {{ .Values.server.uiApiUrl | quote }}
{{- if .Values.auth.enabled }}
# Basic auth on every API route except GET /api/health and /api/ready (the probes).
- name: PREFECT_SERVER_API_AUTH_STRING
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.authSecretName" . }}
      key: auth-string
{{- end }}
- name: PREFECT_API_DATABASE_CONNECTION_URL
  {{- if eq $db.type "postgres" }}
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.postgresName" . }}
      key: connection-url
  {{- else if eq $db.type "external" }}
  valueFrom:
    secretKeyRef:
      name: {{ $db.external.existingSecret }}
      key: {{ $db.external.key }}
  {{- else }}
  value: sqlite+aiosqlite:////data/prefect.db
  {{- end }}
{{- if include "fanout.serverHA" . }}
# Migrations run once, in the migrations Job; API replicas and services wait for it.
- name: PREFECT_API_DATABASE_MIGRATE_ON_START
  value: "false"
- name: PREFECT_MESSAGING_BROKER
  value: prefect_redis.messaging
- name: PREFECT_MESSAGING_CACHE
  value: prefect_redis.messaging
- name: PREFECT_SERVER_EVENTS_CAUSAL_ORDERING
  value: prefect_redis.ordering
- name: PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE
  value: prefect_redis.lease_storage
- name: PREFECT_REDIS_MESSAGING_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.redisName" . }}
      key: url
- name: PREFECT_SERVER_DOCKET_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fanout.redisName" . }}
      key: url
# prefect-redis publishes events in batches of 5 or every 10 s: runs' last events then
# reached the recorder and waiting callers up to 10 s late.
- name: PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE
  value: "1"
{{- end }}
{{- range $name, $value := .Values.server.settings }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .Values.server.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Init container of the server pods: wait until PostgreSQL accepts connections. */}}
{{- define "fanout.waitForDatabase" -}}
- name: wait-for-database
  image: {{ include "fanout.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import socket, sys, time
      host, port = sys.argv[1], int(sys.argv[2])
      for attempt in range(300):
          try:
              socket.create_connection((host, port), timeout=2).close()
              sys.exit(0)
          except OSError as exc:
              if attempt % 15 == 0:
                  print(f"waiting for {host}:{port}: {exc}", flush=True)
              time.sleep(2)
      sys.exit(f"{host}:{port} did not answer in 10 minutes")
    - {{ include "fanout.postgresName" . }}
    - "5432"
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- include "fanout.smallResources" . | nindent 4 }}
  volumeMounts:
    {{- include "fanout.tmpVolumeMount" . | nindent 4 }}
{{- end }}

{{/* Init container of the API replicas and the services: wait until the migrations Job
has brought the database to this image's Prefect (fanout.migrations). */}}
{{- define "fanout.waitForMigrations" -}}
- name: wait-for-migrations
  image: {{ include "fanout.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python, -m, fanout.migrations, --timeout, "1800"]
  env:
    {{- include "fanout.serverEnv" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 128Mi
      ephemeral-storage: 16Mi
    limits:
      memory: 384Mi
      ephemeral-storage: 64Mi
  volumeMounts:
    {{- include "fanout.tmpVolumeMount" . | nindent 4 }}
{{- end }}

{{- define "fanout.smallResources" -}}
requests:
  cpu: 10m
  memory: 32Mi
  ephemeral-storage: 16Mi
limits:
  memory: 64Mi
  ephemeral-storage: 64Mi
{{- end }}

{{/* The migrations Job's pod template (server-ha.yaml names the Job after its hash). */}}
{{- define "fanout.migrationsPod" -}}
{{- $db := .Values.database -}}
metadata:
  labels:
    {{- include "fanout.labels" (list . "migrate") | nindent 4 }}
    fanout.io/database-client: "true"
spec:
  {{- include "fanout.podCommon" . | nindent 2 }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  restartPolicy: OnFailure
  {{- if eq $db.type "postgres" }}
  initContainers:
    {{- include "fanout.waitForDatabase" . | nindent 4 }}
  {{- end }}
  containers:
    - name: migrate
      image: {{ include "fanout.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: [prefect, server, database, upgrade, -y]
      env:
        {{- include "fanout.serverEnv" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.server.migrations.resources | nindent 8 }}
      volumeMounts:
        {{- include "fanout.tmpVolumeMount" . | nindent 8 }}
  volumes:
    {{- include "fanout.tmpVolume" . | nindent 4 }}
  {{- with .Values.server.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.server.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
