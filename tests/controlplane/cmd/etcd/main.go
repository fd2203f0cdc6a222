// Command etcd is a tiny wrapper around etcd's own entry point
// (go.etcd.io/etcd/server/v3/etcdmain), built at the etcd version that the
// pinned Kubernetes release (k8s.io/apiserver) requires.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
