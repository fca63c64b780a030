// Package conformance is the KMS v2 conformance suite of tests/conformance,
// pinned to k8s.io/apiserver v0.32.x: the first release whose KMS v2 client
// sends HTTP/2 :authority "localhost" (kubernetes#126930), so the oldest
// kube-apiserver kekd can serve.
//
// The test files are symlinks to ../../*_test.go, so the suite is written
// once and this module only pins the apiserver version (go.mod, go.sum).
// tests/conformance/run.sh runs it after building kekd; `go test ./...` here
// works too (TestMain builds kekd unless KEKD_BIN is set).
package conformance
