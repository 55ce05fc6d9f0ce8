#!/usr/bin/env bash
# `make container` / `make container-run` / `make container-stop`: build the champion's Bento
# into an image; start it on 127.0.0.1 with the monitoring volume and wait for /readyz; stop it.
# The settings are the Makefile's POX_-prefixed variables (POX_CONTAINER_ENGINE, POX_IMAGE,
# POX_BASE_IMAGE, POX_DEBIAN_IMAGE, POX_DEBIAN_MIRROR, POX_EXTRA_CA_CERTS, POX_PYPI_INDEX,
# POX_CONTAINER_NAME, POX_PORT, POX_MONITORING_DIR_HOST, POX_READY_TIMEOUT_S,
# POX_STOP_TIMEOUT_S); an unset one is an error (set -u).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=$POX_CONTAINER_ENGINE
name=$POX_CONTAINER_NAME
# The image's user (BentoML's `bentoml`, uid and gid 1034), which must own the monitoring volume.
IMAGE_UID=1034

# A value from one of the project's YAML files, named once there: `setting FILE KEY.KEY`.
setting() {
  python -c 'import sys, yaml
value = yaml.safe_load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value[key]
print(value)' "$1" "$2"
}

build() {
  local base=${POX_BASE_IMAGE:-$POX_DEBIAN_IMAGE} serve_base context tag version revision
  if [ -z "$POX_BASE_IMAGE" ] && ! "$engine" image inspect "$POX_DEBIAN_IMAGE" >/dev/null 2>&1
  then
    deploy/base-image.sh "$POX_DEBIAN_IMAGE"
  fi
  serve_base=$(setting bentofile.yaml docker.base_image)  # what the Bento's image starts FROM
  context=$(mktemp -d)
  trap 'rm -rf "$context"' RETURN
  mkdir "$context/extra-ca-certificates"
  for cert in $POX_EXTRA_CA_CERTS; do  # update-ca-certificates reads *.crt files only
    cp "$cert" "$context/extra-ca-certificates/$(basename "${cert%.*}").crt"
  done
  "$engine" build --quiet --file deploy/serve-base.Containerfile --build-arg BASE_IMAGE="$base" \
    --build-arg PYPI_INDEX="$POX_PYPI_INDEX" --tag "$serve_base" "$context" >/dev/null
  tag=$(bentoml build --output tag | sed -n 's/^__tag__://p')
  version=${tag#*:}
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  mapfile -t labels < <(python deploy/labels.py "$tag" "$revision")
  # BentoML issue 5566: containerize checks its temporary copy of the Dockerfile template
  # against the working directory, so it runs from the folder the temporary copy is made in.
  (cd "${TMPDIR:-/tmp}" && bentoml containerize "$tag" --backend "$engine" \
    --image-tag "$POX_IMAGE:$version" "${labels[@]/#/--label=}")
  "$engine" tag "$POX_IMAGE:$version" "$POX_IMAGE:latest"
  echo "built $POX_IMAGE:$version and $POX_IMAGE:latest from the Bento $tag"
}

# The value of an ENV the image sets (deploy/bento.Containerfile.j2): `image_env NAME`.
image_env() {
  "$engine" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' \
    "$POX_IMAGE:latest" | sed -n "s/^$1=//p"
}

state() {
  "$engine" container inspect --format '{{.State.Status}}' "$name" 2>/dev/null || true
}

remove() {
  "$engine" rm --force "$name" >/dev/null 2>&1 || true
}

# The host folder as the image's monitoring directory, owned by the image's user: podman's `:U`
# chowns it (recursively) to the container's uid; docker has no such option, so the folder is
# chowned here (as root), or the error says what to run.
monitoring_volume() {
  local inside=$1
  mkdir -p "$POX_MONITORING_DIR_HOST"
  if [ "$engine" = podman ]; then
    echo "$POX_MONITORING_DIR_HOST:$inside:U"
    return
  fi
  if [ "$(stat -c %u "$POX_MONITORING_DIR_HOST")" != "$IMAGE_UID" ] \
    && ! chown -R "$IMAGE_UID:$IMAGE_UID" "$POX_MONITORING_DIR_HOST" 2>/dev/null; then
    echo "$POX_MONITORING_DIR_HOST must belong to the image's user (uid $IMAGE_UID): run" \
      "sudo chown -R $IMAGE_UID:$IMAGE_UID '$POX_MONITORING_DIR_HOST'" >&2
    exit 1
  fi
  echo "$POX_MONITORING_DIR_HOST:$inside"
}

# Read-only root with tmpfs /tmp (BentoML's home and temporary files), no capabilities, and the
# monitoring volume. A stopped container of the same name (left by an interrupted run) is
# removed first; a running one is refused. One that does not become ready is removed, after its
# log is shown, and so is one whose wait is interrupted.
run() {
  local url="http://127.0.0.1:$POX_PORT" started=$SECONDS inside volume status metrics
  inside=$(image_env POX_MONITORING_DIR)
  if [ -z "$inside" ]; then
    echo "$POX_IMAGE:latest sets no POX_MONITORING_DIR: rebuild it with make container" >&2
    exit 1
  fi
  case "$(state)" in
    "") ;;
    running | paused)
      echo "$name is already running: make container-stop (or POX_CONTAINER_NAME=)" >&2
      exit 1 ;;
    *)
      echo "$name: removing the stopped container of that name left by an earlier run" >&2
      remove ;;
  esac
  volume=$(monitoring_volume "$inside")
  "$engine" run --detach --name "$name" --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges --volume "$volume" \
    --publish "127.0.0.1:$POX_PORT:$(setting params.yaml serve.port)" "$POX_IMAGE:latest" \
    >/dev/null
  trap 'remove; exit 130' INT TERM
  until curl --silent --fail --max-time 2 --output /dev/null "$url/readyz"; do
    status=$(state)
    if [ $((SECONDS - started)) -ge "$POX_READY_TIMEOUT_S" ] || [ "$status" != running ]; then
      "$engine" logs "$name" >&2 || true
      remove
      echo "$name: no answer from $url/readyz after $((SECONDS - started)) s ($status): its" \
        "log is above; the container is removed" >&2
      exit 1
    fi
    sleep 1
  done
  trap - INT TERM
  echo "$name ($POX_IMAGE:latest) ready on $url after $((SECONDS - started)) s; monitoring" \
    "directory $POX_MONITORING_DIR_HOST (in the container: $inside)"
  # The service starts with monitoring off where it cannot write its records: say so here too.
  metrics=$(curl --silent --max-time 10 "$url/metrics" || true)
  if grep -q '^pox_monitoring_enabled 0' <<<"$metrics"; then
    echo "WARNING: monitoring is off: $(grep '^pox_monitoring_info' <<<"$metrics")" >&2
  fi
}

# SIGTERM, SIGKILL after POX_STOP_TIMEOUT_S; then the stopped container is removed.
stop() {
  "$engine" stop --time "$POX_STOP_TIMEOUT_S" "$name" >/dev/null
  "$engine" rm "$name" >/dev/null
}

"$@"
