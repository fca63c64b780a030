//go:build tools

// Package tools pins etcdctl, built by tests/e2e/run.sh as
//
//	go build -o BIN go.etcd.io/etcd/etcdctl/v3
package tools

import _ "go.etcd.io/etcd/etcdctl/v3"
