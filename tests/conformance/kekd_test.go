package conformance

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A backend is one way kekd holds its KEKs. Every scenario runs against
// every backend.
type backend struct {
	name string
	// missing says why the backend cannot run on this machine ("" if it can).
	missing func() string
	// setup creates a fresh keyring (or token) under dir and fills in how to
	// run `kekd serve` and `kekd admin` against it, serving on k.socket.
	setup func(t *testing.T, k *kekd)
}

var backends = []backend{
	{name: "local", missing: func() string { return "" }, setup: setupLocal},
	{name: "pkcs11", missing: softHSMMissing, setup: setupSoftHSM},
}

// kekd is one kekd "node": a keyring (or token), a socket, and the serve
// process while it runs.
type kekd struct {
	t      *testing.T
	dir    string
	socket string
	// target names the keyring for `kekd admin`: --keyring PATH or --config FILE.
	target []string
	// serveArgs follow `kekd serve`.
	serveArgs []string
	env       []string
	proc      *process
	logs      []string
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// newKekd creates a fresh keyring for backend b (`kekd admin init`), without
// starting kekd.
func newKekd(t *testing.T, b backend) *kekd {
	t.Helper()
	// Unix socket paths are limited to 107 bytes: keep the socket in a
	// short directory of its own rather than under t.TempDir().
	sockDir, err := os.MkdirTemp("", "kekd-conf-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	k := &kekd{
		t:      t,
		dir:    t.TempDir(),
		socket: filepath.Join(sockDir, "kms.sock"),
		env:    cleanEnv(),
	}
	t.Cleanup(k.cleanup)
	b.setup(t, k)
	out := k.admin("init")
	t.Logf("kekd admin init: %s", bytes.TrimSpace(out))
	return k
}

// cleanEnv is this process's environment without KEKD_* (kekd reads its
// settings from them) and SOFTHSM2_CONF.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "KEKD_") || strings.HasPrefix(kv, "SOFTHSM2_CONF=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func setupLocal(t *testing.T, k *kekd) {
	keyring := filepath.Join(k.dir, "keyring")
	k.target = []string{"--keyring", keyring}
	k.serveArgs = []string{"--keyring", keyring, "--socket", k.socket, "--reload-interval", "200ms"}
}

// softHSMModule is the SoftHSM2 PKCS#11 module (Debian's softhsm2 package).
func softHSMModule() string {
	if m := os.Getenv("SOFTHSM2_MODULE"); m != "" {
		return m
	}
	return "/usr/lib/softhsm/libsofthsm2.so"
}

func softHSMMissing() string {
	var missing []string
	if _, err := os.Stat(softHSMModule()); err != nil {
		missing = append(missing, softHSMModule())
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		missing = append(missing, "softhsm2-util")
	}
	if len(missing) == 0 {
		return ""
	}
	return "softhsm2 is not installed (missing: " + strings.Join(missing, ", ") +
		"; apt-get install -y softhsm2), so the pkcs11 backend was not tested"
}

