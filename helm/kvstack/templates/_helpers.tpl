{{/* Names ------------------------------------------------------------------------------- */}}

{{/* The chart name, truncated to a DNS label. */}}
{{- define "kvstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-<chart>, or the release alone when it holds the chart name. */}}
{{- define "kvstack.fullname" -}}
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

{{/* A component's object name: <fullname>-<suffix>, kept within 63 characters. */}}
{{- define "kvstack.componentName" -}}
{{- $ctx := index . 0 }}{{- $suffix := index . 1 }}
{{- $full := include "kvstack.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $full $suffix }}
{{- end }}

{{- define "kvstack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{/* Selector labels: the immutable subset. Call with (list $ "component"). */}}
{{- define "kvstack.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "kvstack.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Every label of an object. Call with (list $ "component"). */}}
{{- define "kvstack.labels" -}}
{{- $ctx := index . 0 -}}
{{ include "kvstack.selectorLabels" . }}
helm.sh/chart: {{ include "kvstack.chart" $ctx }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kvstack
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Monitoring ---------------------------------------------------------------------------- */}}

{{/*
The `kvstack_component` target label the alert rules select by (engine, router, redis, operator),
copied from the pod's app.kubernetes.io/component label. Job names follow the release name and
nameOverride/fullnameOverride, so rules that matched on `job` would silently never fire.
*/}}
{{- define "kvstack.monitor.componentRelabeling" -}}
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: kvstack_component
{{- end }}

{{/* Images ------------------------------------------------------------------------------ */}}

{{/* repository:tag, the tag defaulting to the chart's appVersion. Call with (list $ .image). */}}
{{- define "kvstack.image" -}}
{{- $ctx := index . 0 }}{{- $img := index . 1 }}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) }}
{{- end }}


{{/* Service accounts ----------------------------------------------------------------------- */}}

{{- define "kvstack.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "kvstack.componentName" (list . "router")) .Values.router.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvstack.engine.serviceAccountName" -}}
{{- if .Values.engines.serviceAccount.create }}
{{- default (include "kvstack.componentName" (list . "engine")) .Values.engines.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.engines.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secrets --------------------------------------------------------------------------------- */}}

{{/* The chart's own Secret (generated router API key, Redis password and URL). */}}
{{- define "kvstack.secretName" -}}
{{- include "kvstack.componentName" (list . "secrets") }}
{{- end }}

{{/* Reuse a generated value across upgrades: read it back from the live Secret, else make one. */}}
{{- define "kvstack.generatedSecretValue" -}}
{{- $ctx := index . 0 }}{{- $key := index . 1 }}
{{- $existing := lookup "v1" "Secret" $ctx.Release.Namespace (include "kvstack.secretName" $ctx) }}
{{- if and $existing (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}

{{- define "kvstack.redis.fullname" -}}
{{- include "kvstack.componentName" (list . "redis") }}
{{- end }}

{{/* The chart's Redis URL without credentials. */}}
{{- define "kvstack.redis.url" -}}
{{- printf "redis://%s.%s.svc:%d" (include "kvstack.redis.fullname" .) .Release.Namespace (int .Values.redis.port) }}
{{- end }}

{{/* Whether the chart generates a Redis password. */}}
{{- define "kvstack.redis.generatesPassword" -}}
{{- if and (eq .Values.lmcache.remote.mode "redis") .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}true{{- end }}
{{- end }}

{{/*
Where engines read the shared-store URL, as YAML:
  {url}                                        a URL without credentials, written into the config file;
  {envUrl, passwordSecretName, passwordSecretKey}  the chart's Redis with a password: the URL is built in
                                               the pod from $(REDIS_PASSWORD), so no password is in the spec;
  {secretName, secretKey}                      an external URL held in a Secret.
Empty when there is no shared store.
*/}}
{{- define "kvstack.lmcache.remote" -}}
{{- $remote := .Values.lmcache.remote }}
{{- if eq $remote.mode "redis" }}
{{- if not .Values.redis.auth.enabled }}
url: {{ include "kvstack.redis.url" . | quote }}
{{- else }}
envUrl: {{ printf "redis://:$(REDIS_PASSWORD)@%s" (include "kvstack.redis.url" . | trimPrefix "redis://") | quote }}
passwordSecretName: {{ default (include "kvstack.secretName" .) .Values.redis.auth.existingSecret }}
passwordSecretKey: {{ ternary .Values.redis.auth.secretKey "redis-password" (not (empty .Values.redis.auth.existingSecret)) }}
{{- end }}
{{- else if eq $remote.mode "external" }}
{{- if $remote.existingSecret }}
secretName: {{ $remote.existingSecret }}
secretKey: {{ $remote.secretKey }}
{{- else }}
url: {{ required "lmcache.remote.externalUrl (or lmcache.remote.existingSecret) is required when lmcache.remote.mode is external" $remote.externalUrl | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Engines ---------------------------------------------------------------------------------- */}}

{{/* One model's settings: engines.defaults overridden by the model's own keys (maps merge, lists replace). */}}
{{- define "kvstack.engine.settings" -}}
{{- $ctx := index . 0 }}{{- $model := index . 1 }}
{{- include "kvstack.merge" (list $ctx.Values.engines.defaults $model) }}
{{- end }}

{{/*
Deep merge of two maps as YAML: keys of the second win, maps merge, everything else (lists,
false, 0, "") replaces. Sprig's mergeOverwrite skips false/0/"", so a model could not turn a
default off with it.
*/}}
{{- define "kvstack.merge" -}}
{{- $out := deepCopy (index . 0) }}
{{- range $key, $value := index . 1 }}
{{- $current := index $out $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $out $key (include "kvstack.merge" (list $current $value) | fromYaml) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{- define "kvstack.engine.fullname" -}}
{{- $ctx := index . 0 }}{{- $model := index . 1 }}
{{- include "kvstack.componentName" (list $ctx (printf "engine-%s" $model.name)) }}
{{- end }}

{{/*
The `kvstack engine serve` config file of one model (YAML, snake_case keys as
engine/serve/config.py:EngineConfig names them). Secrets never land here: the remote URL with a
password and the API key reach the pod as KVSTACK_ENGINE_* env vars from Secrets.
Call with (list $ $settings).
*/}}
{{- define "kvstack.engine.config" -}}
{{- $ctx := index . 0 }}{{- $m := index . 1 }}
{{- $events := $ctx.Values.engines.kvEvents }}
{{- $lm := $m.lmcache }}
{{- $lmcache := dict
  "enabled" $lm.enabled
  "chunk_size" (int $lm.chunkSize)
  "local_cpu" $lm.localCpu
  "max_local_cpu_size" $lm.maxLocalCpuSizeGb
  "remote_serde" $lm.remoteSerde
  "save_decode_cache" $lm.saveDecodeCache
  "pin_timeout_sec" (int $lm.pinTimeoutSec) }}
{{- $remote := include "kvstack.lmcache.remote" $ctx | fromYaml }}
{{- if and $lm.enabled $lm.shareRemote $remote.url }}
{{- $_ := set $lmcache "remote_url" $remote.url }}
{{- end }}
{{- $config := dict
  "model" $m.model
  "served_model_name" (default list $m.servedModelNames)
  "host" "0.0.0.0"
  "port" 8000
  "tensor_parallel_size" (max 1 (int (default $m.gpus $m.tensorParallelSize)))
  "gpu_memory_utilization" $m.gpuMemoryUtilization
  "block_size" (int $m.blockSize)
  "enable_prefix_caching" true
  "kv_events" (dict
    "enabled" $events.enabled
    "endpoint" (printf "tcp://*:%d" (int $events.port))
    "replay_endpoint" (printf "tcp://*:%d" (int $events.replayPort))
    "topic" $events.topic)
  "lmcache" $lmcache
  "python_hash_seed" (toString $ctx.Values.engines.pythonHashSeed)
  "extra_args" (default list $m.vllmArgs)
  "extra_env" (default dict $m.vllmEnv) }}
{{- if $m.maxModelLen }}
{{- $_ := set $config "max_model_len" (int $m.maxModelLen) }}
{{- end }}
{{- with $ctx.Values.engines.tracing.endpoint }}
{{- $_ := set $config "otlp_traces_endpoint" . }}
{{- $_ := set $config "otlp_traces_protocol" $ctx.Values.engines.tracing.protocol }}
{{- end }}
{{- with include "kvstack.lora.limits" (list $ctx $m) | fromYaml }}
{{- $_ := set $config "lora" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Arguments of `kvstack engine sim` for one model in simulator mode (engines.simulator.enabled), as
YAML list: the model's names, block size and context length, the KV-event sockets, and LMCache with
the shared store. Secrets stay out of the spec: $(VAR) is expanded by Kubernetes from the env.
Call with (list $ $settings $remote).
*/}}
{{- define "kvstack.engine.simArgs" -}}
{{- $ctx := index . 0 }}{{- $m := index . 1 }}{{- $remote := index . 2 }}
{{- $events := $ctx.Values.engines.kvEvents }}
{{- $args := list "--host" "0.0.0.0" "--port" "8000" "--model" $m.model "--block-size" (toString (int $m.blockSize)) }}
{{- range $m.servedModelNames }}
{{- $args = concat $args (list "--served-model-name" .) }}
{{- end }}
{{- if $m.maxModelLen }}
{{- $args = concat $args (list "--max-model-len" (toString (int $m.maxModelLen))) }}
{{- end }}
{{- if $events.enabled }}
{{- $args = concat $args (list "--kv-events-endpoint" (printf "tcp://*:%d" (int $events.port)) "--kv-events-replay-endpoint" (printf "tcp://*:%d" (int $events.replayPort)) "--kv-events-topic" $events.topic) }}
{{- end }}
{{- if $m.lmcache.enabled }}
{{- $args = concat $args (list "--lmcache" "--lmcache-chunk-size" (toString (int $m.lmcache.chunkSize))) }}
{{- if and $m.lmcache.shareRemote $remote.url }}
{{- $args = concat $args (list "--lmcache-remote-url" $remote.url) }}
{{- else if and $m.lmcache.shareRemote (or $remote.envUrl $remote.secretName) }}
{{- $args = concat $args (list "--lmcache-remote-url" "$(KVSTACK_ENGINE_LMCACHE__REMOTE_URL)") }}
{{- end }}
{{- else }}
{{- $args = append $args "--no-lmcache" }}
{{- end }}
{{- if $ctx.Values.engines.apiKey.existingSecret }}
{{- $args = concat $args (list "--api-key" "$(KVSTACK_ENGINE_API_KEY)") }}
{{- end }}
{{- with $ctx.Values.engines.tracing.endpoint }}
{{- $args = concat $args (list "--otlp-traces-endpoint" .) }}
{{- end }}
{{- with include "kvstack.lora.limits" (list $ctx $m) | fromYaml }}
{{- $args = concat $args (list "--enable-lora" "--max-loras" (toString .max_loras) "--max-lora-rank" (toString .max_lora_rank)) }}
{{- if .max_cpu_loras }}
{{- $args = concat $args (list "--max-cpu-loras" (toString .max_cpu_loras)) }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
The operator's autoscaling policy of the engine Deployments: a KVStack's spec.autoscaling as JSON
(kvstack.operator.annotated parses it with the same model). target 0 and an empty prometheusUrl
are left out, so the operator's defaults apply.
*/}}
{{- define "kvstack.engine.autoscalingPolicy" -}}
{{- $a := .Values.engines.autoscaling }}
{{- $policy := dict
  "metric" $a.metric
  "tolerance" (float64 $a.tolerance)
  "intervalSeconds" (int $a.intervalSeconds)
  "staleAfterSeconds" (int $a.staleAfterSeconds)
  "scaleUp" (dict "stabilizationSeconds" (int $a.scaleUp.stabilizationSeconds) "maxPercent" (int $a.scaleUp.maxPercent) "maxPods" (int $a.scaleUp.maxPods))
  "scaleDown" (dict "stabilizationSeconds" (int $a.scaleDown.stabilizationSeconds) "maxPods" (int $a.scaleDown.maxPods))
  "scaleToZero" (dict "enabled" $a.scaleToZero.enabled "idleSeconds" (int $a.scaleToZero.idleSeconds))
}}
{{- if gt (float64 $a.target) 0.0 }}
{{- $_ := set $policy "target" (float64 $a.target) }}
{{- end }}
{{- with $a.prometheusUrl }}
{{- $_ := set $policy "prometheusUrl" . }}
{{- end }}
{{- toJson $policy }}
{{- end }}
