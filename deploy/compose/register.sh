#!/bin/sh
# One-shot for compose.yaml: registers each site's public key with the SuperLink (node
# authentication), once. A marker beside the SuperLink's database records each site, so
# a site is registered again only when the database is new.
set -eu
export FLWR_HOME=/tmp/flwr
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedhead"

[superlink.fedhead]
address = "$SUPERLINK_ADDRESS"
root-certificates = "/etc/fedhead/certs/ca.crt"
TOML
mkdir -p /var/lib/fedhead/registered
for site in $SITES; do
  marker=/var/lib/fedhead/registered/$site
  if [ -f "$marker" ]; then
    echo "register: $site is registered already"
    continue
  fi
  tries=0
  until flwr supernode register "/etc/fedhead/certs/$site.pub" fedhead --name "$site"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
      echo "register: could not register $site at $SUPERLINK_ADDRESS" >&2
      exit 1
    fi
    sleep 2
  done
  touch "$marker"
done
echo "register: sites registered: $SITES"
