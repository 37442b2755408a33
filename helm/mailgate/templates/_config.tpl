{{- /*
mailgate's config.yaml: .Values.config plus the file keys for what the chart
mounts (_mounts.tpl), and checks of what mailgate would otherwise refuse only
at start, or of wiring it cannot see (a Secret given here but used nowhere).
Each step below takes (dict "root" $ "config" $config) and edits the copy in
place.
*/}}
{{- define "mailgate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $step := dict "root" . "config" $config -}}
{{- include "mailgate.config.tokenSources" $step -}}
{{- include "mailgate.config.clientAuth" $step -}}
{{- include "mailgate.config.listeners" $step -}}
{{- include "mailgate.config.oauth2" $step -}}
{{- include "mailgate.config.shared" $step -}}
{{- include "mailgate.config.admin" $step -}}
{{- toYaml $config -}}
{{- end }}

{{/* tokens.auth_server: its password and CA from authServer. */}}
{{- define "mailgate.config.tokenSources" -}}
{{- $root := .root -}}
{{- $config := .config -}}
{{- $tokens := get $config "tokens" | default dict -}}
{{- $authServer := get $tokens "auth_server" | default dict -}}
{{- if $root.Values.authServer.existingSecret -}}
{{- if not (regexMatch "^https?://[^/@]+@" (toString $authServer.url)) -}}
{{- fail "authServer.existingSecret is set: put the basic-auth user name in config.tokens.auth_server.url (http://USER@host/path), or the password is not sent" -}}
{{- end -}}
{{- $_ := set $authServer "password_file" (include "mailgate.authServerPasswordFile" $root) -}}
{{- end -}}
{{- if $root.Values.authServer.ca.existingSecret -}}
{{- if not $authServer.url -}}
{{- fail "authServer.ca.existingSecret is set but config.tokens.auth_server.url is not" -}}
{{- end -}}
{{- $_ := set $authServer "ca_file" (include "mailgate.authServerCaFile" $root) -}}
{{- end -}}
{{- if $authServer -}}
{{- $_ := set $tokens "auth_server" $authServer -}}
{{- $_ := set $config "tokens" $tokens -}}
{{- end -}}
{{- end }}

{{/* client_auth: the accounts file (static) and the password-check server's password. */}}
{{- define "mailgate.config.clientAuth" -}}
{{- $root := .root -}}
{{- $config := .config -}}
{{- $clientAuth := get $config "client_auth" | default dict -}}
{{- if include "mailgate.mountClientAccounts" $root -}}
{{- $_ := set $clientAuth "accounts_file" (include "mailgate.clientAccountsFile" $root) -}}
{{- $_ := set $config "client_auth" $clientAuth -}}
{{- end -}}
{{- if and (include "mailgate.staticAuth" $root) (not (get $clientAuth "accounts")) (not (get $clientAuth "accounts_file")) -}}
{{- fail "config.client_auth.mode is static but no account is given: set clientAccounts.existingSecret or config.client_auth.accounts" -}}
{{- end -}}
{{- if $root.Values.clientAuthServer.existingSecret -}}
{{- if ne (toString (get $clientAuth "mode")) "auth_server" -}}
{{- fail "clientAuthServer.existingSecret is set but config.client_auth.mode is not auth_server" -}}
{{- end -}}
{{- $check := get $clientAuth "auth_server" | default dict -}}
{{- if or (hasKey $check "password_file") (hasKey $check "password_env") -}}
{{- fail "config.client_auth.auth_server has its own password_file or password_env: drop it or clientAuthServer.existingSecret" -}}
{{- end -}}
{{- $_ := set $check "password_file" (include "mailgate.clientAuthServerPasswordFile" $root) -}}
{{- $_ := set $clientAuth "auth_server" $check -}}
{{- end -}}
{{- end }}

{{/*
listeners[]: cert_file/key_file from the client TLS Secret (tls.existingSecret,
else <fullname>-tls) for every listener whose tls.mode is implicit or starttls
and that names no files; accept_proxy
from proxyProtocol.fromCIDRs for every listener that does not set it.
*/}}
{{- define "mailgate.config.listeners" -}}
{{- $root := .root -}}
{{- $secret := include "mailgate.tlsSecretName" $root -}}
{{- $dir := include "mailgate.tlsDir" $root -}}
{{- $proxy := $root.Values.proxyProtocol.fromCIDRs | default list -}}
{{- $used := false -}}
{{- range $index, $listener := get .config "listeners" | default list -}}
{{- if kindIs "map" $listener -}}
{{- $tls := get $listener "tls" -}}
{{- if and (kindIs "map" $tls) (has (toString (get $tls "mode")) (list "implicit" "starttls")) -}}
{{- $files := list (hasKey $tls "cert_file") (hasKey $tls "key_file") -}}
{{- if not (has true $files) -}}
{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $tls "key_file" (printf "%s/tls.key" $dir) -}}
{{- $used = true -}}
{{- else if has false $files -}}
{{- fail (printf "config.listeners[%d] (%v) names only one of tls.cert_file and tls.key_file: give both, or neither and let the chart fill them from tls.existingSecret" $index $listener.name) -}}
{{- end -}}
{{- end -}}
{{- if and $proxy (not (hasKey $listener "accept_proxy")) -}}
{{- $_ := set $listener "accept_proxy" $proxy -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $secret (not $used) -}}
{{- fail (printf "the client TLS Secret %s is mounted but no listener uses it: set tls.mode implicit or starttls (without cert_file and key_file) on a listener in config.listeners" $secret) -}}
{{- end -}}
{{- end }}

{{/*
tokens.oauth2: the store on the chart's volume (in Redis with redis.url) with its
key from a Secret, and the providers' client secrets, certificates and
service-account keys.
*/}}
{{- define "mailgate.config.oauth2" -}}
{{- $root := .root -}}
{{- $config := .config -}}
{{- $values := $root.Values.oauth2 -}}
{{- $tokens := get $config "tokens" | default dict -}}
{{- $oauth2 := get $tokens "oauth2" | default dict -}}
{{- $shared := include "mailgate.sharedRedis" $root -}}
{{- if $values.store.enabled -}}
{{- $store := get $oauth2 "store" | default dict -}}
{{- if $shared -}}
{{- /* The records live in Redis: mailgate needs no directory, the chart mounts no volume. */ -}}
{{- if $values.store.existingClaim -}}
{{- fail "oauth2.store.existingClaim is set, but with redis.url (or config.tokens.shared.redis) the refresh tokens live in Redis and no volume is mounted: drop it" -}}
{{- end -}}
{{- else if not (hasKey $store "dir") -}}
{{- $_ := set $store "dir" (include "mailgate.storeDir" $root) -}}
{{- else if not (hasPrefix (printf "%s/" (include "mailgate.stateDir" $root)) (toString $store.dir)) -}}
{{- fail (printf "config.tokens.oauth2.store.dir %v is not on the store's volume: leave it out, or name a directory below %s" $store.dir (include "mailgate.stateDir" $root)) -}}
{{- end -}}
{{- if $values.store.key.existingSecret -}}
{{- if or (hasKey $store "key_file") (hasKey $store "key_env") -}}
{{- fail "config.tokens.oauth2.store has its own key_file or key_env: drop it or oauth2.store.key.existingSecret" -}}
{{- end -}}
{{- $_ := set $store "key_file" (include "mailgate.storeKeyFile" $root) -}}
{{- else if not (or (hasKey $store "key_file") (hasKey $store "key_env")) -}}
{{- fail "oauth2.store.enabled needs the store key: set oauth2.store.key.existingSecret (32 random bytes, base64)" -}}
{{- end -}}
{{- $_ := set $oauth2 "store" $store -}}
{{- else if and (hasKey $oauth2 "store") (not $shared) -}}
{{- /* A store the chart does not mount must be on a volume of the user's: the root file system is read-only. */ -}}
{{- $dir := toString (get (get $oauth2 "store" | default dict) "dir") -}}
{{- $mounted := false -}}
{{- range $root.Values.extraVolumeMounts -}}
{{- if and .mountPath (or (eq $dir (toString .mountPath)) (hasPrefix (printf "%s/" (trimSuffix "/" (toString .mountPath))) $dir)) (not .readOnly) -}}
{{- $mounted = true -}}
{{- end -}}
{{- end -}}
{{- if not $mounted -}}
{{- fail (printf "config.tokens.oauth2.store.dir %v is on no writable volume (the root file system is read-only): set oauth2.store.enabled, which mounts one" $dir) -}}
{{- end -}}
{{- end -}}
{{- if $values.providers -}}
{{- $providers := get $oauth2 "providers" | default dict -}}
{{- range $name, $secret := $values.providers -}}
{{- $provider := get $providers $name -}}
{{- if not (kindIs "map" $provider) -}}
{{- fail (printf "oauth2.providers.%s: config.tokens.oauth2.providers has no provider %s" $name $name) -}}
{{- end -}}
{{- $dir := printf "%s/%s" (include "mailgate.oauth2Dir" $root) $name -}}
{{- if $secret.clientSecretKey -}}
{{- if or (hasKey $provider "client_secret_file") (hasKey $provider "client_secret_env") -}}
{{- fail (printf "config.tokens.oauth2.providers.%s has its own client secret: drop it or oauth2.providers.%s.clientSecretKey" $name $name) -}}
{{- end -}}
{{- $_ := set $provider "client_secret_file" (printf "%s/client-secret" $dir) -}}
{{- end -}}
{{- if $secret.clientCertificate -}}
{{- if hasKey $provider "client_certificate" -}}
{{- fail (printf "config.tokens.oauth2.providers.%s has its own client_certificate: drop it or oauth2.providers.%s.clientCertificate" $name $name) -}}
{{- end -}}
{{- $_ := set $provider "client_certificate" (dict "cert_file" (printf "%s/client.crt" $dir) "key_file" (printf "%s/client.key" $dir)) -}}
{{- end -}}
{{- if $secret.serviceAccountKey -}}
{{- if hasKey $provider "service_account_file" -}}
{{- fail (printf "config.tokens.oauth2.providers.%s has its own service_account_file: drop it or oauth2.providers.%s.serviceAccountKey" $name $name) -}}
{{- end -}}
{{- $_ := set $provider "service_account_file" (printf "%s/service-account.json" $dir) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if hasKey $oauth2 "store" -}}
{{- include "mailgate.checkStore" $root -}}
{{- end -}}
{{- if $oauth2 -}}
{{- $_ := set $tokens "oauth2" $oauth2 -}}
{{- $_ := set $config "tokens" $tokens -}}
{{- end -}}
{{- end }}

{{/*
A token store on files has one writer (values.yaml, oauth2.store): more replicas
only with oauth2.store.sharedByReplicas, and then on a volume they can all
mount. In Redis, replicas take turns through its lock: any number. Checked while
the configuration is assembled, so that it is reported before anything that
follows from it (onboarding's own one-replica rule).
*/}}
{{- define "mailgate.checkStore" -}}
{{- $store := .Values.oauth2.store -}}
{{- if include "mailgate.sharedRedis" . -}}
{{- /* No volume and no one-writer rule. */ -}}
{{- else if and (gt (int .Values.replicaCount) 1) (not $store.sharedByReplicas) -}}
{{- fail (printf "replicaCount %v with an OAuth2 token store on files: mailgate has no lock between processes there, so replicas sharing a store race each other's refresh-token rotations. Use replicaCount: 1 (scale mail traffic with a second release that uses this one's admin.tokenService as its auth server), keep the store in Redis (redis.url, docs/replicas.md), or read oauth2.store.sharedByReplicas in values.yaml and set it" .Values.replicaCount) -}}
{{- else if and $store.enabled $store.sharedByReplicas (not $store.existingClaim) (not (has "ReadWriteMany" $store.accessModes)) -}}
{{- fail "oauth2.store.sharedByReplicas needs a volume every replica can mount: add ReadWriteMany to oauth2.store.accessModes (with a StorageClass that offers it), or give oauth2.store.existingClaim" -}}
{{- end -}}
{{- if and (include "mailgate.storeVolume" .) (not (get (.Values.podSecurityContext | default dict) "fsGroup")) -}}
{{- fail "oauth2.store.enabled needs podSecurityContext.fsGroup (65534): without it the volume is not writable by mailgate's user" -}}
{{- end -}}
{{- end }}

{{/*
tokens.shared from redis: the URL and settings, the password, CA and sealing key
as files from Secrets. The password never goes in the configuration itself
(a ConfigMap), only the path of its file. Values given without redis.url are
refused rather than ignored.
*/}}
{{- define "mailgate.config.shared" -}}
{{- $root := .root -}}
{{- $config := .config -}}
{{- $values := $root.Values.redis -}}
{{- $tokens := get $config "tokens" | default dict -}}
{{- $url := toString $values.url -}}
{{- $files := dict "password_file" (list $values.password "redis.password" "mailgate.redisPasswordFile") "ca_file" (list $values.ca "redis.ca" "mailgate.redisCaFile") -}}
{{- if not $url -}}
{{- $given := dict "redis.tls" $values.tls "redis.sentinel" $values.sentinel "redis.cluster" $values.cluster "redis.username" $values.username "redis.keyPrefix" $values.keyPrefix "redis.timeout" $values.timeout "redis.password.existingSecret" $values.password.existingSecret "redis.ca.existingSecret" $values.ca.existingSecret "redis.sealingKey.existingSecret" $values.sealingKey.existingSecret -}}
{{- range $name := keys $given | sortAlpha -}}
{{- if get $given $name -}}
{{- fail (printf "%s is set but redis.url is not: set redis.url to share state through Redis, or drop %s" $name $name) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if hasKey $tokens "shared" -}}
{{- fail "config.tokens.shared is set and redis.url too: give one" -}}
{{- end -}}
{{- /* The URL is not echoed: it may hold the very password this refuses. */ -}}
{{- if or (regexMatch "^[^:/]+://[^/@]*:[^/@]*@" $url) (regexMatch "[?&]pass(word)?=" $url) -}}
{{- fail "redis.url holds a password, which would end up in the ConfigMap: remove it from the URL and put it in a Secret named by redis.password.existingSecret" -}}
{{- end -}}
{{- $redis := dict "url" $url -}}
{{- if $values.tls -}}
{{- $_ := set $redis "tls" true -}}
{{- end -}}
{{- if and $values.ca.existingSecret (not (or $values.tls (hasPrefix "rediss://" $url))) -}}
{{- fail "redis.ca.existingSecret is set but the connection to Redis is not TLS: use a rediss:// URL or redis.tls: true" -}}
{{- end -}}
{{- range $key, $wiring := $files -}}
{{- if (index $wiring 0).existingSecret -}}
{{- $_ := set $redis $key (include (index $wiring 2) $root) -}}
{{- end -}}
{{- end -}}
{{- with $values.username -}}
{{- $_ := set $redis "username" . -}}
{{- end -}}
{{- with $values.keyPrefix -}}
{{- $_ := set $redis "key_prefix" . -}}
{{- end -}}
{{- with $values.timeout -}}
{{- $_ := set $redis "timeout" . -}}
{{- end -}}
{{- with $values.sentinel -}}
{{- $_ := set $redis "sentinel" . -}}
{{- end -}}
{{- if $values.cluster -}}
{{- $_ := set $redis "cluster" true -}}
{{- end -}}
{{- $shared := dict "redis" $redis -}}
{{- /* mailgate seals with the store's key when there is a store, and refuses a second key then. */ -}}
{{- $hasStore := hasKey (get $tokens "oauth2" | default dict) "store" -}}
{{- if $values.sealingKey.existingSecret -}}
{{- if $hasStore -}}
{{- fail "redis.sealingKey.existingSecret is set, but with an OAuth2 token store its key (oauth2.store.key) seals everything replicas share and mailgate refuses a second one: drop redis.sealingKey" -}}
{{- end -}}
{{- $_ := set $shared "key_file" (include "mailgate.sharedKeyFile" $root) -}}
{{- else if not $hasStore -}}
{{- fail "redis.url needs a key to seal the access tokens replicas share in Redis: set redis.sealingKey.existingSecret (a Secret with 32 random bytes, base64), or use an OAuth2 token store (oauth2.store), whose key seals everything" -}}
{{- end -}}
{{- $_ := set $tokens "shared" $shared -}}
{{- $_ := set $config "tokens" $tokens -}}
{{- end -}}
{{- end }}

{{/*
admin (or its old name metrics): TLS, the onboarding page's and the token
service's passwords (the single one and each client's). Both pages need TLS here, as the chart never listens on
loopback; onboarding keeps its sign-ins in one process, so one replica.
*/}}
{{- define "mailgate.config.admin" -}}
{{- $root := .root -}}
{{- $config := .config -}}
{{- $key := ternary "metrics" "admin" (and (hasKey $config "metrics") (not (hasKey $config "admin"))) -}}
{{- $admin := get $config $key | default dict -}}
{{- with include "mailgate.adminTlsSecretName" $root -}}
{{- if hasKey $admin "tls" -}}
{{- fail (printf "config.%s.tls is set and admin.tls too: give one" $key) -}}
{{- end -}}
{{- $dir := include "mailgate.adminTlsDir" $root -}}
{{- $_ := set $admin "tls" (dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- with $root.Values.admin.tokenService.clients -}}
{{- $section := get $admin "token_service" | default dict -}}
{{- $clients := get $section "clients" | default dict -}}
{{- range $name, $client := . -}}
{{- if hasKey $clients $name -}}
{{- fail (printf "config.%s.token_service.clients.%s is set and admin.tokenService.clients.%s too: give one" $key $name $name) -}}
{{- end -}}
{{- $file := printf "%s/%s/password" (include "mailgate.tokenServiceClientsDir" $root) $name -}}
{{- $_ := set $clients $name (dict "password_file" $file "accounts" $client.accounts) -}}
{{- end -}}
{{- $_ := set $section "clients" $clients -}}
{{- $_ := set $admin "token_service" $section -}}
{{- end -}}
{{- $pages := dict "onboarding" (list $root.Values.admin.onboarding "mailgate.onboardingPasswordFile" "admin.onboarding") "token_service" (list $root.Values.admin.tokenService "mailgate.tokenServicePasswordFile" "admin.tokenService") -}}
{{- range $page, $wiring := $pages -}}
{{- $values := index $wiring 0 -}}
{{- if $values.existingSecret -}}
{{- $section := get $admin $page | default dict -}}
{{- if or (hasKey $section "password_file") (hasKey $section "password_env") -}}
{{- fail (printf "config.%s.%s has its own password_file or password_env: drop it or %s.existingSecret" $key $page (index $wiring 2)) -}}
{{- end -}}
{{- $_ := set $section "password_file" (include (index $wiring 1) $root) -}}
{{- $_ := set $admin $page $section -}}
{{- end -}}
{{- if and (hasKey $admin $page) (not (hasKey $admin "tls")) -}}
{{- fail (printf "config.%s.%s serves passwords and tokens and needs HTTPS off loopback: set admin.tls.existingSecret or admin.tls.certManager.enabled" $key $page) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $admin "onboarding") (gt (int $root.Values.replicaCount) 1) -}}
{{- fail (printf "config.%s.onboarding with replicaCount %v: the onboarding page keeps its sign-ins and form tokens in one process, so a browser sent to another replica is refused; run it with one replica" $key $root.Values.replicaCount) -}}
{{- end -}}
{{- if $admin -}}
{{- $_ := set $config $key $admin -}}
{{- end -}}
{{- end }}

{{/* "true" when the rendered configuration serves the admin endpoint over HTTPS. */}}
{{- define "mailgate.adminHttps" -}}
{{- $config := include "mailgate.config" . | fromYaml -}}
{{- $admin := get $config "admin" | default (get $config "metrics") | default dict -}}
{{- if hasKey $admin "tls" }}true{{ end -}}
{{- end }}

{{/* "true" when the rendered configuration has an OAuth2 token store. */}}
{{- define "mailgate.hasStore" -}}
{{- $config := include "mailgate.config" . | fromYaml -}}
{{- $oauth2 := get (get $config "tokens" | default dict) "oauth2" | default dict -}}
{{- if hasKey $oauth2 "store" }}true{{ end -}}
{{- end }}

{{/* "true" when the pods must not overlap: one writer on the token store's files. */}}
{{- define "mailgate.singleWriter" -}}
{{- if and (include "mailgate.hasStore" .) (not .Values.oauth2.store.sharedByReplicas) (not (include "mailgate.sharedRedis" .)) }}true{{ end -}}
{{- end }}

{{/*
"true" when replicas share state through Redis: redis.url, or
config.tokens.shared.redis given by hand.
*/}}
{{- define "mailgate.sharedRedis" -}}
{{- $tokens := get .Values.config "tokens" | default dict -}}
{{- $shared := get $tokens "shared" | default dict -}}
{{- if or .Values.redis.url (hasKey $shared "redis") }}true{{ end -}}
{{- end }}

{{/* "true" when the chart mounts the token store's volume (files, not Redis). */}}
{{- define "mailgate.storeVolume" -}}
{{- if and .Values.oauth2.store.enabled (not (include "mailgate.sharedRedis" .)) }}true{{ end -}}
{{- end }}
