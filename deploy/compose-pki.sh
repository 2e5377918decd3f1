#!/bin/sh
# A throwaway CA and one certificate per service for docker compose with TLS (deploy/compose.tls.yaml), made with
# the openssl of the images (python:3.11-slim has it: ca-certificates depends on it). Never for production:
# Kubernetes gets its certificates from cert-manager (k8s/components/secure).
#
#   compose-pki.sh DIR NAME...
#
# DIR/<name>/ gets tls.crt, tls.key and the CA as ca.crt (the layout of a cert-manager Secret, so the same A2V_TLS_
# paths serve both): server and client use, naming <name>, localhost and 127.0.0.1 (the health check asks the
# container's own loopback). The name `a2v` gets a client certificate only, for the command line on the host.
# DIR/ca/ keeps the CA's key, which no service mounts. Run again, it keeps what is still valid for a day and
# replaces the rest; keys are written beside and renamed into place. As root it gives each service's folder to
# A2V_PKI_OWNER (default 10001:10001, the images' user).
set -eu

if [ "$#" -lt 2 ]; then
  echo "usage: $0 DIR NAME..." >&2
  exit 1
fi
dir=$1
shift
days=${A2V_PKI_DAYS:-30}
owner=${A2V_PKI_OWNER:-10001:10001}
subject="/O=audio2video compose"
umask 077

valid() {  # a certificate that exists and is valid for another day
  [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1
}

mkdir -p "$dir/ca"
ca_key=$dir/ca/ca.key
ca_crt=$dir/ca/ca.crt
if [ ! -s "$ca_key" ] || ! valid "$ca_crt"; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca_key.new"
  openssl req -x509 -new -key "$ca_key.new" -sha256 -days "$days" -subj "$subject/CN=audio2video compose CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$ca_crt.new"
  mv -f "$ca_key.new" "$ca_key"
  mv -f "$ca_crt.new" "$ca_crt"
fi

for name in "$@"; do
  out=$dir/$name
  mkdir -p "$out"
  chmod 755 "$out"
  if valid "$out/tls.crt" && cmp -s "$ca_crt" "$out/ca.crt" \
    && openssl verify -CAfile "$ca_crt" "$out/tls.crt" >/dev/null 2>&1; then
    continue
  fi
  if [ "$name" = a2v ]; then
    usage=clientAuth
    names=URI:spiffe://audio2video/a2v
  else
    usage=serverAuth,clientAuth
    names=DNS:$name,DNS:localhost,IP:127.0.0.1
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/tls.key.new"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=$usage" "subjectAltName=$names" >"$out/extensions.new"
  openssl req -new -key "$out/tls.key.new" -subj "$subject/CN=$name" |
    openssl x509 -req -CA "$ca_crt" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" -days "$days" \
      -sha256 -extfile "$out/extensions.new" -out "$out/tls.crt.new"
  rm -f "$out/extensions.new"
  cp "$ca_crt" "$out/ca.crt.new"
  chmod 644 "$out/tls.crt.new" "$out/ca.crt.new"
  chmod 400 "$out/tls.key.new"
  if [ "$(id -u)" = 0 ]; then
    chown "$owner" "$out/tls.key.new" "$out/tls.crt.new" "$out/ca.crt.new"
  fi
  mv -f "$out/ca.crt.new" "$out/ca.crt"
  mv -f "$out/tls.key.new" "$out/tls.key"
  mv -f "$out/tls.crt.new" "$out/tls.crt"
  echo "certificate for $name: $(openssl x509 -in "$out/tls.crt" -noout -enddate)"
done
