#!/usr/bin/env bash
# Installs everything ftvm needs on a fresh Debian bookworm x86-64 machine, skipping what is there.
# Run as root. Used by the README's commands and by .ci/run.
set -euo pipefail

log() { printf '[install] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (apt-get, /dev/kvm, network namespaces)" >&2
    exit 1
fi

# Debian packages. rustc-web and llvm-22-dev come from bookworm-security; libstd-rust-web-dev-bpf
# carries the precompiled `core` for the BPF targets (see shared/TOOLCHAIN.md).
packages=(
    rustc-web libstd-rust-web-dev-bpf llvm-22-dev   # eBPF toolchain
    redis-tools                                      # redis-cli, redis-benchmark: the real clients
    iproute2 iputils-ping tcpdump procps             # namespaces, veth, TAP, captures, sysctl in a namespace
    build-essential pkg-config                       # C for -sys crates
    etcd-server                                      # the quorum's etcd backend is tested against a real etcd
    libibverbs-dev librdmacm-dev libclang-dev        # the RDMA A-Link (rdma-sys: bindgen needs LLVM 14's libclang)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
    log "Debian packages present"
fi

# bpf-linker, built against Debian's LLVM 22 (about 5 minutes, once).
if ! command -v bpf-linker >/dev/null 2>&1; then
    log "cargo install bpf-linker (llvm-22)"
    PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22
else
    log "bpf-linker present: $(bpf-linker --version 2>/dev/null || echo unknown version)"
fi

# cargo-fuzz, for `cargo xtask fuzz` (libFuzzer itself is built from the libfuzzer-sys crate; the
# targets build with the stable toolchain, see xtask/src/fuzz.rs).
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "cargo install cargo-fuzz"
    cargo install cargo-fuzz --locked
else
    log "cargo-fuzz present: $(cargo fuzz --version)"
fi

# Shared memory in huge pages where asked for (MADV_HUGEPAGE): a backup's standby image becomes
# guest RAM at a takeover, and a VMM whose RAM is in 2 MiB pages is torn down in about 1 ms when it
# dies, instead of about 30 ms, before its A-Link socket closes and the other host takes over.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w "$thp" ] && grep -q '\[never\]' "$thp"; then
    log "transparent huge pages for shared memory: advise (was never)"
    echo advise > "$thp"
fi

[ -c /dev/kvm ] || { echo "install.sh: /dev/kvm is missing: ftvm needs KVM" >&2; exit 1; }
log "done"
