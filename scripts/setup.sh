#!/usr/bin/env bash
# Install what shaper and its test tiers need on Debian, as root. Idempotent.
#  - Debian packages: bcc (python3-bpfcc), libbpf1, iproute2, kernel headers,
#    the VM tier's stock kernel image and qemu, ping, and Prometheus (a real
#    server scrapes the daemon in the kernel tier); iptables, ipset and iperf3
#    for the peers' mechanisms in bench/; podman, buildah, runc and debootstrap
#    to build and run the sidecar image (no Docker engine, no registry).
#    Also: procps (sysctl in the labs), bpftool (bench.classifier_cost), make (a
#    minbase Debian has none), busybox-static (virtme-ng copies it into the VM's
#    initramfs). tests/fresh/ checks this list against what the code runs.
#  - Headers for the running kernel: where none are installed (a cloud kernel
#    without modules), point /lib/modules/$(uname -r)/build at Debian's headers
#    so bcc can compile (see ../shared/ENVIRONMENT.md).
#  - A venv (.venv) made from Debian's python3 with --system-site-packages, so
#    the bcc module from python3-bpfcc is importable; never PyPI's 'bcc'.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (it installs Debian packages)" >&2
    exit 1
fi

# Two kernel series for the VM tier (what netem accepts differs between them), each with
# its headers for bcc in the guest; tests find the images by glob.
PKGS=(python3-bpfcc libbpf1 iproute2 python3-venv gcc linux-headers-amd64 linux-image-amd64
      linux-image-6.12-amd64 linux-headers-6.12-amd64
      qemu-system-x86 iputils-ping kmod prometheus util-linux
      iptables ipset iperf3 curl openssl procps bpftool make
      podman buildah runc uidmap slirp4netns fuse-overlayfs debootstrap busybox-static)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Prometheus is only for the tests, which start their own on a namespace's
    # loopback: do not leave the packaged service running on the host's :9090.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

rel=$(uname -r)
if [ ! -d "/lib/modules/$rel/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    # The headers linux-headers-amd64 brings (6.1, what the host tiers were measured with),
    # not merely the newest: the VM tier's 6.12 headers are installed too.
    hdr=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 2>/dev/null | grep -o 'linux-headers-[^ ,]*-amd64' | head -n 1)
    hdr=${hdr:+/usr/src/$hdr}
    [ -n "$hdr" ] && [ -d "$hdr" ] || hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | head -n 1)
    if [ -z "$hdr" ]; then
        echo "setup: no kernel headers for $rel and none from linux-headers-amd64" >&2
        exit 1
    fi
    common=${hdr%-amd64}-common
    echo "setup: no headers for running kernel $rel; using $hdr for bcc"
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$hdr" "/lib/modules/$rel/build"
    ln -sfn "$common" "/lib/modules/$rel/source"
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
# bench/ (make bench, tests/kernel/test_bench_smoke.py): tcconfig, the peer tool the
# benchmarks compare with, in its own venv. It pins its own pyroute2 and pulls docker's
# client, so it never goes into .venv.
if [ ! -x .venv-bench/bin/tcset ]; then
    rm -rf .venv-bench
    /usr/bin/python3 -m venv .venv-bench
    .venv-bench/bin/pip install -q --disable-pip-version-check tcconfig
fi
echo "setup: ready (.venv, bcc $(.venv/bin/python -c 'import bcc, importlib.metadata as m; print(getattr(bcc, "__version__", "?"))' 2>/dev/null || echo ?))"
