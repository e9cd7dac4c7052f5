#!/usr/bin/env bash
# Fetch (once) a runnable standalone Nacos server for tests and CI.
#
#   bash tools/nacos-server/fetch.sh        # prints the cache dir on stdout
#
# Needs only Java 17+ and Maven 3 with access to Maven Central. Downloads go through
# Maven's own local repository (~/.m2), so they are cached too. The result lands in
#   ${GRAYAGENT_CACHE:-$HOME/.cache/grayagent}/nacos-<version>/
#     lib/*.jar        the server's dependencies (dependency:copy-dependencies)
#     classpath.txt    the jar names in Maven's order (order matters: two hessian jars)
#     classes/         NacosTestMain.class, compiled from src/NacosTestMain.java
#     READY            marker, written last; holds a hash of pom.xml + src
# When READY exists and matches the current inputs, this script does nothing.
set -euo pipefail

NACOS_VERSION="${NACOS_VERSION:-3.1.0-bugfix}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${GRAYAGENT_CACHE:-$HOME/.cache/grayagent}"
dest="$cache_root/nacos-$NACOS_VERSION"
marker="$dest/READY"

inputs_hash() {
    { echo "$NACOS_VERSION"; cat "$here/pom.xml" "$here/src/NacosTestMain.java"; } | sha256sum | cut -d' ' -f1
}
want="$(inputs_hash)"

is_ready() { [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$want" ]]; }

if is_ready; then
    echo "$dest"
    exit 0
fi

for tool in java javac mvn; do
    command -v "$tool" >/dev/null || { echo "fetch.sh: $tool is not installed" >&2; exit 2; }
done

mkdir -p "$cache_root"
# One fetcher at a time (parallel test runs, CI); the loser waits, then finds READY.
exec 9>"$cache_root/nacos-$NACOS_VERSION.lock"
flock 9
if is_ready; then
    echo "$dest"
    exit 0
fi

stage="$(mktemp -d "$cache_root/.nacos-$NACOS_VERSION.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

echo "fetch.sh: resolving Nacos $NACOS_VERSION into $dest (first run downloads ~190 MB)" >&2
mvn -q -B -Dstyle.color=never -f "$here/pom.xml" -Dnacos.version="$NACOS_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$stage/lib" -DincludeScope=runtime >&2
mvn -q -B -Dstyle.color=never -f "$here/pom.xml" -Dnacos.version="$NACOS_VERSION" \
    dependency:build-classpath -DincludeScope=runtime -Dmdep.outputFile="$stage/classpath.m2" >&2
tr ':' '\n' <"$stage/classpath.m2" | sed '/^$/d' | xargs -n1 basename >"$stage/classpath.txt"
rm "$stage/classpath.m2"
while read -r jar; do
    [[ -f "$stage/lib/$jar" ]] || { echo "fetch.sh: $jar is on the classpath but was not copied" >&2; exit 1; }
done <"$stage/classpath.txt"

mkdir -p "$stage/classes"
javac -nowarn -encoding UTF-8 --release 17 -cp "$stage/lib/*" -d "$stage/classes" "$here/src/NacosTestMain.java" >&2

rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
echo "$want" >"$marker.tmp"
mv "$marker.tmp" "$marker"
echo "$dest"
