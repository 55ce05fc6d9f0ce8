#!/usr/bin/env bash
# `make container` / `make container-run` / `make container-stop`: build the champion's Bento
# into an image; start it on 127.0.0.1 and wait for /readyz; stop it. The settings are the
# Makefile's variables (CONTAINER_ENGINE, IMAGE, BASE_IMAGE, DEBIAN_IMAGE, DEBIAN_MIRROR,
# EXTRA_CA_CERTS, PYPI_INDEX, CONTAINER_NAME, PORT, READY_TIMEOUT_S, STOP_TIMEOUT_S).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=$CONTAINER_ENGINE

# A value from one of the project's YAML files, named once there: `setting FILE KEY.KEY`.
setting() {
  python -c 'import sys, yaml
value = yaml.safe_load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value[key]
print(value)' "$1" "$2"
}

build() {
  local base=${BASE_IMAGE:-$DEBIAN_IMAGE} serve_base context tag version revision
  if [ -z "$BASE_IMAGE" ] && ! "$engine" image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    deploy/base-image.sh "$DEBIAN_IMAGE"
  fi
  serve_base=$(setting bentofile.yaml docker.base_image)  # what the Bento's image starts FROM
  context=$(mktemp -d)
  trap 'rm -rf "$context"' RETURN
  mkdir "$context/extra-ca-certificates"
  for cert in $EXTRA_CA_CERTS; do  # update-ca-certificates reads *.crt files only
    cp "$cert" "$context/extra-ca-certificates/$(basename "${cert%.*}").crt"
  done
  "$engine" build --quiet --file deploy/serve-base.Containerfile --build-arg BASE_IMAGE="$base" \
    --build-arg PYPI_INDEX="$PYPI_INDEX" --tag "$serve_base" "$context" >/dev/null
  tag=$(bentoml build --output tag | sed -n 's/^__tag__://p')
  version=${tag#*:}
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  mapfile -t labels < <(python deploy/labels.py "$tag" "$revision")
  # BentoML issue 5566: containerize checks its temporary copy of the Dockerfile template
  # against the working directory, so it runs from the folder the temporary copy is made in.
  (cd "${TMPDIR:-/tmp}" && bentoml containerize "$tag" --backend "$engine" \
    --image-tag "$IMAGE:$version" "${labels[@]/#/--label=}")
  "$engine" tag "$IMAGE:$version" "$IMAGE:latest"
  echo "built $IMAGE:$version and $IMAGE:latest from the Bento $tag"
}

# Read-only root with tmpfs /tmp (BentoML's home and temporary files), no capabilities.
run() {
  local url="http://127.0.0.1:$PORT" started=$SECONDS
  "$engine" run --detach --name "$CONTAINER_NAME" --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges \
    --publish "127.0.0.1:$PORT:$(setting params.yaml serve.port)" "$IMAGE:latest" >/dev/null
  until curl --silent --fail --max-time 2 --output /dev/null "$url/readyz"; do
    if [ $((SECONDS - started)) -ge "$READY_TIMEOUT_S" ] || [ "$(state)" != running ]; then
      "$engine" logs "$CONTAINER_NAME" >&2 || true
      echo "$CONTAINER_NAME: no answer from $url/readyz; container-stop removes it" >&2
      exit 1
    fi
    sleep 1
  done
  echo "$CONTAINER_NAME ($IMAGE:latest) ready on $url after $((SECONDS - started)) s"
}

state() {
  "$engine" container inspect --format '{{.State.Status}}' "$CONTAINER_NAME" 2>/dev/null || true
}

# SIGTERM, SIGKILL after STOP_TIMEOUT_S; then the stopped container is removed.
stop() {
  "$engine" stop --time "$STOP_TIMEOUT_S" "$CONTAINER_NAME" >/dev/null
  "$engine" rm "$CONTAINER_NAME" >/dev/null
}

"$@"
