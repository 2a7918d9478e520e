{{/* A prefill or decode Deployment and its headless Service: (dict "ctx" $ "role" "prefill") */}}
{{- define "tandem.gpuWorkload" -}}
{{- $ := .ctx -}}
{{- $w := index $.Values .role -}}
{{- $c := dict "ctx" $ "component" .role -}}
{{- $kvt := $.Values.kvTransport -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tandem.fullname" $ }}-{{ .role }}
  labels:
    {{- include "tandem.labels" $c | nindent 4 }}
spec:
  {{- if not $w.autoscaling.enabled }}
  replicas: {{ $w.replicaCount }}
  {{- end }}
  strategy:
    {{- toYaml $w.updateStrategy | nindent 4 }}
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" $c | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" $c | nindent 8 }}
    spec:
      serviceAccountName: {{ include "tandem.serviceAccountName" $ }}
      # Prefill pods follow the decode pods' EndpointSlices (the only KV targets they accept).
      automountServiceAccountToken: {{ and (eq .role "prefill") (eq $.Values.router.discovery "kubernetes") }}
      {{- if $kvt.hostIPC }}
      # kvTransport.hostIPC: cuda-ipc and shm map the other pod's memory through the node's IPC namespace.
      hostIPC: true
      {{- end }}
      terminationGracePeriodSeconds: {{ add (int $w.shutdownGraceSeconds) 15 }}
      {{- with $.Values.global.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "tandem.podSecurityContext" $ | nindent 8 }}
      {{- include "tandem.modelInit" (dict "ctx" $ "metadataOnly" false) | nindent 6 }}
      containers:
        - name: {{ .role }}
          image: {{ include "tandem.image" $ }}
          imagePullPolicy: {{ $.Values.global.image.pullPolicy }}
          args:
            - {{ .role }}
            - --model
            - {{ $.Values.model.mountPath | quote }}
            - --served-model-name
            - {{ include "tandem.modelName" $ | quote }}
            - --port
            - {{ $w.port | int64 | quote }}
            - --advertise-address
            - {{ printf "$(POD_IP):%d" (int $w.port) | quote }}
            - --pod-id
            - "$(POD_NAME)"
            - --metrics-port
            - {{ $w.metricsPort | int64 | quote }}
            - --shutdown-grace-s
            - {{ $w.shutdownGraceSeconds | int64 | quote }}
            {{- include "tandem.engineArgs" $w.engine | nindent 12 }}
            {{- if eq .role "prefill" }}
            - --kv-layers-per-group
            - {{ $w.kv.layersPerGroup | int64 | quote }}
            - --kv-chunk-bytes
            - {{ $w.kv.chunkBytes | int64 | quote }}
            - --kv-streams
            - {{ $w.kv.streams | int64 | quote }}
            # KV goes only to decode pods found as the router finds them (router.discovery).
            - --discovery
            - {{ $.Values.router.discovery | quote }}
            - --decode-service
            {{- if eq $.Values.router.discovery "dns" }}
            - {{ printf "%s-decode.%s.svc" (include "tandem.fullname" $) $.Release.Namespace | quote }}
            - --decode-port
            - {{ $.Values.decode.port | int64 | quote }}
            {{- else }}
            - {{ printf "%s-decode" (include "tandem.fullname" $) | quote }}
            - --namespace
            - {{ $.Release.Namespace | quote }}
            {{- end }}
            {{- if $.Values.kvstore.enabled }}
            - --kvstore
            - {{ printf "%s-kvstore:%d" (include "tandem.fullname" $) (int $.Values.kvstore.port) | quote }}
            {{- end }}
            {{- else }}
            - --kv-timeout-s
            - {{ $w.kvTimeoutSeconds | quote }}
            {{- end }}
            {{- with $w.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "tandem.commonEnv" $ | nindent 12 }}
            {{- include "tandem.kvTransportEnv" (dict "ctx" $ "role" .role) | nindent 12 }}
            {{- with $w.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          lifecycle:
            {{- include "tandem.preStop" $ | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $w.port }}
            - name: metrics
              containerPort: {{ $w.metricsPort }}
          startupProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: {{ $w.startupProbe.periodSeconds }}
            failureThreshold: {{ $w.startupProbe.failureThreshold }}
          readinessProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: 10
          livenessProbe:
            grpc:
              port: {{ $w.port }}
            periodSeconds: 20
            failureThreshold: 3
          resources:
            {{- include "tandem.gpuResources" (dict "ctx" $ "w" $w) | nindent 12 }}
          securityContext:
            {{- include "tandem.gpuContainerSecurityContext" $ | nindent 12 }}
          volumeMounts:
            {{- include "tandem.modelVolumeMount" $ | nindent 12 }}
            - name: shm
              mountPath: /dev/shm
      volumes:
        {{- include "tandem.modelVolume" $ | nindent 8 }}
        - name: shm
          {{- if $kvt.shareDevShm }}
          # kvTransport.shareDevShm: the node's /dev/shm, shared with the other role's pods on this node.
          hostPath:
            path: /dev/shm
            type: Directory
          {{- else }}
          emptyDir:
            medium: Memory
            sizeLimit: {{ $w.shmSize }}
          {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
# Headless: the router addresses each pod (its EndpointSlices or DNS A records), never a VIP.
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tandem.fullname" $ }}-{{ .role }}
  labels:
    {{- include "tandem.labels" $c | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "tandem.selectorLabels" $c | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $w.port }}
      targetPort: grpc
    - name: metrics
      port: {{ $w.metricsPort }}
      targetPort: metrics
{{- end -}}
