{{/* LoRA adapters ----------------------------------------------------------------------------- */}}

{{/*
The LoRA limits of one model (merged settings) as `kvstack engine serve` reads them (its `lora`
section), as YAML; empty when the model serves no adapters. Fails naming the model on limits or
adapters the engines would refuse. Call with (list $ $settings).
*/}}
{{- define "kvstack.lora.limits" -}}
{{- $m := index . 1 }}
{{- $lora := default dict $m.lora }}
{{- if $lora.enabled }}
{{- $maxLoras := int $lora.maxLoras }}
{{- $rank := int $lora.maxLoraRank }}
{{- $cpu := int (default 0 $lora.maxCpuLoras) }}
{{- if and (gt $cpu 0) (lt $cpu $maxLoras) }}
{{- fail (printf "engines.models[%s].lora: maxCpuLoras (%d) must be at least maxLoras (%d)" $m.name $cpu $maxLoras) }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $a := $lora.adapters }}
{{- if hasKey $seen $a.name }}
{{- fail (printf "engines.models[%s].lora.adapters[%d]: %q is declared twice" $m.name $i $a.name) }}
{{- end }}
{{- $_ := set $seen $a.name true }}
{{- if and $a.rank (gt (int $a.rank) $rank) }}
{{- fail (printf "engines.models[%s].lora.adapters[%d] (%s): rank %d is over maxLoraRank %d" $m.name $i $a.name (int $a.rank) $rank) }}
{{- end }}
{{- end }}
{{- $limits := dict "max_loras" $maxLoras "max_lora_rank" $rank }}
{{- if gt $cpu 0 }}
{{- $_ := set $limits "max_cpu_loras" $cpu }}
{{- end }}
{{- toYaml $limits }}
{{- else if (default list $lora.adapters) }}
{{- fail (printf "engines.models[%s].lora.adapters: set lora.enabled to serve them" $m.name) }}
{{- end }}
{{- end }}

{{/*
Every declared adapter of the release as the router's config lists them, `[{name, model, source}]`
(`model`: the model's first served name), as YAML. Fails when an adapter's name is already a model's
name or another adapter's: clients pick one by its name. Call with $.
*/}}
{{- define "kvstack.lora.adapters" -}}
{{- $ctx := . }}
{{- $taken := dict }}
{{- range $model := $ctx.Values.engines.models }}
{{- $m := include "kvstack.engine.settings" (list $ctx $model) | fromYaml }}
{{- range (default list $m.servedModelNames | default (list $m.model)) }}
{{- $_ := set $taken . (printf "a name of model %s" $m.name) }}
{{- end }}
{{- end }}
{{- $out := list }}
{{- range $model := $ctx.Values.engines.models }}
{{- $m := include "kvstack.engine.settings" (list $ctx $model) | fromYaml }}
{{- $_ := include "kvstack.lora.limits" (list $ctx $m) }}
{{- if and $m.lora $m.lora.enabled }}
{{- $served := first (default list $m.servedModelNames | default (list $m.model)) }}
{{- range $i, $a := $m.lora.adapters }}
{{- if hasKey $taken $a.name }}
{{- fail (printf "engines.models[%s].lora.adapters[%d]: %q is already %s" $m.name $i $a.name (get $taken $a.name)) }}
{{- end }}
{{- $_ := set $taken $a.name (printf "an adapter of model %s" $m.name) }}
{{- $out = append $out (dict "name" $a.name "model" $served "source" $a.source) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The `kvstack.dev/lora` annotation of one model's engine Deployment (JSON, a KVStack model's `lora`
section plus the round interval): the operator places and loads the adapters on its pods and
reports in `kvstack.dev/lora-status`. Empty when the model serves no adapters.
Call with (list $ $settings).
*/}}
{{- define "kvstack.lora.annotation" -}}
{{- $ctx := index . 0 }}{{- $m := index . 1 }}
{{- with include "kvstack.lora.limits" (list $ctx $m) | fromYaml }}
{{- $spec := dict "maxLoras" .max_loras "maxLoraRank" .max_lora_rank "intervalSeconds" (int $ctx.Values.engines.autoscaling.intervalSeconds) }}
{{- if .max_cpu_loras }}
{{- $_ := set $spec "maxCpuLoras" .max_cpu_loras }}
{{- end }}
{{- $adapters := list }}
{{- range $m.lora.adapters }}
{{- $a := dict "name" .name "source" .source "pinned" (default false .pinned) }}
{{- if .rank }}
{{- $_ := set $a "rank" (int .rank) }}
{{- end }}
{{- $adapters = append $adapters $a }}
{{- end }}
{{- $_ := set $spec "adapters" $adapters }}
{{- toJson $spec }}
{{- end }}
{{- end }}
