package conformance

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// scenarios are the conformance scenarios, numbered as in the comment above
// each function below; each runs against every backend with a kekd (and
// keyring or token) of its own.
var scenarios = []struct {
	name string
	run  func(t *testing.T, k *kekd)
}{
	{"1_ShippedConfigHealthy", testShippedConfigHealthy},
	{"2_WriteReadSecret", testWriteReadSecret},
	{"3_Rotation", testRotation},
	{"4_RestartBetweenWriteAndRead", testRestartBetweenWriteAndRead},
	{"5_OutageAndRecovery", testOutageAndRecovery},
}

// TestKMSv2Conformance drives a real `kekd serve` only through the
// kube-apiserver's own code (k8s.io/apiserver: the EncryptionConfiguration
// loader, the KMS v2 gRPC client, health probe and envelope transformer),
// for every backend: the local keyring, and the pkcs11 backend on a SoftHSM2
// token.
func TestKMSv2Conformance(t *testing.T) {
	requireKekd(t)
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			if why := b.missing(); why != "" {
				missingComponent(t, "%s", why)
			}
			for _, s := range scenarios {
				t.Run(s.name, func(t *testing.T) {
					t.Parallel()
					k := newKekd(t, b)
					k.start()
					s.run(t, k)
				})
			}
		})
	}
}

// secretPayload is what the apiserver would store for a Secret.
func secretPayload(name string) []byte {
	return fmt.Appendf(nil, `{"kind":"Secret","apiVersion":"v1","metadata":{"name":%q,"namespace":"default"},"data":{"password":"%s"}}`,
		name, randomHex(16))
}

func secretKey(name string) string { return "/registry/secrets/default/" + name }

// 1. The shipped deploy/encryption-config.yaml loads with the apiserver's
// loader and its health check passes (Status, then Encrypt of a fresh seed
// whose key_id must equal Status's).
func testShippedConfigHealthy(t *testing.T, k *kekd) {
	start := time.Now()
	a := loadShippedConfig(t, k.socket) // primes the probe inline: Status, then Encrypt
	loaded := time.Since(start)
	if got := a.health.Name(); got != "kms-providers" {
		t.Errorf("health check name %q, want kms-providers", got)
	}
	if a.cfg.Transformers[secrets] == nil || a.cfg.Transformers[configmaps] == nil {
		t.Errorf("the shipped config does not encrypt both secrets and configmaps: %v", a.cfg.Transformers)
	}
	if a.timeout <= 0 {
		t.Errorf("the loaded config has KMS timeout %s", a.timeout)
	}
	a.mustBeHealthy(t)
	t.Logf("kms-providers healthy (KMS timeout %s; loading and priming took %s)", a.timeout, loaded.Round(time.Millisecond))

	// A second, independent apiserver on the same kekd is healthy too.
	loadShippedConfig(t, k.socket).mustBeHealthy(t)
}

// 2. A secret written through the transformer is stored under kekd's
// current key_id and reads back, not stale — from the writer's seed cache
// and through a fresh apiserver that must ask kekd to Decrypt.
func testWriteReadSecret(t *testing.T, k *kekd) {
	a := loadShippedConfig(t, k.socket)
	a.mustBeHealthy(t)
	_, keyID := k.primary()

	key := secretKey("conformance-write")
	payload := secretPayload("conformance-write")
	stored := a.write(t, key, payload)
	o := decode(t, stored)
	if o.KeyID != keyID {
		t.Fatalf("stored key_id %q, want kekd's primary %q (kekd admin list)", o.KeyID, keyID)
	}
	if o.EncryptedDEKSourceType != kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED {
		t.Errorf("encryptedDEKSourceType %v, want HKDF_SHA256_XNONCE_AES_GCM_SEED", o.EncryptedDEKSourceType)
	}
	if bytes.Contains(stored, payload) {
		t.Fatal("the stored value contains the plaintext")
	}
	t.Logf("stored %d bytes: key_id %q, encryptedDEKSource %d bytes, %d annotations",
		len(stored), o.KeyID, len(o.EncryptedDEKSource), len(o.Annotations))

	a.mustRead(t, key, stored, payload, false)

	fresh := loadShippedConfig(t, k.socket)
	fresh.mustBeHealthy(t)
	fresh.mustRead(t, key, stored, payload, false)

	// The etcd key is authenticated: the same bytes under another key fail.
	if _, _, err := loadShippedConfig(t, k.socket).read(secretKey("someone-else"), stored); err == nil {
		t.Fatal("a value moved to another etcd key decrypted")
	}
}

