{{- /*
Where the chart mounts what it is given, and the Secret volumes themselves.
Every Secret is mounted as a directory, never with subPath: the kubelet
updates a directory mount by swapping its ..data link (both files of a
certificate at once) and mailgate reloads what changed, while a subPath mount
keeps the first version until the pod restarts, so a renewed certificate or a
rotated password would never arrive.
*/}}

{{- define "mailgate.authServerPasswordFile" -}}
/var/run/secrets/mailgate/auth-server/password
{{- end }}
{{- define "mailgate.authServerCaFile" -}}
/var/run/secrets/mailgate/auth-server-ca/ca.crt
{{- end }}
{{- define "mailgate.clientAccountsFile" -}}
/var/run/secrets/mailgate/client-accounts/accounts.yaml
{{- end }}
{{- define "mailgate.clientAuthServerPasswordFile" -}}
/var/run/secrets/mailgate/client-auth-server/password
{{- end }}
{{- define "mailgate.tlsDir" -}}
/var/run/secrets/mailgate/tls
{{- end }}
{{- define "mailgate.adminTlsDir" -}}
/var/run/secrets/mailgate/admin-tls
{{- end }}
{{- define "mailgate.onboardingPasswordFile" -}}
/var/run/secrets/mailgate/onboarding/password
{{- end }}
{{- define "mailgate.tokenServicePasswordFile" -}}
/var/run/secrets/mailgate/token-service/password
{{- end }}
{{/* Each admin.tokenService.clients entry's password, in a directory by client name. */}}
{{- define "mailgate.tokenServiceClientsDir" -}}
/var/run/secrets/mailgate/token-service-clients
{{- end }}
{{- define "mailgate.storeKeyFile" -}}
/var/run/secrets/mailgate/store-key/key
{{- end }}
{{- define "mailgate.redisPasswordFile" -}}
/var/run/secrets/mailgate/redis/password
{{- end }}
{{- define "mailgate.redisCaFile" -}}
/var/run/secrets/mailgate/redis-ca/ca.crt
{{- end }}
{{- define "mailgate.sharedKeyFile" -}}
/var/run/secrets/mailgate/shared-key/key
{{- end }}
{{- define "mailgate.oauth2Dir" -}}
/var/run/secrets/mailgate/oauth2
{{- end }}
{{/* The writable volume of oauth2.store, and the store's default directory in it. */}}
{{- define "mailgate.stateDir" -}}
/var/lib/mailgate
{{- end }}
{{- define "mailgate.storeDir" -}}
/var/lib/mailgate/tokens
{{- end }}