// setupSoftHSM creates a SoftHSM2 token of its own (own softhsm2.conf and
// token directory), a 0600 PIN file and a kekd.toml with a [backend] table.
func setupSoftHSM(t *testing.T, k *kekd) {
	conf := filepath.Join(k.dir, "softhsm2.conf")
	tokens := filepath.Join(k.dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, conf, fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", tokens), 0o600)
	k.env = append(k.env, "SOFTHSM2_CONF="+conf)

	label := "kekd-conf-" + randomHex(4)
	pin := "pin-" + randomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "softhsm2-util", "--init-token", "--free", "--label", label,
		"--pin", pin, "--so-pin", "so-"+randomHex(8))
	cmd.Env = k.env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	pinFile := filepath.Join(k.dir, "pin")
	writeFile(t, pinFile, pin+"\n", 0o600)

	config := filepath.Join(k.dir, "kekd.toml")
	writeFile(t, config, fmt.Sprintf(`# written by the conformance suite
socket = %q
socket_mode = "0600"
self_check_interval = "10s"
reload_interval = "200ms"

[backend]
kind = "pkcs11"
module = %q
token_label = %q
pin_file = %q
key_label_prefix = "kekd-"
pool_size = 4
state_dir = %q
`, k.socket, softHSMModule(), label, pinFile, filepath.Join(k.dir, "state")), 0o600)
	k.target = []string{"--config", config}
	k.serveArgs = []string{"--config", config}
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// admin runs `kekd admin COMMAND ARGS… <target> --output json`, which must
// exit 0, and returns its stdout.
func (k *kekd) admin(command string, args ...string) []byte {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	argv := append([]string{"admin", command}, args...)
	argv = append(argv, k.target...)
	argv = append(argv, "--output", "json")
	cmd := exec.CommandContext(ctx, kekdBin, argv...)
	cmd.Env = k.env
	cmd.Dir = k.dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		k.t.Fatalf("kekd %s: %v\nstdout: %s\nstderr: %s", strings.Join(argv, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes()
}

// listing is the part of `kekd admin list --output json` the suite reads.
type listing struct {
	Primary  uint32 `json:"primary"`
	Versions []struct {
		Version uint32 `json:"version"`
		State   string `json:"state"`
		KeyID   string `json:"key_id"`
	} `json:"versions"`
}

// primary returns the primary version and its key_id, from `kekd admin list`.
func (k *kekd) primary() (uint32, string) {
	k.t.Helper()
	out := k.admin("list")
	var l listing
	if err := json.Unmarshal(out, &l); err != nil {
		k.t.Fatalf("kekd admin list --output json: %v\n%s", err, out)
	}
	for _, v := range l.Versions {
		if v.Version == l.Primary {
			if v.State != "primary" || v.KeyID == "" {
				k.t.Fatalf("kekd admin list: primary version %d has state %q, key_id %q", v.Version, v.State, v.KeyID)
			}
			return v.Version, v.KeyID
		}
	}
	k.t.Fatalf("kekd admin list names no primary version:\n%s", out)
	return 0, ""
}

// start runs `kekd serve` and waits (bounded) until its socket accepts
// connections.
func (k *kekd) start() {
	k.t.Helper()
	if k.proc != nil {
		k.t.Fatal("kekd is already running")
	}
	logPath := filepath.Join(k.dir, fmt.Sprintf("kekd-serve-%d.log", len(k.logs)+1))
	logFile, err := os.Create(logPath)
	if err != nil {
		k.t.Fatal(err)
	}
	k.logs = append(k.logs, logPath)
	cmd := exec.Command(kekdBin, append([]string{"serve"}, k.serveArgs...)...)
	cmd.Env = k.env
	cmd.Dir = k.dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		k.t.Fatalf("start kekd serve: %v", err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	k.proc = p

	const within = 30 * time.Second
	deadline := time.Now().Add(within)
	for {
		select {
		case <-p.done:
			k.proc = nil
			k.t.Fatalf("kekd serve exited during startup (%v); log:\n%s", p.err, readLog(logPath))
		default:
		}
		if c, err := net.DialTimeout("unix", k.socket, time.Second); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("kekd serve did not accept connections on %s within %s; log:\n%s", k.socket, within, readLog(logPath))
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits (bounded) for kekd to exit; kekd documents a
// clean exit on SIGTERM.
func (k *kekd) stop() {
	k.t.Helper()
	p := k.proc
	if p == nil {
		k.t.Fatal("kekd is not running")
	}
	k.proc = nil
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		k.t.Fatalf("SIGTERM kekd: %v", err)
	}
	const within = 30 * time.Second
	select {
	case <-p.done:
	case <-time.After(within):
		_ = p.cmd.Process.Kill()
		<-p.done
		k.t.Fatalf("kekd did not exit within %s of SIGTERM", within)
	}
	if p.err != nil {
		k.t.Errorf("kekd exited with %v after SIGTERM (expected a clean exit)", p.err)
	}
	_, statErr := os.Stat(k.socket)
	k.t.Logf("kekd stopped %s after SIGTERM (socket left behind: %v)", time.Since(start).Round(time.Millisecond), statErr == nil)
}

func (k *kekd) cleanup() {
	if p := k.proc; p != nil {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		k.proc = nil
	}
	if k.t.Failed() {
		for _, l := range k.logs {
			k.t.Logf("---- %s ----\n%s", filepath.Base(l), readLog(l))
		}
	}
}

// readLog returns the end of a log file.
func readLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	const max = 8 << 10
	if len(b) > max {
		b = append([]byte("…"), b[len(b)-max:]...)
	}
	return string(b)
}
