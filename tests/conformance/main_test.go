package conformance

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// The kekd binary every test runs, resolved once by TestMain.
var (
	// kekdBin is the absolute path of the release binary.
	kekdBin string
	// kekdMissing says why no binary can be had here (no KEKD_BIN, no cargo):
	// tests skip with it, or fail under KEKD_REQUIRE_ALL=1.
	kekdMissing string
	// kekdErr is a broken KEKD_BIN or a failed build: tests always fail with it.
	kekdErr error
	// repoRoot is the kekd repository (the directory holding Cargo.toml).
	repoRoot string
)

// TestMain builds the release binary once (`cargo build --release --locked`
// from the repository root) unless KEKD_BIN names one.
func TestMain(m *testing.M) {
	repoRoot, kekdErr = findRepoRoot()
	if kekdErr == nil {
		resolveKekd()
	}
	os.Exit(m.Run())
}

func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "Cargo.toml")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "deploy", "encryption-config.yaml")); err == nil {
				return dir, nil
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cannot find the kekd repository (Cargo.toml and deploy/encryption-config.yaml) above the test directory")
		}
		dir = parent
	}
}

func resolveKekd() {
	if p := os.Getenv("KEKD_BIN"); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			kekdErr = fmt.Errorf("KEKD_BIN=%q: %w", p, err)
			return
		}
		st, err := os.Stat(abs)
		if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			kekdErr = fmt.Errorf("KEKD_BIN=%q is not an executable file (stat: %v)", p, err)
			return
		}
		kekdBin = abs
		fmt.Fprintf(os.Stderr, "conformance: using KEKD_BIN=%s\n", abs)
		return
	}
	cargo, err := exec.LookPath("cargo")
	if err != nil {
		kekdMissing = "cargo is not installed and KEKD_BIN is not set, so there is no kekd to test " +
			"(install Rust, or build kekd and set KEKD_BIN)"
		return
	}
	start := time.Now()
	fmt.Fprintf(os.Stderr, "conformance: cargo build --release --locked (in %s)\n", repoRoot)
	cmd := exec.Command(cargo, "build", "--release", "--locked")
	cmd.Dir = repoRoot
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		kekdErr = fmt.Errorf("cargo build --release --locked failed: %w", err)
		return
	}
	target := os.Getenv("CARGO_TARGET_DIR")
	if target == "" {
		target = filepath.Join(repoRoot, "target")
	} else if !filepath.IsAbs(target) {
		target = filepath.Join(repoRoot, target)
	}
	kekdBin = filepath.Join(target, "release", "kekd")
	if _, err := os.Stat(kekdBin); err != nil {
		kekdErr = fmt.Errorf("cargo build succeeded but %s is missing: %w", kekdBin, err)
		return
	}
	fmt.Fprintf(os.Stderr, "conformance: built %s in %s\n", kekdBin, time.Since(start).Round(time.Millisecond))
}

// requireAll reports whether a missing component must fail the suite.
func requireAll() bool { return os.Getenv("KEKD_REQUIRE_ALL") == "1" }

// missingComponent skips the test with a loud reason, or fails it when
// KEKD_REQUIRE_ALL=1 (CI).
func missingComponent(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if requireAll() {
		t.Fatalf("%s (KEKD_REQUIRE_ALL=1 forbids skipping)", msg)
	}
	t.Skipf("SKIPPED: %s; set KEKD_REQUIRE_ALL=1 to make this a failure", msg)
}

// requireKekd stops the test unless TestMain found a kekd binary.
func requireKekd(t *testing.T) {
	t.Helper()
	switch {
	case kekdErr != nil:
		t.Fatal(kekdErr)
	case kekdMissing != "":
		missingComponent(t, "%s", kekdMissing)
	}
}
