#!/usr/bin/env bash
# Headless Chromium for the `mup probes view` browser tests, without root: Debian's chromium
# packages and the shared libraries this image lacks are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a cache folder; nothing is installed system-wide.
#
# Usage: bash scripts/get_chromium.sh [CACHE]     (default ~/.cache/mup-test/chromium)
# Prints the path of a `chromium` wrapper; point MUP_CHROMIUM at it (or put its folder on
# PATH) and the tests use it. A second run with a working cache only prints the path.
set -euo pipefail
CACHE=${1:-${MUP_CHROMIUM_CACHE:-$HOME/.cache/mup-test/chromium}}
WRAPPER="$CACHE/bin/chromium"
if [ -x "$WRAPPER" ] && "$WRAPPER" --version >/dev/null 2>&1; then
  echo "$WRAPPER"
  exit 0
fi
for tool in apt-get apt-cache dpkg dpkg-query ldd; do
  command -v "$tool" >/dev/null || { echo "get_chromium: needs $tool (a Debian system)" >&2; exit 1; }
done

WORK="$CACHE.partial"
rm -rf "$WORK"
mkdir -p "$WORK/debs" "$WORK/root" "$WORK/bin"
log() { echo "[get_chromium] $*" >&2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Private package lists in the cache (apt-get update as a normal user works against them).
APT=()
private_lists() {
  log "fetching package lists into $WORK/lists"
  mkdir -p "$WORK/lists/partial" "$WORK/apt-cache/archives/partial"
  APT=(-o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/apt-cache")
  apt-get "${APT[@]}" -qq update >&2
}

# chromium and, transitively, each library package it depends on that is not installed here.
# Only lib* dependencies: the rest (xdg-utils, desktop portals, x11-utils) serve a desktop
# session, not a headless browser; ldd below checks that nothing needed was left out.
download() {
  rm -rf "$WORK/debs" && mkdir -p "$WORK/debs"
  local -A seen=()
  local todo=(chromium chromium-common) get pkg
  while ((${#todo[@]})); do
    get=()
    for pkg in "${todo[@]}"; do
      [ -n "${seen[$pkg]:-}" ] && continue
      seen[$pkg]=1
      case "$pkg" in
        chromium | chromium-common) get+=("$pkg") ;;
        *) installed "$pkg" || get+=("$pkg") ;;
      esac
    done
    ((${#get[@]})) || break
    log "downloading ${get[*]}"
    (cd "$WORK/debs" && apt-get "${APT[@]}" -qq download "${get[@]}" >&2) || return 1
    mapfile -t todo < <(
      apt-cache "${APT[@]}" depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "${get[@]}" |
        awk '$1 == "Depends:" && $2 ~ /^lib/ { print $2 }' | sort -u
    )
  done
}

# The system's lists first; fresh private ones when they know no chromium or name a version
# the mirror no longer serves (lists go stale on an image).
if ! apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]' || ! download; then
  private_lists
  download
fi

for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/root"; done
BINARY="$WORK/root/usr/lib/chromium/chromium"
[ -x "$BINARY" ] || { echo "get_chromium: $BINARY missing after unpacking" >&2; exit 1; }
LIBDIRS=$(find "$WORK/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
missing=$(LD_LIBRARY_PATH="$LIBDIRS" ldd "$BINARY" | awk '/not found/ { print $1 }' | sort -u)
if [ -n "$missing" ]; then
  echo "get_chromium: chromium still lacks: $(echo $missing)" >&2
  exit 1
fi

# The wrapper runs the unpacked binary from its final place: library paths relative to it.
REL_LIBS=$(echo "$LIBDIRS" | sed "s|$WORK/root|\$ROOT|g")
cat >"$WORK/bin/chromium" <<EOF
#!/bin/sh
# Made by scripts/get_chromium.sh: Debian's chromium unpacked under this folder's parent.
ROOT="\$(cd "\$(dirname "\$0")/.." && pwd)/root"
LIBS="$REL_LIBS"
export LD_LIBRARY_PATH="\$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$ROOT/usr/lib/chromium/chromium" "\$@"
EOF
chmod +x "$WORK/bin/chromium"
rm -rf "$WORK/debs" "$WORK/lists" "$WORK/apt-cache"
"$WORK/bin/chromium" --version >&2
rm -rf "$CACHE"
mv "$WORK" "$CACHE"
echo "$WRAPPER"
