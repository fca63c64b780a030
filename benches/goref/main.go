// Command goref is the Go baseline of kekd's benchmark: the KMS v2 plugin a
// Go shop would write, on the Kubernetes project's own server package
// (k8s.io/kms/pkg/service.NewGRPCService), in the shape of the upstream
// reference/mock plugin. It is a benchmark baseline, not a product: one key,
// no rotation, no keyring file format.
//
// Two key sources, chosen by flags:
//
//	goref -socket S -key-file F
//	    AES-256-GCM in this process (crypto/aes); F holds 32 raw key bytes
//	    and is created (0600) on first use.
//	goref -socket S -pkcs11-module M -token-label L -pin-file P [-key-label K]
//	    AES-256-GCM inside a PKCS#11 token through github.com/ThalesGroup/crypto11,
//	    as the upstream mock does with SoftHSM; the key is generated in the
//	    token on first use and found by label afterwards.
//
// Ciphertext: a fresh random 12-byte nonce followed by the GCM ciphertext and
// tag. Status is answered from memory (the key id), like kekd's.
//
// SIGTERM or SIGINT stops it gracefully and removes the socket.
package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ThalesGroup/crypto11"
	"k8s.io/kms/pkg/service"
)

const nonceLen = 12

func main() {
	socket := flag.String("socket", "", "unix socket path to serve on (required)")
	keyFile := flag.String("key-file", "", "local mode: file with the 32-byte AES key (created 0600 if missing)")
	module := flag.String("pkcs11-module", "", "PKCS#11 mode: the module (.so) to load")
	tokenLabel := flag.String("token-label", "", "PKCS#11 mode: the token's label")
	pinFile := flag.String("pin-file", "", "PKCS#11 mode: file holding the user PIN")
	keyLabel := flag.String("key-label", "goref-kek", "PKCS#11 mode: label of the AES key in the token")
	maxSessions := flag.Int("max-sessions", 0, "PKCS#11 mode: crypto11 session pool bound (0: crypto11's default)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("goref: ")

	if *socket == "" {
		log.Fatal("-socket is required")
	}
	var (
		svc *plugin
		err error
	)
	switch {
	case *keyFile != "" && *module == "":
		svc, err = localPlugin(*keyFile)
	case *module != "" && *keyFile == "":
		svc, err = pkcs11Plugin(*module, *tokenLabel, *pinFile, *keyLabel, *maxSessions)
	default:
		log.Fatal("give exactly one of -key-file (local AES) or -pkcs11-module (with -token-label, -pin-file)")
	}
	if err != nil {
		log.Fatal(err)
	}
	// A socket left by a killed run would make Listen fail.
	if err := os.Remove(*socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Fatalf("remove stale socket: %v", err)
	}
	srv := service.NewGRPCService(*socket, 3*time.Second, svc)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		srv.Shutdown()
	}()
	log.Printf("serving %s (%s)", *socket, svc.kind)
	// grpc's Serve returns nil once Shutdown (GracefulStop) was called.
	if err := srv.ListenAndServe(); err != nil {
		log.Printf("serve: %v", err)
	}
	_ = os.Remove(*socket)
}

// plugin implements service.Service over one AEAD.
type plugin struct {
	kind  string
	keyID string
	aead  cipher.AEAD
}

var _ service.Service = (*plugin)(nil)

func localPlugin(path string) (*plugin, error) {
	key, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		err = os.WriteFile(path, key, 0o600)
	}
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("key file %s: holds %d bytes, want 32", path, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &plugin{kind: "local AES-256-GCM", keyID: "goref-local-v1", aead: aead}, nil
}

func pkcs11Plugin(module, token, pinFile, label string, maxSessions int) (*plugin, error) {
	if token == "" || pinFile == "" {
		return nil, errors.New("PKCS#11 mode needs -token-label and -pin-file")
	}
	pin, err := os.ReadFile(pinFile)
	if err != nil {
		return nil, fmt.Errorf("pin file: %w", err)
	}
	ctx, err := crypto11.Configure(&crypto11.Config{
		Path:        module,
		TokenLabel:  token,
		Pin:         string(bytes.TrimSpace(pin)),
		MaxSessions: maxSessions,
		GCMIVLength: nonceLen,
	})
	if err != nil {
		return nil, fmt.Errorf("crypto11: %w", err)
	}
	keys, err := ctx.FindKeys(nil, []byte(label))
	if err != nil {
		return nil, fmt.Errorf("find key %q: %w", label, err)
	}
	var key *crypto11.SecretKey
	switch len(keys) {
	case 0:
		id := make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return nil, err
		}
		if key, err = ctx.GenerateSecretKeyWithLabel(id, []byte(label), 256, crypto11.CipherAES); err != nil {
			return nil, fmt.Errorf("generate key %q: %w", label, err)
		}
	case 1:
		key = keys[0]
	default:
		return nil, fmt.Errorf("%d keys labelled %q in the token", len(keys), label)
	}
	aead, err := key.NewGCM()
	if err != nil {
		return nil, err
	}
	return &plugin{kind: "PKCS#11 AES-256-GCM via crypto11", keyID: "goref-pkcs11-v1", aead: aead}, nil
}

func (p *plugin) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: p.keyID}, nil
}

func (p *plugin) Encrypt(_ context.Context, _ string, plaintext []byte) (res *service.EncryptResponse, err error) {
	if len(plaintext) == 0 {
		return nil, errors.New("plaintext is empty")
	}
	// crypto11's Seal panics when the token fails.
	defer func() {
		if r := recover(); r != nil {
			res, err = nil, fmt.Errorf("seal failed: %v", r)
		}
	}()
	out := make([]byte, nonceLen, nonceLen+len(plaintext)+p.aead.Overhead())
	if _, err := rand.Read(out); err != nil {
		return nil, err
	}
	out = p.aead.Seal(out, out[:nonceLen], plaintext, nil)
	return &service.EncryptResponse{Ciphertext: out, KeyID: p.keyID}, nil
}

func (p *plugin) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	if req.KeyID != p.keyID {
		return nil, fmt.Errorf("unknown key id %q", req.KeyID)
	}
	if len(req.Ciphertext) < nonceLen+p.aead.Overhead() {
		return nil, errors.New("ciphertext too short")
	}
	pt, err := p.aead.Open(nil, req.Ciphertext[:nonceLen], req.Ciphertext[nonceLen:], nil)
	if err != nil {
		return nil, errors.New("ciphertext could not be decrypted")
	}
	return pt, nil
}
