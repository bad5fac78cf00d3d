{{/*
Fail fast with a message naming the value, for what values.schema.json cannot express
(cross-field rules) and as a second line of defence when a schema is skipped
(`helm template --skip-schema-validation`). Included once, from server.yaml.
*/}}
{{- define "fanout.validate" -}}
{{- $_ := required "image.repository is required (the fanout runtime image, e.g. fanout/runtime)" .Values.image.repository }}
{{- $_ := required "image.tag is required (`make images` prints the content-hash tag; `make deploy` passes it)" .Values.image.tag }}

{{- $db := .Values.database }}
{{- if not (has $db.type (list "postgres" "external" "sqlite")) }}
{{- fail (printf "database.type must be one of postgres, external, sqlite; got %q" $db.type) }}
{{- end }}
{{- if eq $db.type "external" }}
{{- $_ := required "database.external.existingSecret is required when database.type is external (a Secret with the SQLAlchemy URL)" $db.external.existingSecret }}
{{- end }}

{{- $replicas := .Values.server.replicas }}
{{- if lt (int $replicas) 1 }}
{{- fail (printf "server.replicas must be an integer >= 1, got %v" $replicas) }}
{{- end }}
{{- if and (eq $db.type "sqlite") (gt (int $replicas) 1) }}
{{- fail (printf "server.replicas must be 1 with database.type sqlite (one process owns the SQLite file; got %v): use database.type postgres or external for several API replicas" $replicas) }}
{{- end }}
{{- if eq $db.type "postgres" }}
{{- $per := add (int (index .Values.server.settings "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE" | default "5")) (int (index .Values.server.settings "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW" | default "10")) }}
{{- $need := add 10 (mul $per (add1 (int $replicas))) }}
{{- if gt (int $need) (int $db.postgres.maxConnections) }}
{{- fail (printf "database.postgres.maxConnections (%v) is too small for server.replicas %v: %v API replicas + the services pod, each with up to %v connections (POOL_SIZE + MAX_OVERFLOW of server.settings), need %v" $db.postgres.maxConnections $replicas $replicas $per $need) }}
{{- end }}
{{- end }}

{{- $st := .Values.storage }}
{{- if not (has $st.type (list "objectStore" "s3" "pvc" "hostPath")) }}
{{- fail (printf "storage.type must be one of objectStore, s3, pvc, hostPath; got %q" $st.type) }}
{{- end }}
{{- if eq $st.type "s3" }}
{{- $_ := required "storage.s3.bucket is required when storage.type is s3" $st.s3.bucket }}
{{- $_ := required "storage.s3.existingSecret is required when storage.type is s3 (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)" $st.s3.existingSecret }}
{{- end }}

{{- $r := .Values.reaper }}
{{- if $r.enabled }}
{{- range $key := list "interval" "staleAfter" "maxDeliveries" }}
{{- if lt (float64 (index $r $key)) 1.0 }}
{{- fail (printf "reaper.%s must be >= 1, got %v" $key (index $r $key)) }}
{{- end }}
{{- end }}
{{- /* A worker counts as dead after staleAfter seconds without a heartbeat. It beats every
       FANOUT_HEARTBEAT_SECONDS (5, or a pool's extraEnv); a slow server or a busy worker
       delays a beat, so demand 3 intervals of slack or live workers lose their runs. */}}
{{- $beat := 5.0 }}
{{- range $pool, $spec := .Values.pools }}
{{- range (and $spec $spec.extraEnv) | default list }}
{{- if and (eq .name "FANOUT_HEARTBEAT_SECONDS") .value }}
{{- $beat = maxf $beat (float64 .value) }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt (float64 $r.staleAfter) (mulf 3 $beat) }}
{{- fail (printf "reaper.staleAfter must be at least 3 times the workers' heartbeat (FANOUT_HEARTBEAT_SECONDS, %vs): at least %v, got %v" $beat (mulf 3 $beat) $r.staleAfter) }}
{{- end }}
{{- end }}

{{- $known := list "replicas" "limit" "tasks" "warmProcessPool" "resources" "nodeSelector" "tolerations" "affinity" "terminationGracePeriodSeconds" "podDisruptionBudget" "extraEnv" "autoscaling" }}
{{- range $pool, $spec := .Values.pools }}
{{- if not (regexMatch "^[a-z]([a-z0-9-]{0,28}[a-z0-9])?$" $pool) }}
{{- fail (printf "pools.%s: a pool name must be a lowercase DNS label of at most 30 characters (it becomes part of resource names and FANOUT_POOL)" $pool) }}
{{- end }}
{{- if and $spec (not $spec.tasks) }}
{{- fail (printf "pools.%s.tasks is required: the module:attribute references its workers serve, e.g. [myproject.tasks:resize]" $pool) }}
{{- end }}
{{- if $spec }}
{{- range $key, $_ := $spec }}
{{- if not (has $key $known) }}
{{- fail (printf "pools.%s.%s is not a pool setting; known: %s" $pool $key (join ", " $known)) }}
{{- end }}
{{- end }}
{{- if and (hasKey $spec "replicas") (lt (int $spec.replicas) 0) }}
{{- fail (printf "pools.%s.replicas must be >= 0, got %v" $pool $spec.replicas) }}
{{- end }}
{{- if and (hasKey $spec "limit") (lt (int $spec.limit) 1) }}
{{- fail (printf "pools.%s.limit must be >= 1, got %v" $pool $spec.limit) }}
{{- end }}
{{- $auto := $spec.autoscaling | default dict }}
{{- if $auto.enabled }}
{{- $min := hasKey $auto "minReplicas" | ternary $auto.minReplicas 0 }}
{{- $max := $auto.maxReplicas | default 10 }}
{{- if gt (int $min) (int $max) }}
{{- fail (printf "pools.%s.autoscaling.minReplicas (%v) must not exceed maxReplicas (%v)" $pool $min $max) }}
{{- end }}
{{- if not (and $.Values.reaper.enabled $.Values.metrics.enabled) }}
{{- fail (printf "pools.%s.autoscaling needs reaper.enabled and metrics.enabled: KEDA reads the pool's demand from the reaper's metrics" $pool) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $depKeys := list "name" "entrypoint" "jobVariables" "image" "description" "flowName" }}
{{- $seen := dict }}
{{- range $i, $d := .Values.deployments | default list }}
{{- if not (kindIs "map" $d) }}
{{- fail (printf "deployments[%d] must be a mapping with at least name and entrypoint, got %v" $i $d) }}
{{- end }}
{{- if not $d.name }}
{{- fail (printf "deployments[%d].name is required (the deployment's name: run it as <flow name>/<name>)" $i) }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]*$" (toString $d.name)) }}
{{- fail (printf "deployments[%d].name %q: letters, digits, '.', '_' or '-' only" $i (toString $d.name)) }}
{{- end }}
{{- if hasKey $seen (toString $d.name) }}
{{- fail (printf "deployments[%d].name %q is used more than once" $i (toString $d.name)) }}
{{- end }}
{{- $_ := set $seen (toString $d.name) true }}
{{- if not (regexMatch "^([A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*|/[^:]*[.]py):[A-Za-z_][A-Za-z0-9_]*$" (toString ($d.entrypoint | default ""))) }}
{{- fail (printf "deployments[%d] (%s): entrypoint %q must be package.module:flow or /absolute/path/script.py:flow" $i (toString $d.name) (toString ($d.entrypoint | default ""))) }}
{{- end }}
{{- range $key, $_ := $d }}
{{- if not (has $key $depKeys) }}
{{- fail (printf "deployments[%d].%s is not a deployment setting; known: %s" $i $key (join ", " $depKeys)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
