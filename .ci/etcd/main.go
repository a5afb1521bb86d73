// Command etcd is etcd's server, built by .ci/build-components from its Go module (go.etcd.io/etcd/server/v3)
// for the Kubernetes tests: etcd's own main package lives in a module that go install cannot build.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
