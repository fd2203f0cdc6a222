#!/usr/bin/env bash
# Regenerates go.mod/go.sum of the tools module (helm, pebble, pebble-challtestsrv, netpolicy).
# The tools live in their own module so that their dependencies never move the versions used by
# the control plane module (tests/controlplane).
# usage: tests/tools/gen-tools.sh
set -euo pipefail
cd "$(dirname "$0")"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
PEBBLE_VERSION="${PEBBLE_VERSION:-v2.10.3}"
# The module proxy lists no versions of netpol-analyzer (its version list is refused), but this
# exact release is served.
NETPOL_VERSION="${NETPOL_VERSION:-v1.4.4}"
# github.com/np-guard/models (a dependency of netpol-analyzer) is served by the module proxy, but
# the checksum database lookup for it answers 404 here; its hash is recorded in go.sum on first
# download (trust on first use) and checked against go.sum on every later build.
export GONOSUMDB="${GONOSUMDB:+$GONOSUMDB,}github.com/np-guard/models"
rm -f go.mod go.sum
go mod init github.com/opsconductor/opsconductor-operator/tests/tools
go get -tool \
  "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" \
  "github.com/letsencrypt/pebble/v2/cmd/pebble@${PEBBLE_VERSION}" \
  "github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv@${PEBBLE_VERSION}" \
  "github.com/np-guard/netpol-analyzer/cmd/netpolicy@${NETPOL_VERSION}"
go mod edit -go=1.26.0   # any Go 1.26 builds it
go mod tidy
