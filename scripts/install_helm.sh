#!/usr/bin/env bash
# Install the chart tooling into ./.tools/bin (idempotent, project-local): helm, built from source with
# `go install` through the Go module proxy (no GitHub download needed). Skips the build when the pinned
# version is already there. Override the version with HELM_VERSION, the directory with TOOLS_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM_VERSION=${HELM_VERSION:-v3.21.4}
TOOLS_BIN=${TOOLS_BIN:-$PWD/.tools/bin}
HELM="$TOOLS_BIN/helm"

if [ -x "$HELM" ] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  exit 0
fi

command -v go >/dev/null 2>&1 || {
  echo "error: Go is needed to build helm $HELM_VERSION (https://go.dev/dl/)" >&2; exit 1; }

mkdir -p "$TOOLS_BIN"
echo "==> building helm $HELM_VERSION into $TOOLS_BIN (go install, one-time)"
# The module's go.mod pins the Go version it needs; GOTOOLCHAIN=auto lets an older go fetch that toolchain
# from the module proxy instead of failing. The -X flags stamp what helm's own Makefile stamps: its version and
# the Kubernetes version `helm template`/`helm lint` assume without --kube-version (that of its client-go,
# k8s.io/client-go v0.36 in helm v3.21 -> 1.36; go install would otherwise leave helm's fallback, 1.20).
K8S_MAJOR=${HELM_K8S_MAJOR:-1}
K8S_MINOR=${HELM_K8S_MINOR:-36}
LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  LDFLAGS+=" -X $pkg.k8sVersionMajor=$K8S_MAJOR -X $pkg.k8sVersionMinor=$K8S_MINOR"
done
GOBIN="$TOOLS_BIN" GOFLAGS="${GOFLAGS:-} -trimpath" GOTOOLCHAIN=${GOTOOLCHAIN:-auto} \
  go install -ldflags "$LDFLAGS" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
echo "==> installed: $("$HELM" version --short)"
