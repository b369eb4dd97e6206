#!/usr/bin/env bash
# Spark 4 runs on Java 17 or newer: fail early and plainly rather than deep inside spark-submit.
set -euo pipefail
java_bin=${JAVA_HOME:+$JAVA_HOME/bin/}java
if ! command -v "$java_bin" >/dev/null 2>&1; then
  echo "error: Java not found (looked for '$java_bin'). Spark 4 needs Java 17+:" >&2
  echo "       sudo apt-get install -y openjdk-17-jre-headless   (or set JAVA_HOME)" >&2
  exit 1
fi
version_line=$("$java_bin" -version 2>&1 | head -n 1)
major=$(printf '%s' "$version_line" | sed -E 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1/')
# Java 8 and older report "1.x".
[ "$major" = 1 ] && major=$(printf '%s' "$version_line" | sed -E 's/.*version "1\.([0-9]+).*/\1/')
if ! [ "$major" -ge 17 ] 2>/dev/null; then
  echo "error: Spark 4 needs Java 17+, but '$java_bin' is: $version_line" >&2
  exit 1
fi
