#!/usr/bin/env bash
# Make what deploy/ needs but git must not hold:
#   deploy/secrets/{ca.crt,tls.crt,tls.key}  (or $1/) the webhook's TLS: a private CA and a
#        server certificate for shaper-webhook.<namespace>.svc (kustomize puts ca.crt
#        into the MutatingWebhookConfiguration's caBundle);
#   deploy/example/token  (or $2) the sidecars' API token (the example's shaper-token Secret).
# Existing files are kept, so re-running never rotates anything by surprise;
# delete them to rotate. Needs openssl.
#   NAMESPACE=shaper-system SERVICE=shaper-webhook DAYS=825 EXTRA_SANS="IP:10.0.0.1"
set -euo pipefail
here=$(dirname "$0")
out="${1:-$here/secrets}"
token="${2:-$here/example/token}"
ns="${NAMESPACE:-shaper-system}"
svc="${SERVICE:-shaper-webhook}"
days="${DAYS:-825}"
mkdir -p "$out"
chmod 700 "$out"
umask 077

if [ ! -s "$out/tls.crt" ] || [ ! -s "$out/tls.key" ] || [ ! -s "$out/ca.crt" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
        -subj "/CN=shaper-webhook-ca" -keyout "$work/ca.key" -out "$work/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
    sans="DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local"
    [ -z "${EXTRA_SANS:-}" ] || sans="$sans,$EXTRA_SANS"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$svc.$ns.svc" \
        -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' "$sans" \
        > "$work/ext.cnf"
    openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
        -days "$days" -extfile "$work/ext.cnf" -out "$work/tls.crt" 2>/dev/null
    install -m 0644 "$work/ca.crt" "$out/ca.crt"
    install -m 0644 "$work/tls.crt" "$out/tls.crt"
    install -m 0600 "$work/tls.key" "$out/tls.key"
    echo "secrets: webhook certificate for $svc.$ns.svc in $out (CA key discarded)"
fi
if [ ! -s "$token" ]; then
    # 32 random bytes, URL-safe: a bearer token for the sidecars' API.
    mkdir -p "$(dirname "$token")"
    openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n' > "$token"
    echo "secrets: new API token in $token"
fi
