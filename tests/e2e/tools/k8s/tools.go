//go:build tools

// Package tools pins the commands tests/e2e/run.sh builds:
//
//	go build -o BIN k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
