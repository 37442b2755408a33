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

{{/* Where the chart mounts the Secrets it is given. */}}
{{- define "mailgate.authServerPasswordFile" -}}
/var/run/secrets/mailgate/auth-server/password
{{- end }}
{{- define "mailgate.clientAccountsFile" -}}
/var/run/secrets/mailgate/client-accounts/accounts.yaml
{{- end }}

{{/* Port of config.metrics.listen ("0.0.0.0:9090" or "[::]:9090"). */}}
{{- define "mailgate.adminPort" -}}
{{- $metrics := required "config.metrics.listen is required: the probes and the metrics port use it" .Values.config.metrics -}}
{{- $listen := required "config.metrics.listen is required: the probes and the metrics port use it" $metrics.listen -}}
{{- splitList ":" $listen | last -}}
{{- end }}

{{/*
The configuration file: .Values.config plus password_file / accounts_file for
the Secrets given in authServer / clientAccounts. Also checks what mailgate
would otherwise refuse only at start.
*/}}
{{- define "mailgate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $tokens := get $config "tokens" | default dict -}}
{{- $authServer := get $tokens "auth_server" | default dict -}}
{{- if .Values.authServer.existingSecret -}}
{{- if not (regexMatch "^https?://[^/@]+@" (toString $authServer.url)) -}}
{{- fail "authServer.existingSecret is set: put the basic-auth user name in config.tokens.auth_server.url (http://USER@host/path), or the password is not sent" -}}
{{- end -}}
{{- $_ := set $authServer "password_file" (include "mailgate.authServerPasswordFile" .) -}}
{{- $_ := set $tokens "auth_server" $authServer -}}
{{- $_ := set $config "tokens" $tokens -}}
{{- end -}}
{{- $clientAuth := get $config "client_auth" | default dict -}}
{{- if .Values.clientAccounts.existingSecret -}}
{{- $_ := set $clientAuth "accounts_file" (include "mailgate.clientAccountsFile" .) -}}
{{- $_ := set $config "client_auth" $clientAuth -}}
{{- end -}}
{{- if and (eq (toString (get $clientAuth "mode")) "static") (not (get $clientAuth "accounts")) (not (get $clientAuth "accounts_file")) -}}
{{- fail "config.client_auth.mode is static but no account is given: set clientAccounts.existingSecret or config.client_auth.accounts" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end }}

{{/* Every Service targetPort must be the port of a listener. */}}
{{- define "mailgate.checkPorts" -}}
{{- $listenPorts := list -}}
{{- range .Values.config.listeners -}}
{{- $listenPorts = append $listenPorts (splitList ":" .listen | last | toString) -}}
{{- end -}}
{{- range .Values.service.ports -}}
{{- if not (has (toString .targetPort) $listenPorts) -}}
{{- fail (printf "service.ports %s: targetPort %v is not the port of any config.listeners[].listen (%s)" .name .targetPort (join ", " $listenPorts)) -}}
{{- end -}}
{{- end -}}
{{- end }}
