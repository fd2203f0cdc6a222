#!/usr/bin/env bash
# Regenerates go.mod/go.sum of the node add-ons module: the CNI reference plugins (bridge,
# host-local, loopback, portmap), CoreDNS, kube-router and crictl. kubelet, kube-proxy and kube-scheduler
# are NOT here: they come from the control plane's module (tests/controlplane), so that they are
# the same Kubernetes release as the API server. These add-ons live in their own module so that
# their dependencies (client-go of another minor, cloud SDKs of CoreDNS, gobgp of kube-router)
# never move the control plane's versions.
# usage: tests/node/gen-node.sh
set -euo pipefail
cd "$(dirname "$0")"
CNI_VERSION="${CNI_VERSION:-v1.10.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
# The only version of kube-router/v2 the module proxy serves; security flaws are reported for it
# (see docs/node.md): it runs only as the NetworkPolicy enforcer of the test node.
KUBE_ROUTER_VERSION="${KUBE_ROUTER_VERSION:-v2.1.0}"
# crictl talks CRI to containerd: `scripts/cluster down` removes pod sandboxes through it, so that
# the CNI plugins release their addresses, veths and rules.
CRICTL_VERSION="${CRICTL_VERSION:-v1.37.0}"
rm -f go.mod go.sum
go mod init github.com/opsconductor/opsconductor-operator/tests/node
go get -tool \
  "github.com/containernetworking/plugins/plugins/main/bridge@${CNI_VERSION}" \
  "github.com/containernetworking/plugins/plugins/ipam/host-local@${CNI_VERSION}" \
  "github.com/containernetworking/plugins/plugins/main/loopback@${CNI_VERSION}" \
  "github.com/containernetworking/plugins/plugins/meta/portmap@${CNI_VERSION}" \
  "github.com/coredns/coredns@${COREDNS_VERSION}" \
  "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@${KUBE_ROUTER_VERSION}" \
  "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}"
# The CNI plugins v1.10.0 name `go 1.26.8` (the machine's Go), so go.mod says so too.
go mod tidy
