{{/* Names */}}
{{- define "tandem.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "router") */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A NetworkPolicy peer: this release's pods of one component. */}}
{{- define "tandem.peer" -}}
- podSelector:
    matchLabels:
      {{- include "tandem.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- with .ctx.Values.global.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tandem.image" -}}
{{- $img := .Values.global.image -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Restricted pod security (Pod Security Standards "restricted"). */}}
{{- define "tandem.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tandem.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Prefill and decode containers: the above, plus IPC_LOCK with kvTransport.rdma.ipcLock (RDMA
     memory registration). "add" continues the "capabilities" map the helper ends with. */}}
{{- define "tandem.gpuContainerSecurityContext" -}}
{{ include "tandem.containerSecurityContext" . }}
{{- if .Values.kvTransport.rdma.ipcLock }}
  add: ["IPC_LOCK"]
{{- end }}
{{- end -}}

{{/* KV transport settings of a GPU pod, as TANDEM_PREFILL_* / TANDEM_DECODE_* variables:
     (dict "ctx" $ "role" "prefill"). Variables, not flags: an image older than these settings
     ignores them (it has only gRPC) instead of refusing an unknown flag. */}}
{{- define "tandem.kvTransportEnv" -}}
{{- $kvt := .ctx.Values.kvTransport -}}
{{- $w := index .ctx.Values .role -}}
{{- $prefix := printf "TANDEM_%s_" (upper .role) -}}
- name: {{ $prefix }}KV_TRANSPORT
  value: {{ $kvt.mode | quote }}
- name: {{ $prefix }}KV_TRANSPORT_STRICT
  value: {{ $kvt.strict | toString | quote }}
{{- if eq .role "prefill" }}
- name: {{ $prefix }}KV_CHECKSUM
  value: {{ $w.kv.checksum | toString | quote }}
{{- else }}
- name: {{ $prefix }}KV_LEASE_S
  value: {{ $w.kvLeaseSeconds | toString | quote }}
- name: {{ $prefix }}KV_WRITE_LEASE_S
  value: {{ $w.kvWriteLeaseSeconds | toString | quote }}
{{- end }}
{{- end -}}

{{/* Environment every Tandem container gets: a writable HOME on the read-only root fs. */}}
{{- define "tandem.commonEnv" -}}
- name: HOME
  value: /tmp
# Every gRPC call between Tandem's services carries it (tandem/api/cluster_auth.py).
- name: TANDEM_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.clusterSecretName" . }}
      key: {{ .Values.auth.clusterSecret.key }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with .Values.observability.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.Values.observability.tracesSampler | quote }}
{{- with $.Values.observability.tracesSamplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The model directory: a volume, its mount, and (source.type init) the copy step. */}}
{{- define "tandem.modelVolume" -}}
- name: model
{{- $src := .Values.model.source }}
{{- if eq $src.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.source.pvc.claimName is required when model.source.type is pvc" $src.pvc.claimName }}
    readOnly: true
{{- else if eq $src.type "hostPath" }}
  hostPath:
    path: {{ required "model.source.hostPath.path is required when model.source.type is hostPath" $src.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ $src.init.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "tandem.modelVolumeMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if and (eq .Values.model.source.type "pvc") .Values.model.source.pvc.subPath }}
  subPath: {{ .Values.model.source.pvc.subPath }}
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The init step of model.source.type init: (dict "ctx" $ "metadataOnly" bool). The router
     needs only the config and tokenizer, so it skips the weights. */}}
{{- define "tandem.modelInit" -}}
{{- $ := .ctx -}}
{{- $init := $.Values.model.source.init -}}
{{- if eq $.Values.model.source.type "init" }}
initContainers:
  - name: fetch-model
    image: {{ include "tandem.image" $ }}
    imagePullPolicy: {{ $.Values.global.image.pullPolicy }}
    args:
      - model-fetch
      {{- if not $init.uriSecret.name }}
      - --uri
      - {{ required "model.source.init.uri (or uriSecret.name) is required when model.source.type is init" $init.uri | quote }}
      {{- end }}
      - --dest
      - {{ $.Values.model.mountPath | quote }}
      {{- with $init.sha256 }}
      - --sha256
      - {{ . | quote }}
      {{- end }}
      {{- if .metadataOnly }}
      - --metadata-only
      {{- end }}
    env:
      {{- include "tandem.commonEnv" $ | nindent 6 }}
      {{- with $init.uriSecret }}
      {{- if .name }}
      - name: TANDEM_MODEL_FETCH_URI
        valueFrom:
          secretKeyRef:
            name: {{ .name }}
            key: {{ .key }}
      {{- end }}
      {{- end }}
    securityContext:
      {{- include "tandem.containerSecurityContext" $ | nindent 6 }}
    resources:
      requests: {cpu: 500m, memory: 512Mi}
      limits: {memory: 1Gi}
    volumeMounts:
      - name: model
        mountPath: {{ $.Values.model.mountPath }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Keep serving a few seconds after SIGTERM is due: endpoint removal takes a moment to reach
     every router, and connections must not be refused meanwhile. */}}
{{- define "tandem.preStop" -}}
preStop:
  exec:
    command: ["sleep", "5"]
{{- end -}}

{{/* GPUs per pod of a workload (call with its values, e.g. .Values.decode): `gpus` when set
     (0: none, CPU pods), else one per tensor-parallel rank (engine.tensorParallelSize). */}}
{{- define "tandem.gpuCount" -}}
{{- if kindIs "invalid" .gpus -}}
{{- .engine.tensorParallelSize | default 1 | int -}}
{{- else -}}
{{- .gpus | int -}}
{{- end -}}
{{- end -}}

{{/* GPU (and kvTransport.rdma) requests equal limits: call with (dict "ctx" $ "w" .Values.prefill) */}}
{{- define "tandem.gpuResources" -}}
{{- $gpu := .ctx.Values.global.gpuResourceName -}}
{{- $extra := dict -}}
{{- $gpus := include "tandem.gpuCount" .w | int -}}
{{- if $gpus }}{{ $_ := set $extra $gpu $gpus }}{{ end -}}
{{- range $k, $v := .ctx.Values.kvTransport.rdma.resources }}{{ $_ := set $extra $k $v }}{{ end -}}
requests:
  {{- range $k, $v := merge (deepCopy $extra) (.w.resources.requests | default dict) }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
limits:
  {{- range $k, $v := merge (deepCopy $extra) (.w.resources.limits | default dict) }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
{{- end -}}

{{- define "tandem.modelName" -}}
{{- default (base .Values.model.mountPath) .Values.model.name -}}
{{- end -}}

{{/* "true" when a component is deployed: (dict "ctx" $ "component" "kvstore"). kvstore only
     serves prefill routing, so it is off without prefill pods. */}}
{{- define "tandem.enabled" -}}
{{- $v := .ctx.Values -}}
{{- if eq .component "prefill" -}}
{{- if $v.prefill.enabled }}true{{ end -}}
{{- else if eq .component "kvstore" -}}
{{- if and $v.kvstore.enabled $v.prefill.enabled }}true{{ end -}}
{{- else if eq .component "redis" -}}
{{- include "tandem.bundledRedis" .ctx -}}
{{- else -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the chart deploys its own Redis (kvstore on, redis.enabled, no external Redis). */}}
{{- define "tandem.bundledRedis" -}}
{{- $ext := .Values.redis.external -}}
{{- if and .Values.kvstore.enabled .Values.prefill.enabled .Values.redis.enabled (not $ext.url) (not $ext.urlSecret.name) -}}
true
{{- end -}}
{{- end -}}

{{- define "tandem.redisUrl" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else if include "tandem.bundledRedis" . -}}
{{- printf "redis://%s-redis:6379/0" (include "tandem.fullname" .) -}}
{{- else -}}
{{- fail "kvstore needs a Redis: set redis.enabled=true, redis.external.url or redis.external.urlSecret.name" -}}
{{- end -}}
{{- end -}}

{{/* Engine flags of a GPU workload: call with the workload's engine block. */}}
{{- define "tandem.engineArgs" -}}
- --device
- cuda
- --dtype
- {{ .dtype | quote }}
- --block-size
- {{ .blockSize | int64 | quote }}
- --max-num-seqs
- {{ .maxNumSeqs | int64 | quote }}
- --max-num-batched-tokens
- {{ .maxNumBatchedTokens | int64 | quote }}
- --gpu-memory-utilization
- {{ .gpuMemoryUtilization | quote }}
{{- if .maxModelLen }}
- --max-model-len
- {{ .maxModelLen | int64 | quote }}
{{- end }}
{{- if not .enablePrefixCaching }}
- --no-enable-prefix-caching
{{- end }}
{{- if gt (int (.tensorParallelSize | default 1)) 1 }}
- --tensor-parallel-size
- {{ .tensorParallelSize | int64 | quote }}
{{- end }}
{{- end -}}

{{/* Checks across values that values.schema.json cannot express; renders nothing. */}}
{{- define "tandem.validate" -}}
{{- if .Values.prefill.enabled -}}
{{- range $key := list "blockSize" "dtype" -}}
{{- if ne (toString (index $.Values.prefill.engine $key)) (toString (index $.Values.decode.engine $key)) -}}
{{- fail (printf "prefill.engine.%s and decode.engine.%s must be equal: KV pages move between them as they are" $key $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if le (float64 .Values.decode.kvLeaseSeconds) (float64 .Values.decode.kvTimeoutSeconds) -}}
{{- fail (printf "decode.kvLeaseSeconds (%v) must exceed decode.kvTimeoutSeconds (%v): a KV writer's lease must outlive the wait for its pages" .Values.decode.kvLeaseSeconds .Values.decode.kvTimeoutSeconds) -}}
{{- end -}}
{{- if gt (float64 .Values.decode.kvWriteLeaseSeconds) (float64 .Values.decode.kvLeaseSeconds) -}}
{{- fail (printf "decode.kvWriteLeaseSeconds (%v) must not exceed decode.kvLeaseSeconds (%v): the reservation's lease bounds every write lease" .Values.decode.kvWriteLeaseSeconds .Values.decode.kvLeaseSeconds) -}}
{{- end -}}
{{/* Tensor parallelism: a GPU per rank; TP pods move KV over grpc only (README, "Tensor
     parallelism"). */}}
{{- $tps := dict "prefill" (int (.Values.prefill.engine.tensorParallelSize | default 1)) "decode" (int (.Values.decode.engine.tensorParallelSize | default 1)) -}}
{{- range $role := list "prefill" "decode" -}}
{{- if or (eq $role "decode") $.Values.prefill.enabled -}}
{{- $tp := index $tps $role -}}
{{- $gpus := int (include "tandem.gpuCount" (index $.Values $role)) -}}
{{- if and (gt $gpus 0) (lt $gpus $tp) -}}
{{- fail (printf "%s.gpus (%d) is fewer than %s.engine.tensorParallelSize (%d): each rank needs a GPU of its own; set %s.gpus to at least %d, or null to take one per rank" $role $gpus $role $tp $role $tp) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.prefill.enabled -}}
{{- $mode := .Values.kvTransport.mode -}}
{{- if has $mode (list "shm" "cuda-ipc" "nixl") -}}
{{- range $role := list "prefill" "decode" -}}
{{- if gt (index $tps $role) 1 -}}
{{- fail (printf "kvTransport.mode %s with %s.engine.tensorParallelSize %d: tensor-parallel prefill and decode pods move KV over grpc only; use auto or grpc" $mode $role (index $tps $role)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $kvt := .Values.kvTransport -}}
{{- if and .Values.prefill.enabled (has $kvt.mode (list "shm" "cuda-ipc")) (not (and $kvt.hostIPC $kvt.shareDevShm)) -}}
{{- fail (printf "kvTransport.mode %s needs kvTransport.hostIPC and kvTransport.shareDevShm (prefill and decode pods on one node sharing its IPC namespace and /dev/shm); use auto or grpc otherwise" $kvt.mode) -}}
{{- end -}}
{{- if hasKey ($kvt.rdma.resources | default dict) $.Values.global.gpuResourceName -}}
{{- fail (printf "kvTransport.rdma.resources must not name %s: set prefill.gpus and decode.gpus instead" $.Values.global.gpuResourceName) -}}
{{- end -}}
{{- range $component := list "router" "prefill" "decode" "kvstore" "redis" -}}
{{- $res := (index $.Values $component).resources -}}
{{- range $kind := list "requests" "limits" -}}
{{- if hasKey (index $res $kind | default dict) $.Values.global.gpuResourceName -}}
{{- fail (printf "%s.resources.%s must not name %s: set %s.gpus instead (GPU requests equal limits)" $component $kind $.Values.global.gpuResourceName $component) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the Secrets the chart makes or is given (templates/secrets.yaml). */}}
{{- define "tandem.clusterSecretName" -}}
{{- .Values.auth.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "tandem.fullname" .)) -}}
{{- end -}}

{{- define "tandem.apiKeysSecretName" -}}
{{- .Values.auth.apiKeys.existingSecret | default (printf "%s-api-keys" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* Whether the router needs API keys (non-empty when it does). */}}
{{- define "tandem.apiKeysEnabled" -}}
{{- if or .Values.auth.apiKeys.existingSecret .Values.auth.apiKeys.keys .Values.auth.apiKeys.generate }}true{{ end -}}
{{- end -}}

{{- define "tandem.tlsSecretName" -}}
{{- .Values.auth.tls.secretName | default (printf "%s-router-tls" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* Whether kvstore authenticates to Redis with a password from a Secret (non-empty if so). */}}
{{- define "tandem.redisPasswordEnabled" -}}
{{- if or .Values.redis.auth.existingSecret (and (include "tandem.bundledRedis" .) .Values.redis.auth.enabled) }}true{{ end -}}
{{- end -}}

{{- define "tandem.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* The Secrets whose values the chart generates (templates/secrets.yaml), comma-separated;
     empty when every credential comes from an existingSecret (or is off). */}}
{{- define "tandem.generatedSecrets" -}}
{{- $names := list -}}
{{- if not .Values.auth.clusterSecret.existingSecret -}}
{{- $names = append $names (include "tandem.clusterSecretName" .) -}}
{{- end -}}
{{- if and .Values.auth.apiKeys.generate (not .Values.auth.apiKeys.existingSecret) -}}
{{- $names = append $names (include "tandem.apiKeysSecretName" .) -}}
{{- end -}}
{{- if and (include "tandem.bundledRedis" .) .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) -}}
{{- $names = append $names (include "tandem.redisSecretName" .) -}}
{{- end -}}
{{- join ", " $names -}}
{{- end -}}

{{/* A Secret's value kept across upgrades: the live one when it exists, else random.
     (dict "ctx" $ "name" secretName "key" key "length" n) */}}
{{- define "tandem.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}
