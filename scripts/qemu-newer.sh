#!/usr/bin/env bash
# Unpack a newer QEMU (Debian bookworm-backports, 10.0 at the time of writing) into DIR
# without installing it, so it runs beside the system's QEMU 7.2:
#   scripts/qemu-newer.sh DIR      -> DIR/usr/bin/qemu-system-x86_64, firmware in DIR/usr/share/qemu
# Prints the binary's path on the last line. Exit 2 when no newer QEMU is available.
set -euo pipefail
dir=${1:?usage: qemu-newer.sh DIR}
bin="$dir/usr/bin/qemu-system-x86_64"
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then echo "$bin"; exit 0; fi
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
list=/etc/apt/sources.list.d/precopy-backports.list
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' | $sudo tee "$list" >/dev/null
fi
$sudo apt-get update -qq >/dev/null
policy=$(apt-cache policy qemu-system-x86)
if ! grep -q backports <<<"$policy"; then echo "no newer qemu-system-x86 in bookworm-backports" >&2; exit 2; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && apt-get download -q -t bookworm-backports qemu-system-x86 qemu-system-common qemu-system-data >/dev/null 2>&1 )
mkdir -p "$dir"
for f in "$tmp"/*.deb; do dpkg-deb -x "$f" "$dir"; done
# The unpacked binary still needs its shared libraries and the firmware its data
# package links to (seabios, ipxe-qemu): install what the package depends on, except
# the QEMU packages unpacked above (a fresh machine has none of them).
missing=()
for p in $(dpkg-deb -f "$tmp"/qemu-system-x86_*.deb Depends | tr ',' '\n' \
        | sed -E 's/\|.*//; s/\(.*\)//; s/[[:space:]]//g' | grep -v -e '^qemu-system-' -e '^$'); do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing what QEMU 10 needs: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports "${missing[@]}" >/dev/null
fi
if ldd "$bin" | grep -q "not found"; then ldd "$bin" | grep "not found" >&2; exit 2; fi
"$bin" --version | head -1 >&2
echo "$bin"
