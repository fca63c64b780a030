// Package conformance records what kube-apiserver 1.31 (k8s.io/apiserver
// v0.31.x) gets from kekd: its KMS v2 client sends the socket path as the
// HTTP/2 :authority and kekd's HTTP/2 server (the h2 crate) resets every
// stream with PROTOCOL_ERROR (kubernetes#126929). record_test.go asserts the
// exact failure, so the README's "1.32 or newer" is measured; it fails if
// kekd ever starts serving these clients.
//
// main_test.go, kekd_test.go and apiserver_test.go are symlinks to the
// suite's helpers in ../../ (build kekd, run `kekd serve`, load the shipped
// EncryptionConfiguration with the apiserver's own loader).
package conformance
