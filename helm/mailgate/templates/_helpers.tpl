{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "mailgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name used for every object. */}}
{{- define "mailgate.fullname" -}}
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

{{/* Name of the admin Service; "-admin" must still fit in 63 characters. */}}
{{- define "mailgate.adminServiceName" -}}
{{- printf "%s-admin" (include "mailgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "mailgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mailgate.labels" -}}
helm.sh/chart: {{ include "mailgate.chart" . }}
{{ include "mailgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mailgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* "true" when config.client_auth.mode is static (mailgate's default is any). */}}
{{- define "mailgate.staticAuth" -}}
{{- $clientAuth := .Values.config.client_auth | default dict -}}
{{- if eq (toString (get $clientAuth "mode")) "static" }}true{{ end -}}
{{- end }}

{{/*
The container's resources: .Values.resources, with limits.memory derived when it is not
set (see memoryLimit in values.yaml): argon2 checks hold m= each, hash_workers at once.
*/}}
{{- define "mailgate.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) -}}
{{- $limits := get $resources "limits" | default dict -}}
{{- if not (get $limits "memory") -}}
{{- $kib := mul .Values.memoryLimit.baseMiB 1024 -}}
{{- if include "mailgate.staticAuth" . -}}
{{- $workers := get .Values.config.client_auth "hash_workers" | default 4 -}}
{{- $kib = add $kib (mul $workers .Values.memoryLimit.argon2KiB) -}}
{{- end -}}
{{- $_ := set $limits "memory" (printf "%dMi" (div (add $kib 1023) 1024)) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end }}

{{/* "true" when the chart mounts the client-accounts Secret. */}}
{{- define "mailgate.mountClientAccounts" -}}
{{- if and .Values.clientAccounts.existingSecret (include "mailgate.staticAuth" .) }}true{{ end -}}
{{- end }}

{{/*
The admin endpoint's listen address: config.admin.listen, or config.metrics.listen
(the key's old name, still accepted by mailgate). The probes, the admin Service and
the ServiceMonitor need it.
*/}}
{{- define "mailgate.adminListen" -}}
{{- $config := .Values.config -}}
{{- if and (hasKey $config "admin") (hasKey $config "metrics") -}}
{{- fail "config.admin and config.metrics are the same section (metrics is the old name): give only config.admin" -}}
{{- end -}}
{{- $admin := get $config "admin" | default (get $config "metrics") | default dict -}}
{{- $listen := get $admin "listen" | default "" | toString -}}
{{- if not $listen -}}
{{- fail "config.admin.listen is required: the probes, the admin Service and the ServiceMonitor use it" -}}
{{- end -}}
{{- if regexMatch "^(127\\.|\\[::1\\]:)" $listen -}}
{{- fail (printf "config.admin.listen %s is loopback: kubelet probes and Prometheus connect to the pod IP, use 0.0.0.0:PORT" $listen) -}}
{{- end -}}
{{- $listen -}}
{{- end }}

{{/* Port of the admin endpoint ("0.0.0.0:9090" or "[::]:9090" -> 9090). */}}
{{- define "mailgate.adminPort" -}}
{{- include "mailgate.adminListen" . | splitList ":" | last -}}
{{- end }}

{{/*
Seconds in a mailgate duration ("500ms", "5s", "1m 30s", "1h"), as a float.
Called with (list "key.path" $value $default).
*/}}
{{- define "mailgate.durationSeconds" -}}
{{- $key := index . 0 -}}
{{- $text := index . 1 | default (index . 2) | toString -}}
{{- $compact := $text | replace " " "" -}}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $compact) -}}
{{- fail (printf "%s %q: the chart checks terminationGracePeriodSeconds against it and reads only forms like 500ms, 20s, 1m or 1m 30s" $key $text) -}}
{{- end -}}
{{- $seconds := 0.0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $compact -1 -}}
{{- $number := regexFind "^[0-9]+" . | float64 -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $scale := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit -}}
{{- $seconds = addf $seconds (mulf $number $scale) -}}
{{- end -}}
{{- $seconds -}}
{{- end }}

{{/*
mailgate needs drain_delay + shutdown_grace + 3 s (goodbyes) after SIGTERM; the
kubelet sends SIGKILL after terminationGracePeriodSeconds. The defaults are
mailgate's own (5s and 20s).
*/}}
{{- define "mailgate.checkGracePeriod" -}}
{{- $drain := include "mailgate.durationSeconds" (list "config.drain_delay" .Values.config.drain_delay "5s") | float64 -}}
{{- $grace := include "mailgate.durationSeconds" (list "config.shutdown_grace" .Values.config.shutdown_grace "20s") | float64 -}}
{{- $needed := addf $drain $grace 3.0 -}}
{{- if not (gt (float64 .Values.terminationGracePeriodSeconds) $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drain_delay + config.shutdown_grace + 3 s of goodbyes = %v s; leave a margin of a few seconds on top" .Values.terminationGracePeriodSeconds $needed) -}}
{{- end -}}
{{- end }}

{{/*
Every mail Service targetPort must be the port of a listener, so the admin port
can never end up on the mail Service.
*/}}
{{- define "mailgate.checkPorts" -}}
{{- $listenPorts := list -}}
{{- range .Values.config.listeners -}}
{{- $listenPorts = append $listenPorts (splitList ":" (toString .listen) | last) -}}
{{- end -}}
{{- $adminPort := include "mailgate.adminPort" . -}}
{{- if has $adminPort $listenPorts -}}
{{- fail (printf "config.admin.listen uses port %s, which a listener uses too" $adminPort) -}}
{{- end -}}
{{- range .Values.service.ports -}}
{{- if not (has (toString .targetPort) $listenPorts) -}}
{{- fail (printf "service.ports %s: targetPort %v is not the port of any config.listeners[].listen (%s)" .name .targetPort (join ", " $listenPorts)) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The rendered ConfigMap or Secret holding config.yaml, for its checksum. */}}
{{- define "mailgate.configObjectTemplate" -}}
{{- if eq .Values.configStorage "Secret" -}}
{{- print .Template.BasePath "/config-secret.yaml" -}}
{{- else -}}
{{- print .Template.BasePath "/configmap.yaml" -}}
{{- end -}}
{{- end }}
