//go:build tools

// Package kube pins the Kubernetes binaries the tests run (kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet, kubectl) of one release: built by .ci/build-components from the Go module proxy, never
// vendored. go.mod requires k8s.io/kubernetes and replaces its k8s.io/* staging modules by their published versions.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
