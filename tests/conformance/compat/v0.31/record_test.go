package conformance

import (
	"context"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/apiserver/pkg/storage/value"
	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

// What kube-apiserver 1.31 (k8s.io/apiserver v0.31.x) sees when it talks to
// kekd. Its KMS v2 client dials the socket path as the gRPC target without
// grpc.WithAuthority, so every request carries the socket path as HTTP/2
// :authority; the h2 crate under tonic refuses such a request with
// RST_STREAM(PROTOCOL_ERROR) (kubernetes#126929, fixed in v0.32 by
// kubernetes#126930, which added grpc.WithAuthority("localhost")).
//
// These tests measure that, so the README's "1.32 or newer" is a recorded
// result rather than an assumption. If kekd ever learns to serve these
// clients, TestV031ClientRejected fails and says so: then run the full suite
// pinned to v0.31 (a compat/v0.31 module like compat/v0.32) and widen the
// README's statement.

const (
	// rejected is the error text the v0.31 client reports for every call:
	// grpc-go's rendering of the server's RST_STREAM(PROTOCOL_ERROR).
	rejected = "stream terminated by RST_STREAM with error code: PROTOCOL_ERROR"
	// rejectedCode is grpc-go's status code for that reset.
	rejectedCode = codes.Internal
	// callTimeout is the shipped config's KMS timeout.
	callTimeout = 3 * time.Second
)

// TestV031ClientRejected: the v0.31 gRPC client (NewGRPCService, the code
// kube-apiserver 1.31 runs) cannot make a single call to kekd; each fails
// at once with the reset, not after the call timeout.
func TestV031ClientRejected(t *testing.T) {
	requireKekd(t)
	k := newKekd(t, backends[0])
	k.start()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	svc, err := envelopekmsv2.NewGRPCService(ctx, "unix://"+k.socket, providerName, callTimeout)
	if err != nil {
		t.Fatalf("NewGRPCService: %v", err)
	}
	calls := []struct {
		name string
		call func() error
	}{
		{"Status", func() error { _, err := svc.Status(ctx); return err }},
		{"Encrypt", func() error {
			_, err := svc.Encrypt(ctx, "uid-1", []byte("0123456789abcdef0123456789abcdef"))
			return err
		}},
		{"Decrypt", func() error {
			_, err := svc.Decrypt(ctx, "uid-2", &kmsservice.DecryptRequest{Ciphertext: []byte("x"), KeyID: "kekd/x/v1"})
			return err
		}},
	}
	for _, c := range calls {
		start := time.Now()
		err := c.call()
		took := time.Since(start)
		if err == nil {
			t.Fatalf("k8s.io/apiserver v0.31 %s succeeded against kekd: kekd now serves kube-apiserver 1.31 clients. "+
				"Run the full conformance suite pinned to v0.31 (like compat/v0.32) and update the README's Compatibility section", c.name)
		}
		t.Logf("v0.31 NewGRPCService → %s: failed after %s: %v", c.name, took.Round(time.Millisecond), err)
		if got := status.Code(err); got != rejectedCode {
			t.Errorf("%s: gRPC code %v, want %v", c.name, got, rejectedCode)
		}
		if !strings.Contains(err.Error(), rejected) {
			t.Errorf("%s: error does not contain %q: %v", c.name, rejected, err)
		}
		if took >= callTimeout {
			t.Errorf("%s took %s: a rejection should be immediate, not the %s call timeout", c.name, took, callTimeout)
		}
	}
}

// TestV031ApiserverUnhealthy: what a 1.31 apiserver built from the shipped
// deploy/encryption-config.yaml (v0.31's own loader) reports: the
// kms-providers health check fails with the reset and no secret can be
// written.
func TestV031ApiserverUnhealthy(t *testing.T) {
	requireKekd(t)
	k := newKekd(t, backends[0])
	k.start()

	a := loadShippedConfig(t, k.socket)
	defer a.close()
	err := a.check()
	if err == nil {
		t.Fatal("a v0.31 apiserver finds kekd healthy: kekd now serves kube-apiserver 1.31; update the compatibility matrix")
	}
	t.Logf("v0.31 /healthz/kms-providers: %v", err)
	// v0.31 names the provider by index; v0.32+ says "KMS Provider kekd".
	for _, want := range []string{"kms-provider-0: ", rejected} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the health check error does not contain %q: %v", want, err)
		}
	}
	_, werr := a.secrets.TransformToStorage(context.Background(), []byte("payload"), value.DefaultContext("/registry/secrets/default/v031"))
	if werr == nil {
		t.Fatal("a v0.31 apiserver wrote a secret through kekd")
	}
	t.Logf("v0.31 TransformToStorage: %v", werr)
	// The probe never got a Status and Encrypt through, so there is no DEK seed.
	if !strings.Contains(werr.Error(), "unexpected nil transformer") {
		t.Errorf("TransformToStorage error does not contain %q: %v", "unexpected nil transformer", werr)
	}
}

