#!/bin/sh
# One MinIO user per service, each with the policy of the prefixes it reads and writes (issue 16, item 3).
# Run by compose's `setup` service and the Kubernetes `store-users` Job (k8s/components/store-users), in the
# MinIO client image. The policies (POLICY_DIR/<service>.json) come from deploy/store_users.py; the bucket they
# name is replaced by A2V_S3_BUCKET. Each service's secret comes from A2V_S3_SECRET_KEY_<SERVICE>; its user
# (access key) is a2v-<service>. Running it again updates the policies and secrets in place.
set -eu
POLICY_DIR="${POLICY_DIR:-/policies}"
BUCKET="${A2V_S3_BUCKET:-audio2video}"
SCHEME=http
if [ "${A2V_S3_SECURE:-false}" = "true" ]; then SCHEME=https; fi
export MC_CONFIG_DIR="${MC_CONFIG_DIR:-/tmp/.mc}"
WORK="$(mktemp -d)"

mc alias set a2v "$SCHEME://$A2V_S3_ENDPOINT" "$A2V_S3_ACCESS_KEY" "$A2V_S3_SECRET_KEY" >/dev/null
mc mb --ignore-existing "a2v/$BUCKET"
for file in "$POLICY_DIR"/*.json; do
  service="$(basename "$file" .json)"
  upper="$(echo "$service" | tr '[:lower:]' '[:upper:]')"
  user="$(printenv "A2V_S3_ACCESS_KEY_$upper" || echo "a2v-$service")"
  secret="$(printenv "A2V_S3_SECRET_KEY_$upper" || true)"
  if [ -z "$secret" ]; then
    echo "setup-users: A2V_S3_SECRET_KEY_$upper is not set (the store secret of $service)" >&2
    exit 1
  fi
  if [ "$BUCKET" = audio2video ]; then
    cp "$file" "$WORK/$service.json"
  else
    sed "s|arn:aws:s3:::audio2video|arn:aws:s3:::$BUCKET|g" "$file" >"$WORK/$service.json"
  fi
  mc admin user add a2v "$user" "$secret" >/dev/null
  mc admin policy create a2v "a2v-$service" "$WORK/$service.json" >/dev/null
  if ! out="$(mc admin policy attach a2v "a2v-$service" --user "$user" 2>&1)"; then
    case "$out" in
      *already*) ;;  # attached by an earlier run
      *) echo "$out" >&2; exit 1 ;;
    esac
  fi
  echo "setup-users: $user has policy a2v-$service"
done
rm -rf "$WORK"
