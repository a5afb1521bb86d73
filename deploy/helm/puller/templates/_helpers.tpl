{{/* Labels of every object: deploy/'s name label, and Helm's. */}}
{{- define "puller.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* puller.yaml: settings, then what the chart's own values decide. */}}
{{- define "puller.settings" -}}
{{- $s := deepCopy .Values.settings -}}
{{- $_ := set $s "store" .Values.store -}}
{{- $_ := set $s "containerd_address" .Values.node.containerdSocket -}}
{{- $_ := set $s "containerd_root" .Values.node.containerdRoot -}}
{{- $_ := set $s "hosts_dir" .Values.node.hostsDir -}}
{{- $_ := set $s "staging_dir" (printf "%s/staging" .Values.node.stateDir) -}}
{{- $_ := set $s "startup_taint" (.Values.startupTaint | default nil) -}}
{{- if .Values.sources.knativeImages }}{{ $_ := set $s "knative_images" true }}{{ end -}}
{{- with .Values.sources.workloadSelector }}{{ $_ := set $s "workload_selector" . }}{{ end -}}
{{- with .Values.sources.namespaces }}{{ $_ := set $s "source_namespaces" . }}{{ end -}}
{{- with .Values.pullSecretNamespaces }}{{ $_ := set $s "pull_secret_namespaces" . }}{{ end -}}
{{- toYaml $s }}
{{- end }}