// TestV031CauseIsAuthority pins the cause: with the v0.31 client's grpc-go
// and KMS v2 stubs, a connection dialled exactly as v0.31's NewGRPCService
// does fails against kekd, and the same dial plus the one option v0.32 added,
// grpc.WithAuthority("localhost"), succeeds against the same kekd. A plain
// HTTP/2 listener records the :authority the real v0.31 client sends.
func TestV031CauseIsAuthority(t *testing.T) {
	requireKekd(t)

	sent := authoritySentByV031Client(t)
	t.Logf("the v0.31 client sends :authority %q (the socket path, percent-encoded)", sent)

	k := newKekd(t, backends[0])
	k.start()
	_, keyID := k.primary()

	for _, tc := range []struct {
		name      string
		authority string // "" = no grpc.WithAuthority, as in v0.31
		wantOK    bool
	}{
		{"v0.31 dial", "", false},
		{"v0.31 dial + WithAuthority(localhost) (the v0.32 fix)", "localhost", true},
	} {
		resp, err := statusWithAuthority(t, k.socket, tc.authority)
		switch {
		case tc.wantOK && err != nil:
			t.Errorf("%s: Status failed: %v", tc.name, err)
		case tc.wantOK && resp.KeyId != keyID:
			t.Errorf("%s: Status key_id %q, want %q", tc.name, resp.KeyId, keyID)
		case !tc.wantOK && err == nil:
			t.Errorf("%s: Status succeeded; kekd now accepts a path as :authority", tc.name)
		case !tc.wantOK && !strings.Contains(err.Error(), rejected):
			t.Errorf("%s: error does not contain %q: %v", tc.name, rejected, err)
		case tc.wantOK:
			t.Logf("%s: Status ok, key_id %q", tc.name, resp.KeyId)
		default:
			t.Logf("%s: Status: %v", tc.name, err)
		}
	}
	if t.Failed() {
		return
	}
	// kekd shrugs the rejected streams off: still serving, nothing fatal.
	if _, err := statusWithAuthority(t, k.socket, "localhost"); err != nil {
		t.Fatalf("kekd stopped serving after rejecting path authorities: %v", err)
	}
}

// statusWithAuthority calls Status over a fresh connection dialled as
// v0.31's NewGRPCService does, plus grpc.WithAuthority(authority) unless
// authority is "".
func statusWithAuthority(t *testing.T, socket, authority string) (*kmsapi.StatusResponse, error) {
	t.Helper()
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			return net.DialUnix("unix", nil, &net.UnixAddr{Name: socket})
		}),
	}
	if authority != "" {
		opts = append(opts, grpc.WithAuthority(authority))
	}
	conn, err := grpc.Dial(socket, opts...) // v0.31's call: the socket path is the target

	if err != nil {
		t.Fatalf("grpc.Dial: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
}

// authoritySentByV031Client points v0.31's NewGRPCService at a plain HTTP/2
// server (golang.org/x/net/http2, which accepts any :authority) and returns
// the :authority of its Status request.
func authoritySentByV031Client(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kekd-h2-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "kms.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	var (
		mu   sync.Mutex
		seen []string
		wg   sync.WaitGroup
	)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Host)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", "12") // Unimplemented: enough to end the call
		w.WriteHeader(http.StatusOK)
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv := &http2.Server{}
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				srv.ServeConn(c, &http2.ServeConnOpts{Handler: handler})
			}()
		}
	}()

	ctx, cancel := context.WithCancel(context.Background())
	svc, err := envelopekmsv2.NewGRPCService(ctx, "unix://"+socket, providerName, callTimeout)
	if err != nil {
		cancel()
		t.Fatalf("NewGRPCService: %v", err)
	}
	_, err = svc.Status(ctx)
	t.Logf("v0.31 Status against a plain HTTP/2 server: %v", err)
	cancel() // closes the client connection
	l.Close()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(seen) == 0 {
		t.Fatal("the v0.31 client sent no request to the HTTP/2 recorder")
	}
	if path, err := url.PathUnescape(seen[0]); err != nil || path != socket {
		t.Errorf("the v0.31 client sent :authority %q, expected the (percent-encoded) socket path %q", seen[0], socket)
	}
	return seen[0]
}