{{/*
The client TLS Secret: tls.existingSecret, or <fullname>-tls (cert-manager's, or
one to create) when cert-manager is on or a listener needs the chart's files;
"" for none.
*/}}
{{- define "mailgate.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if or .Values.tls.certManager.enabled (include "mailgate.listenersWantTlsFiles" .) -}}
{{- printf "%s-tls" (include "mailgate.fullname" . | trunc 59 | trimSuffix "-") -}}
{{- end -}}
{{- end }}

{{/* "true" when a listener sets tls.mode implicit or starttls and names neither file. */}}
{{- define "mailgate.listenersWantTlsFiles" -}}
{{- range $listener := .Values.config.listeners | default list -}}
{{- if kindIs "map" $listener -}}
{{- $tls := get $listener "tls" -}}
{{- if and (kindIs "map" $tls) (has (toString (get $tls "mode")) (list "implicit" "starttls")) (not (hasKey $tls "cert_file")) (not (hasKey $tls "key_file")) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The admin TLS Secret, likewise. */}}
{{- define "mailgate.adminTlsSecretName" -}}
{{- if .Values.admin.tls.existingSecret -}}
{{- .Values.admin.tls.existingSecret -}}
{{- else if .Values.admin.tls.certManager.enabled -}}
{{- printf "%s-admin-tls" (include "mailgate.fullname" . | trunc 53 | trimSuffix "-") -}}
{{- end -}}
{{- end }}

{{/* The claim oauth2.store mounts: existingClaim or the chart's own. */}}
{{- define "mailgate.storeClaimName" -}}
{{- .Values.oauth2.store.existingClaim | default (printf "%s-tokens" (include "mailgate.fullname" . | trunc 56 | trimSuffix "-")) -}}
{{- end }}

{{/*
The Secret volumes as a YAML list of {name, secretName, mountPath, items}; the
Deployment renders each as a volume and a read-only mount. Files are 0440
(group 65534 through fsGroup).
*/}}
{{- define "mailgate.secretMounts" -}}
{{- $mounts := list -}}
{{- with .Values.authServer.existingSecret -}}
{{- $file := include "mailgate.authServerPasswordFile" $ -}}
{{- $mounts = append $mounts (dict "name" "auth-server-password" "secretName" . "mountPath" (dir $file) "items" (list (dict "key" $.Values.authServer.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- with .Values.authServer.ca.existingSecret -}}
{{- $file := include "mailgate.authServerCaFile" $ -}}
{{- $mounts = append $mounts (dict "name" "auth-server-ca" "secretName" . "mountPath" (dir $file) "items" (list (dict "key" $.Values.authServer.ca.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- if include "mailgate.mountClientAccounts" . -}}
{{- $file := include "mailgate.clientAccountsFile" . -}}
{{- $mounts = append $mounts (dict "name" "client-accounts" "secretName" .Values.clientAccounts.existingSecret "mountPath" (dir $file) "items" (list (dict "key" .Values.clientAccounts.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- with .Values.clientAuthServer.existingSecret -}}
{{- $file := include "mailgate.clientAuthServerPasswordFile" $ -}}
{{- $mounts = append $mounts (dict "name" "client-auth-server-password" "secretName" . "mountPath" (dir $file) "items" (list (dict "key" $.Values.clientAuthServer.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- $certificateItems := list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key") -}}
{{- with include "mailgate.tlsSecretName" . -}}
{{- $mounts = append $mounts (dict "name" "tls" "secretName" . "mountPath" (include "mailgate.tlsDir" $) "items" $certificateItems) -}}
{{- end -}}
{{- with include "mailgate.adminTlsSecretName" . -}}
{{- $mounts = append $mounts (dict "name" "admin-tls" "secretName" . "mountPath" (include "mailgate.adminTlsDir" $) "items" $certificateItems) -}}
{{- end -}}
{{- with .Values.admin.onboarding.existingSecret -}}
{{- $file := include "mailgate.onboardingPasswordFile" $ -}}
{{- $mounts = append $mounts (dict "name" "onboarding-password" "secretName" . "mountPath" (dir $file) "items" (list (dict "key" $.Values.admin.onboarding.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- with .Values.admin.tokenService.existingSecret -}}
{{- $file := include "mailgate.tokenServicePasswordFile" $ -}}
{{- $mounts = append $mounts (dict "name" "token-service-password" "secretName" . "mountPath" (dir $file) "items" (list (dict "key" $.Values.admin.tokenService.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- /* Volume names by position, as for providers below. */ -}}
{{- range $index, $name := keys (.Values.admin.tokenService.clients | default dict) | sortAlpha -}}
{{- $client := get $.Values.admin.tokenService.clients $name -}}
{{- $items := list (dict "key" ($client.existingSecretKey | default "password") "path" "password") -}}
{{- $mounts = append $mounts (dict "name" (printf "token-service-client-%d" $index) "secretName" $client.existingSecret "mountPath" (printf "%s/%s" (include "mailgate.tokenServiceClientsDir" $) $name) "items" $items) -}}
{{- end -}}
{{- if and .Values.oauth2.store.enabled .Values.oauth2.store.key.existingSecret -}}
{{- $file := include "mailgate.storeKeyFile" . -}}
{{- $mounts = append $mounts (dict "name" "store-key" "secretName" .Values.oauth2.store.key.existingSecret "mountPath" (dir $file) "items" (list (dict "key" .Values.oauth2.store.key.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- $redis := .Values.redis -}}
{{- range $name, $secret := dict "redis-password" (list $redis.password "mailgate.redisPasswordFile") "redis-ca" (list $redis.ca "mailgate.redisCaFile") "shared-key" (list $redis.sealingKey "mailgate.sharedKeyFile") -}}
{{- $values := index $secret 0 -}}
{{- if $values.existingSecret -}}
{{- $file := include (index $secret 1) $ -}}
{{- $mounts = append $mounts (dict "name" $name "secretName" $values.existingSecret "mountPath" (dir $file) "items" (list (dict "key" $values.existingSecretKey "path" (base $file)))) -}}
{{- end -}}
{{- end -}}
{{- /* Volume names by position: provider names need not be DNS labels. */ -}}
{{- range $index, $name := keys .Values.oauth2.providers | sortAlpha -}}
{{- $provider := get $.Values.oauth2.providers $name -}}
{{- $items := list -}}
{{- with $provider.clientSecretKey -}}
{{- $items = append $items (dict "key" . "path" "client-secret") -}}
{{- end -}}
{{- with $provider.clientCertificate -}}
{{- $items = concat $items (list (dict "key" .certKey "path" "client.crt") (dict "key" .keyKey "path" "client.key")) -}}
{{- end -}}
{{- with $provider.serviceAccountKey -}}
{{- $items = append $items (dict "key" . "path" "service-account.json") -}}
{{- end -}}
{{- $mounts = append $mounts (dict "name" (printf "oauth2-provider-%d" $index) "secretName" $provider.existingSecret "mountPath" (printf "%s/%s" (include "mailgate.oauth2Dir" $) $name) "items" $items) -}}
{{- end -}}
{{- toYaml $mounts -}}
{{- end }}
