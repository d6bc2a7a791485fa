#!/usr/bin/env bash
# Make a test CA and certificates for rocoin's device RPCs (TLS / mTLS) with openssl.
# Usage: scripts/make_certs.sh OUT_DIR [HOST ...] [--join-id ID ...]
#   (hosts default to localhost 127.0.0.1)
# Writes ca.pem/ca.key, device.pem/device.key (server; SANs = the hosts), source.pem/source.key (client),
# and for each --join-id ID a client certificate join-ID.pem/join-ID.key whose common name is ID: what a
# device presents to join a source served with mTLS (`rocoin device join --id ID --tls-cert ... --tls-key ...`).
# For real deployments use your own CA; keep the *.key files private.
set -euo pipefail
out=${1:?usage: make_certs.sh OUT_DIR [HOST ...] [--join-id ID ...]}
shift || true
hosts=()
join_ids=()
while [ $# -gt 0 ]; do
  if [ "$1" = --join-id ]; then
    [ $# -ge 2 ] || { echo "make_certs.sh: --join-id needs a device id" >&2; exit 2; }
    [[ $2 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "make_certs.sh: --join-id $2: expected letters, digits, '.', '_' or '-'" >&2; exit 2; }
    join_ids+=("$2")
    shift 2
  else
    hosts+=("$1")
    shift
  fi
done
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)
mkdir -p "$out"
san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=rocoin test CA" \
  -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
issue() {  # issue NAME COMMON_NAME EXTENSIONS
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$out/$1.key" -out "$out/$1.csr" 2>/dev/null
  printf '%b' "$3" > "$out/$1.ext"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
    -days 365 -extfile "$out/$1.ext" -out "$out/$1.pem" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}
issue device "rocoin device" "subjectAltName=$san\nextendedKeyUsage=serverAuth\n"
issue source "rocoin source" "extendedKeyUsage=clientAuth\n"
for id in ${join_ids[@]+"${join_ids[@]}"}; do
  issue "join-$id" "$id" "extendedKeyUsage=clientAuth\n"
done
chmod 600 "$out"/*.key
echo "wrote $out: ca.pem, device.pem/key (hosts: ${hosts[*]}), source.pem/key${join_ids[*]+, join certificates for: ${join_ids[*]}}"
