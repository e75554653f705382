#!/usr/bin/env bash
# Local stand-ins for the public base images, for machines that cannot reach a registry.
# A test harness only: the Dockerfiles keep the pinned public bases as their defaults and
# get these through build arguments (scripts/containers/build_images.sh, the compose
# override in tests/deploy/). Nothing here ships in the images users pull.
#
#   bash scripts/containers/bases.sh        # idempotent: a second run takes seconds
#
# Makes localhost/meshllm-base/debian:bookworm (debootstrap minbase),
#       localhost/meshllm-base/python:3.11-bookworm (Debian's python3, venv, pip trust),
#       localhost/meshllm-base/etcd:bookworm (Debian's etcd-server, at the paths the
#       quay.io/coreos/etcd image uses).
# Needs root (apt, debootstrap). See ../../../shared/FIELD-NOTES.md, "Containers".
set -euo pipefail

DEBIAN_IMAGE=localhost/meshllm-base/debian:bookworm
PYTHON_IMAGE=localhost/meshllm-base/python:3.11-bookworm
ETCD_IMAGE=localhost/meshllm-base/etcd:bookworm
WORK=${MESHLLM_BASES_DIR:-/var/tmp/meshllm-bases}
SUITE=bookworm

log() { printf '[bases %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

timed() {  # timed LABEL CMD...: runs CMD and logs how long it took
    local label=$1 start=$SECONDS
    shift
    "$@"
    log "$label: $((SECONDS - start)) s"
}

install_tools() {
    if command -v podman >/dev/null && command -v debootstrap >/dev/null \
        && command -v runc >/dev/null; then
        return
    fi
    log "installing podman and friends with apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah fuse-overlayfs \
        slirp4netns uidmap debootstrap crun runc >/dev/null
}

# crun refuses hybrid cgroups and both runtimes refuse podman's default rlimits here, so
# the engine needs runc, cgroupfs and ulimits it may set. An existing file is the
# machine owner's: it is never overwritten, only checked.
configure_engine() {
    local conf=/etc/containers/containers.conf
    if [[ -e $conf ]]; then
        grep -q 'runtime *= *"runc"' "$conf" \
            || log "WARNING: $conf exists without runtime = \"runc\"; podman may fail here"
        return
    fi
    log "writing $conf (runc, cgroupfs, ulimits)"
    mkdir -p /etc/containers
    cat >"$conf" <<'CONF'
# Written by mesh-llm scripts/containers/bases.sh for a host without systemd and with
# hybrid cgroups: crun rejects those, and the default rlimits exceed what runc may set.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
}

apt_mirror() {  # the Debian mirror this machine's apt uses
    local uri
    uri=$(grep -h -m1 -E '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' || true)
    if [[ -z $uri ]]; then
        uri=$(grep -h -m1 -E '^deb .*/debian/? ' /etc/apt/sources.list 2>/dev/null \
            | awk '{print $2}' || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_debian() {
    podman image exists "$DEBIAN_IMAGE" && return
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs" && mkdir -p "$WORK"
    log "debootstrap $SUITE from $(apt_mirror)"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$(apt_mirror)" >"$WORK/debootstrap.log"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# Builds image $1 from the Containerfile on stdin, unless it exists. The context is a
# scratch folder holding this machine's CA bundle and pip.conf, so that pip inside the
# image builds trusts the same proxy the host does (compose builds cannot pass -v).
build_from() {
    local image=$1 ctx=$WORK/ctx-${1##*/}
    podman image exists "$image" && { cat >/dev/null; return; }
    rm -rf "$ctx" && mkdir -p "$ctx"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
    if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$ctx/pip.conf"; else : >"$ctx/pip.conf"; fi
    cat >"$ctx/Containerfile"
    podman build --format docker -q -t "$image" "$ctx" >/dev/null
    rm -rf "$ctx"
}

build_python() {
    # /usr/local/bin/python like the official image; pip trust for builds behind a proxy.
    build_from "$PYTHON_IMAGE" <<CONTAINERFILE
FROM $DEBIAN_IMAGE
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 \
        ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]
CONTAINERFILE
}

build_etcd() {
    # The compose file runs /usr/local/bin/etcd and etcdctl, as in quay.io/coreos/etcd.
    build_from "$ETCD_IMAGE" <<CONTAINERFILE
FROM $DEBIAN_IMAGE
RUN apt-get update \
 && apt-get install -y --no-install-recommends etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/etcd /usr/local/bin/etcd \
 && ln -sf /usr/bin/etcdctl /usr/local/bin/etcdctl
ENV ETCDCTL_API=3
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
CONTAINERFILE
}

main() {
    [[ $(id -u) == 0 ]] || { echo "bases.sh needs root (apt, debootstrap)" >&2; exit 1; }
    timed "tools" install_tools
    configure_engine
    timed "debian base $DEBIAN_IMAGE" build_debian
    timed "python base $PYTHON_IMAGE" build_python
    timed "etcd base $ETCD_IMAGE" build_etcd
    podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep meshllm-base || true
}

main "$@"
