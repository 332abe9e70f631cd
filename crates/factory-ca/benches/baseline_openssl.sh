#!/usr/bin/env bash
# Baseline for the issuance benchmark: the openssl CLI loop that provisioning scripts
# commonly use. Same outputs per device as `jitr issue`. Prints {"devices":N,"seconds":S}.
set -euo pipefail
ca_cert=$1 ca_key=$2 count=$3 out=$4
mkdir -p "$out"
ext=$(mktemp)
trap 'rm -f "$ext"' EXIT
cat > "$ext" <<'CNF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
start=$(date +%s.%N)
for ((n = 0; n < count; n++)); do
  id=$(printf '%032x' "$n")
  d="$out/$id"
  mkdir -p "$d"
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/device.key")
  openssl req -new -key "$d/device.key" -subj "/CN=$id" |
    openssl x509 -req -CA "$ca_cert" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
      -days 3652 -extfile "$ext" -out "$d/device.crt" 2>/dev/null
  cat "$d/device.crt" "$ca_cert" > "$d/chain.pem"
  fp=$(openssl x509 -in "$d/device.crt" -outform der | sha256sum | cut -d' ' -f1)
  serial=$(openssl x509 -in "$d/device.crt" -noout -serial | cut -d= -f2)
  printf '{"id":"%s","serial":"%s","certificate_id":"%s"}\n' "$id" "$serial" "$fp" >> "$out/manifest.jsonl"
done
end=$(date +%s.%N)
printf '{"devices":%d,"seconds":%s}\n' "$count" "$(echo "$end - $start" | bc -l)"
