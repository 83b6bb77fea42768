# The shaper image: the daemon (`shaper run`, the pod sidecar) and the admission
# webhook (`shaper webhook`). bcc is Debian's python3-bpfcc; the kernel headers
# it compiles against come from the node at run time (the sidecar mounts the
# node's /lib/modules and /usr/src read-only; the daemon names what is missing).
#   podman build -t shaper .        (or: make image, which needs no registry)

# -- build: a venv holding shaper and the libraries Debian has too old ----------
FROM debian:bookworm-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY shaper /src/shaper
COPY bpf /src/bpf
# --system-site-packages: bcc's Python module is Debian's, in dist-packages.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret:
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv --system-site-packages /opt/shaper \
 && /opt/shaper/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile /src
# Lets scripts/image.sh remove this stage's image once the build is done.
LABEL io.shaper.stage=build

# -- run ------------------------------------------------------------------------
FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc iproute2 \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 # bcc's compiler never needs these in a container: the headers are the node's.
 && rm -rf /usr/share/bcc/tools /usr/share/bcc/examples /usr/sbin/*-bpfcc
COPY --from=build /opt/shaper /opt/shaper
ENV PATH=/opt/shaper/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Non-root by default (the webhook needs nothing more); the sidecar the webhook
# injects runs as root with CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON only.
USER 65532:65532
# The daemon handles SIGTERM: it stops serving and removes what it created.
STOPSIGNAL SIGTERM
# No HEALTHCHECK: Kubernetes probes /readyz (the API port, 2332).
EXPOSE 2332 8443
ENTRYPOINT ["shaper"]
CMD ["--help"]
