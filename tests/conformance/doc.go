// Package conformance drives a real kekd through the kube-apiserver's own
// KMS v2 client, health probe, envelope transformer and EncryptionConfiguration
// loader (k8s.io/apiserver), so kekd is proven against the code the apiserver
// runs rather than against our reading of it.
//
// TestKMSv2Conformance runs five scenarios (the shipped config is healthy; a
// Secret written and read back; rotation and retire; a kekd restart between
// write and read; outage and recovery) against every backend (local keyring,
// PKCS#11 on a SoftHSM2 token of its own), each with a `kekd serve` of its
// own on a temp socket. Run it with ./run.sh, which builds
// the release binary once and sets KEKD_BIN; `go test ./...` alone builds it in
// TestMain. KEKD_REQUIRE_ALL=1 turns a missing cargo or softhsm2 into a failure.
package conformance
