#!/bin/sh
# One-shot setup for compose.yaml, run as root in the fedhead image at every `up`.
# Creates what is missing and never replaces what exists:
#   /secrets         the operator's copy: CA, SuperLink certificate, one key pair per site,
#                    the app-signing key and trusted-entities.yaml, the signed app,
#                    Grafana's admin password (this is SECRETS_DIR on the host)
#   /kits/<service>  what each service may read, owned by the image's user (uid 10001)
#   /demo-data       the demo X-rays split over the sites, one <site>/data.npz each
#   /targets         Prometheus' scrape targets, from the metrics addresses in .env
set -eu
umask 077
fedhead_uid=10001

hosts=""
for name in $(echo "$SUPERLINK_NAMES" | tr ',' ' '); do hosts="$hosts --host $name"; done
if [ ! -f /secrets/server.crt ]; then
  # shellcheck disable=SC2086  # one --host per name
  fedhead certs --out /secrets $hosts
fi
for site in $SITES; do
  [ -f "/secrets/sites/$site.key" ] || fedhead certs --out /secrets --site "$site"
done
if [ ! -f /secrets/app-signer.key ]; then
  fedhead certs --out /secrets --app-signer
fi
# The app the sites run: the one installed in this image, signed at every `up` so that the
# SuperLink always serves the app of the image it runs. Sites run only apps signed so.
fedhead app sign --key /secrets/app-signer.key --app /opt/fedhead --out /secrets/signed-app --force
if [ ! -f /secrets/grafana-admin-password ]; then
  python3 -c 'import secrets; print(secrets.token_urlsafe(18))' > /secrets/grafana-admin-password
  echo "Grafana's admin password is in SECRETS_DIR/grafana-admin-password"
fi

give() {  # give DIR MODE FILE...: copy the files into DIR for the service's user
  dir=$1 mode=$2; shift 2
  if [ ! -d "$dir" ]; then
    echo "setup: $dir is not mounted: give the setup service the volume for it" >&2
    exit 2
  fi
  for file in "$@"; do
    install -m "$mode" -o "$fedhead_uid" -g "$fedhead_uid" "$file" "$dir/"
  done
}
give /kits/superlink 0600 /secrets/ca.crt /secrets/server.crt /secrets/server.key
install -d -m 0755 -o "$fedhead_uid" -g "$fedhead_uid" /kits/superlink/signed-app
give /kits/superlink/signed-app 0644 /secrets/signed-app/app.fab /secrets/signed-app/signature.json
give /kits/register 0644 /secrets/ca.crt
for site in $SITES; do
  give /kits/register 0644 "/secrets/sites/$site.pub"
  give "/kits/$site" 0644 /secrets/ca.crt /secrets/trusted-entities.yaml
  install -m 0600 -o "$fedhead_uid" -g "$fedhead_uid" "/secrets/sites/$site.key" "/kits/$site/site.key"
done
install -m 0644 /secrets/grafana-admin-password /kits/grafana/grafana-admin-password

missing=""
for site in $SITES; do
  [ -f "/demo-data/$site/data.npz" ] || missing="$missing,$site"
done
if [ -n "$missing" ]; then
  umask 022
  fedhead data demo-split --out /demo-data --sites "${missing#,}"
fi

umask 022
python3 - <<'PY'
import json
import os
from pathlib import Path

from fedhead.common.files import atomic_writer

def write(name, groups):
    with atomic_writer(Path("/targets") / name) as f:
        f.write(json.dumps(groups, indent=1).encode())

write("server.json", [{"targets": [os.environ["SUPERLINK_METRICS_ADDRESS"]]}])
sites = [item.split("=", 1) for item in os.environ["SITE_METRICS"].split()]
write("sites.json", [{"targets": [address], "labels": {"site": site}} for site, address in sites])
alertmanager = os.environ.get("ALERTMANAGER_ADDRESS", "")
write("alertmanagers.json", [{"targets": [alertmanager]}] if alertmanager else [])
PY
echo "setup: certificates, the signed app, site kits, demo data and Prometheus targets are ready"
