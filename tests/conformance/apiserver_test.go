package conformance

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

const (
	// providerName is the KMS provider name in deploy/encryption-config.yaml;
	// it is part of every stored value's prefix and must never change.
	providerName = "kekd"
	// storedPrefix starts every value the apiserver writes through kekd.
	storedPrefix = "k8s:enc:kms:v2:" + providerName + ":"
	// apiServerID names our "apiserver" in the apiserver's metrics.
	apiServerID = "kekd-conformance"
	// positiveTTL is how long the apiserver's KMS v2 probe caches a healthy
	// Status (kmsPluginHealthzPositiveTTL in encryptionconfig).
	positiveTTL = 20 * time.Second
)

var (
	secrets    = schema.GroupResource{Resource: "secrets"}
	configmaps = schema.GroupResource{Resource: "configmaps"}
)

// apiserver is what kube-apiserver builds from --encryption-provider-config:
// the transformers and the kms-providers health check, built by the
// apiserver's own loader.
type apiserver struct {
	cfg     *encryptionconfig.EncryptionConfiguration
	health  healthz.HealthChecker
	secrets value.Transformer
	// timeout is the KMS call timeout of the loaded configuration.
	timeout time.Duration
	cancel  context.CancelFunc
}

var endpointLine = regexp.MustCompile(`(?m)^(\s*endpoint:\s*)(\S+)`)

// loadShippedConfig loads deploy/encryption-config.yaml, exactly as shipped
// except that the endpoint is kekd's test socket, with
// encryptionconfig.LoadEncryptionConfig — the function kube-apiserver calls.
// Every call is a fresh apiserver: new gRPC connection, new probe state and
// an empty seed cache.
func loadShippedConfig(t *testing.T, socket string) *apiserver {
	t.Helper()
	shipped, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "encryption-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(endpointLine.FindAllIndex(shipped, -1)); n != 1 {
		t.Fatalf("deploy/encryption-config.yaml has %d endpoint lines; the suite expects exactly one (the kekd provider)", n)
	}
	rewritten := endpointLine.ReplaceAll(shipped, []byte("${1}unix://"+socket))
	path := filepath.Join(t.TempDir(), "encryption-config.yaml")
	if err := os.WriteFile(path, rewritten, 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, apiServerID)
	if err != nil {
		cancel()
		t.Fatalf("encryptionconfig.LoadEncryptionConfig(deploy/encryption-config.yaml): %v", err)
	}
	if len(cfg.HealthChecks) != 1 {
		cancel()
		t.Fatalf("LoadEncryptionConfig returned %d health checks, want 1 (kms-providers)", len(cfg.HealthChecks))
	}
	return &apiserver{
		cfg:     cfg,
		health:  cfg.HealthChecks[0],
		secrets: encryptionconfig.StaticTransformers(cfg.Transformers).TransformerForResource(secrets),
		// LoadEncryptionConfig sets KMSCloseGracePeriod to twice the sum of
		// the KMS v2 timeouts; the shipped config has one KMS v2 provider.
		timeout: cfg.KMSCloseGracePeriod / 2,
		cancel:  cancel,
	}
}

// close stops the apiserver's probes and closes its gRPC connection.
func (a *apiserver) close() { a.cancel() }

// check runs the /healthz/kms-providers check the apiserver serves.
func (a *apiserver) check() error {
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, "/healthz/kms-providers", nil)
	if err != nil {
		panic(err)
	}
	return a.health.Check(req)
}

func (a *apiserver) mustBeHealthy(t *testing.T) {
	t.Helper()
	if err := a.check(); err != nil {
		t.Fatalf("kms-providers health check: %v", err)
	}
}

// write stores payload as the secret at etcd key etcdKey, as the apiserver's
// storage layer does (the etcd key is the authenticated data).
func (a *apiserver) write(t *testing.T, etcdKey string, payload []byte) []byte {
	t.Helper()
	stored, err := a.secrets.TransformToStorage(context.Background(), payload, value.DefaultContext(etcdKey))
	if err != nil {
		t.Fatalf("TransformToStorage(%s): %v", etcdKey, err)
	}
	return stored
}

// read decodes a stored secret as the apiserver's storage layer does.
func (a *apiserver) read(etcdKey string, stored []byte) ([]byte, bool, error) {
	return a.secrets.TransformFromStorage(context.Background(), stored, value.DefaultContext(etcdKey))
}

// mustRead reads a stored secret that must decode to payload with the given
// staleness.
func (a *apiserver) mustRead(t *testing.T, etcdKey string, stored, payload []byte, wantStale bool) {
	t.Helper()
	got, stale, err := a.read(etcdKey, stored)
	if err != nil {
		t.Fatalf("TransformFromStorage(%s): %v", etcdKey, err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("TransformFromStorage(%s) returned %q, want %q", etcdKey, got, payload)
	}
	if stale != wantStale {
		t.Fatalf("TransformFromStorage(%s): stale=%v, want %v", etcdKey, stale, wantStale)
	}
}

// decode checks the etcd value's prefix, decodes its EncryptedObject and
// validates it with the apiserver's own validation.
func decode(t *testing.T, stored []byte) *kmstypes.EncryptedObject {
	t.Helper()
	if !bytes.HasPrefix(stored, []byte(storedPrefix)) {
		n := min(len(stored), len(storedPrefix)+8)
		t.Fatalf("stored value starts with %q, want prefix %q", stored[:n], storedPrefix)
	}
	o := &kmstypes.EncryptedObject{}
	// MessageV2Of: the apiserver's EncryptedObject is a protobuf-go message
	// in v0.37 but a gogo-generated one in v0.32 (compat/v0.32 runs this file).
	if err := proto.Unmarshal(stored[len(storedPrefix):], protoadapt.MessageV2Of(o)); err != nil {
		t.Fatalf("stored value is not an EncryptedObject: %v", err)
	}
	if err := envelopekmsv2.ValidateEncryptedObject(o); err != nil {
		t.Fatalf("stored EncryptedObject fails the apiserver's validation: %v", err)
	}
	return o
}

// waitForWriteKeyID drives the health check, as the apiserver's /healthz and
// background probes do, until writes carry wantKeyID. The probe caches a
// healthy Status for 20 s, so this takes up to that long.
func (a *apiserver) waitForWriteKeyID(t *testing.T, wantKeyID string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	probeKey := "/registry/secrets/kube-system/conformance-key-id-probe"
	var lastErr error
	var lastKeyID string
	for {
		lastErr = a.check()
		lastKeyID = decode(t, a.write(t, probeKey, []byte("probe"))).KeyID
		if lastKeyID == wantKeyID {
			if lastErr != nil {
				t.Fatalf("writes use key_id %q but the health check fails: %v", wantKeyID, lastErr)
			}
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s of health checks, writes still carry key_id %q, want %q (last health check error: %v)",
				within, lastKeyID, wantKeyID, lastErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
