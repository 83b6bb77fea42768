#!/usr/bin/env bash
# Make what deploy/agent/ needs but git must not hold:
#   deploy/agent/token  (or $1) the agents' API token (the shaper-agent-token
#        Secret; a harness sends it as "Authorization: Bearer TOKEN").
# An existing token is kept, so re-running never rotates it by surprise; delete
# it to rotate. Needs only coreutils.
set -euo pipefail
here=$(dirname "$0")
token="${1:-$here/token}"
umask 077

if [ ! -s "$token" ]; then
    # 32 random bytes, URL-safe: as deploy/secrets.sh makes the sidecars' token.
    mkdir -p "$(dirname "$token")"
    head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$token"
    echo "secrets: new agent API token in $token"
fi