// 3. Rotation: kekd admin rotate --promote; the apiserver's probe picks up
// the new key_id; new writes carry it; old objects read back stale but
// decrypt; after retire of the old version a never-migrated old object
// fails to read through a fresh apiserver, with kekd's error.
func testRotation(t *testing.T, k *kekd) {
	a := loadShippedConfig(t, k.socket)
	a.mustBeHealthy(t)
	oldVersion, oldKeyID := k.primary()

	oldKey, oldPayload := secretKey("before-rotation"), secretPayload("before-rotation")
	oldStored := a.write(t, oldKey, oldPayload)
	if got := decode(t, oldStored).KeyID; got != oldKeyID {
		t.Fatalf("stored key_id %q, want %q", got, oldKeyID)
	}

	out := k.admin("rotate", "--promote")
	t.Logf("kekd admin rotate --promote: %s", bytes.TrimSpace(out))
	newVersion, newKeyID := k.primary()
	if newVersion == oldVersion || newKeyID == oldKeyID {
		t.Fatalf("after rotate --promote the primary is still version %d (%q)", newVersion, newKeyID)
	}

	took := a.waitForWriteKeyID(t, newKeyID, positiveTTL+30*time.Second)
	t.Logf("the apiserver probe switched to %q after %s", newKeyID, took.Round(time.Millisecond))

	newKey, newPayload := secretKey("after-rotation"), secretPayload("after-rotation")
	newStored := a.write(t, newKey, newPayload)
	if got := decode(t, newStored).KeyID; got != newKeyID {
		t.Fatalf("a write after the probe switched carries key_id %q, want %q", got, newKeyID)
	}
	a.mustRead(t, oldKey, oldStored, oldPayload, true)
	a.mustRead(t, newKey, newStored, newPayload, false)

	// A fresh apiserver decrypts the old object through kekd (the old
	// version is decrypt-only) and writes under the new key_id at once.
	fresh := loadShippedConfig(t, k.socket)
	fresh.mustBeHealthy(t)
	fresh.mustRead(t, oldKey, oldStored, oldPayload, true)
	fresh.mustRead(t, newKey, newStored, newPayload, false)
	if got := decode(t, fresh.write(t, newKey, newPayload)).KeyID; got != newKeyID {
		t.Fatalf("a fresh apiserver writes key_id %q, want %q", got, newKeyID)
	}
	fresh.close()

	out = k.admin("retire", strconv.FormatUint(uint64(oldVersion), 10), "--force")
	t.Logf("kekd admin retire %d --force: %s", oldVersion, bytes.TrimSpace(out))

	// kekd picks the change up within its reload interval; each attempt is
	// a fresh apiserver, so no seed is cached.
	var readErr error
	deadline := time.Now().Add(20 * time.Second)
	for {
		f := loadShippedConfig(t, k.socket)
		f.mustBeHealthy(t)
		_, _, readErr = f.read(oldKey, oldStored)
		if readErr != nil {
			// The current key still decrypts through the same apiserver.
			f.mustRead(t, newKey, newStored, newPayload, false)
			f.close()
			break
		}
		f.close()
		if time.Now().After(deadline) {
			t.Fatalf("20 s after retiring version %d, a fresh apiserver still decrypts an object stored under %q", oldVersion, oldKeyID)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("reading the never-migrated object after retire: %v", readErr)
	for _, want := range []string{"failed to decrypt DEK", "is retired and cannot decrypt"} {
		if !strings.Contains(readErr.Error(), want) {
			t.Errorf("the apiserver's read error does not contain %q (kekd's message): %v", want, readErr)
		}
	}

	// The long-lived apiserver still has the old seed cached (24 h): this is
	// why `retire` refuses versions that served a Decrypt within a day.
	a.mustRead(t, oldKey, oldStored, oldPayload, true)
}

// 4. kekd restarted between write and read; a fresh apiserver (empty seed
// cache) decrypts the old data.
func testRestartBetweenWriteAndRead(t *testing.T, k *kekd) {
	a := loadShippedConfig(t, k.socket)
	a.mustBeHealthy(t)
	_, keyID := k.primary()
	key, payload := secretKey("across-restart"), secretPayload("across-restart")
	stored := a.write(t, key, payload)
	if got := decode(t, stored).KeyID; got != keyID {
		t.Fatalf("stored key_id %q, want %q", got, keyID)
	}
	a.close()

	k.stop()
	k.start()

	fresh := loadShippedConfig(t, k.socket)
	fresh.mustBeHealthy(t)
	fresh.mustRead(t, key, stored, payload, false)
	if got := decode(t, fresh.write(t, key, payload)).KeyID; got != keyID {
		t.Fatalf("after a restart writes carry key_id %q, want %q", got, keyID)
	}
}

// 5. kekd stopped: the health check fails with a clear error within the
// configured timeout; kekd started again: the same health check and
// transformer recover without reloading the config.
func testOutageAndRecovery(t *testing.T, k *kekd) {
	a := loadShippedConfig(t, k.socket)
	a.mustBeHealthy(t)
	_, keyID := k.primary()

	// An object written by another apiserver: not in a's seed cache, so
	// reading it through a needs a Decrypt on a's connection.
	other := loadShippedConfig(t, k.socket)
	other.mustBeHealthy(t)
	key, payload := secretKey("written-elsewhere"), secretPayload("written-elsewhere")
	stored := other.write(t, key, payload)
	other.close()

	k.stop()
	stopped := time.Now()

	// The probe caches a healthy result for 20 s; the first uncached check
	// must fail, and within the configured timeout.
	callBound := a.timeout + 7*time.Second // 10 s with the shipped 3 s
	var checkErr error
	var took time.Duration
	for {
		start := time.Now()
		checkErr = a.check()
		took = time.Since(start)
		if checkErr != nil {
			break
		}
		if took > callBound {
			t.Fatalf("a health check that passed with kekd stopped took %s", took)
		}
		if time.Since(stopped) > positiveTTL+callBound {
			t.Fatalf("the health check still passes %s after kekd stopped", time.Since(stopped).Round(time.Millisecond))
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("health check failed %s after kekd stopped; the failing check took %s: %v",
		time.Since(stopped).Round(time.Millisecond), took.Round(time.Millisecond), checkErr)
	if took > callBound {
		t.Errorf("the failing health check took %s, want at most %s (KMS timeout %s)", took, callBound, a.timeout)
	}
	msg := checkErr.Error()
	if !strings.Contains(msg, "KMS Provider "+providerName) {
		t.Errorf("the health check error does not name the KMS provider %q: %v", providerName, checkErr)
	}
	if !containsAny(msg, "DeadlineExceeded", "Unavailable", "connect", "connection", "no such file") {
		t.Errorf("the health check error does not say the plugin is unreachable: %v", checkErr)
	}

	// A read that needs kekd fails within the timeout too.
	start := time.Now()
	if _, _, err := a.read(key, stored); err == nil {
		t.Fatal("an uncached object decrypted while kekd was stopped")
	} else if d := time.Since(start); d > callBound {
		t.Errorf("a read needing Decrypt took %s with kekd stopped, want at most %s: %v", d, callBound, err)
	}

	k.start()
	restarted := time.Now()
	const recoverWithin = 90 * time.Second // the gRPC client's reconnect backoff, plus the probe's 3 s negative cache
	for {
		checkErr = a.check()
		if checkErr == nil {
			break
		}
		if time.Since(restarted) > recoverWithin {
			t.Fatalf("the same health check still fails %s after kekd restarted: %v", recoverWithin, checkErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("the same health check recovered %s after kekd restarted", time.Since(restarted).Round(time.Millisecond))

	// The same transformer reaches kekd again (Decrypt of the uncached
	// object) and still writes under kekd's key_id.
	a.mustRead(t, key, stored, payload, false)
	if got := decode(t, a.write(t, key, payload)).KeyID; got != keyID {
		t.Fatalf("after recovery writes carry key_id %q, want %q", got, keyID)
	}
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
