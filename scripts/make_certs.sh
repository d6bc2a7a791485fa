#!/usr/bin/env bash
# Make a test CA and certificates for rocoin's device RPCs (TLS / mTLS) with openssl.
# Usage: scripts/make_certs.sh OUT_DIR [HOST ...]   (hosts default to localhost 127.0.0.1)
# Writes ca.pem/ca.key, device.pem/device.key (server; SANs = the hosts), source.pem/source.key (client).
# For real deployments use your own CA; keep the *.key files private.
set -euo pipefail
out=${1:?usage: make_certs.sh OUT_DIR [HOST ...]}
shift || true
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)
mkdir -p "$out"
san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=rocoin test CA" \
  -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
for name in device source; do
  openssl req -newkey rsa:2048 -nodes -subj "/CN=rocoin $name" -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  ext="$out/$name.ext"
  if [ "$name" = device ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > "$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$ext"
  fi
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$out/$name.pem" 2>/dev/null
  rm -f "$out/$name.csr" "$ext"
done
chmod 600 "$out"/*.key
echo "wrote $out: ca.pem, device.pem/key (hosts: ${hosts[*]}), source.pem/key"
