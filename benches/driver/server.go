package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"
)

// ServerSpec is one plugin under test, as benches/run.sh describes it.
type ServerSpec struct {
	// Name labels the server in every table and the plot.
	Name string `json:"name"`
	// Role groups servers for the targets: "kekd", "goref" or "floor";
	// "kekd-before" is a baseline kekd, compared with the "kekd" server of
	// its backend (baseline.go).
	Role string `json:"role"`
	// Backend is "local", "pkcs11" or "none" (the transport floor).
	Backend string `json:"backend"`
	// Argv starts the server; it must serve on Socket.
	Argv []string `json:"argv"`
	// Env is added to the driver's environment.
	Env []string `json:"env"`
	// Socket is the Unix socket the server listens on.
	Socket string `json:"socket"`
	// Dir is the server's working directory and where its log goes.
	Dir string `json:"dir"`
}

// proc is one running server process.
type proc struct {
	spec    *ServerSpec
	cmd     *exec.Cmd
	log     *os.File
	started time.Time
	done    chan struct{}
	err     error
}

// startServer starts spec's process and waits until a Status call through
// the apiserver's own client answers v2/ok with a key id. It returns the
// process and the time from just before exec to that answer.
func startServer(spec *ServerSpec, attempt int) (*proc, time.Duration, error) {
	if err := os.Remove(spec.Socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, 0, err
	}
	logPath := filepath.Join(spec.Dir, fmt.Sprintf("%s-%d.log", spec.Name, attempt))
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, 0, err
	}
	cmd := exec.Command(spec.Argv[0], spec.Argv[1:]...)
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.Dir = spec.Dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// A driver killed mid-run takes its servers with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	p := &proc{spec: spec, cmd: cmd, log: logFile, done: make(chan struct{})}
	p.started = time.Now()
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, 0, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	deadline := p.started.Add(60 * time.Second)
	for {
		select {
		case <-p.done:
			return nil, 0, fmt.Errorf("%s exited before its first good Status (%v); log: %s\n%s",
				spec.Name, p.err, logPath, tail(logPath))
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, 0, fmt.Errorf("%s: no good Status within 60 s; log: %s\n%s", spec.Name, logPath, tail(logPath))
		}
		// The apiserver's client retries with a 1 s backoff while the socket
		// is missing, so wait for the socket with a raw connect first: what
		// is measured is when the plugin could first answer, not the
		// client's backoff.
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: spec.Socket, Net: "unix"})
		if err != nil {
			time.Sleep(200 * time.Microsecond)
			continue
		}
		c.Close()
		if err := firstStatus(spec); err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		return p, time.Since(p.started), nil
	}
}

// firstStatus makes a fresh client (a new connection, as a restarted
// apiserver does) and asks for Status once.
func firstStatus(spec *ServerSpec) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, err := envelopekmsv2.NewGRPCService(ctx, "unix://"+spec.Socket, spec.Name, time.Second)
	if err != nil {
		return err
	}
	st, err := client.Status(ctx)
	if err != nil {
		return err
	}
	return checkStatus(st, "")
}

// checkStatus applies the apiserver's rules to a Status answer; with
// wantKeyID it must also name that key.
func checkStatus(st *kmsservice.StatusResponse, wantKeyID string) error {
	switch {
	case st.Version != "v2":
		return fmt.Errorf("status version %q, want v2", st.Version)
	case st.Healthz != "ok":
		return fmt.Errorf("status healthz %q, want ok", st.Healthz)
	case st.KeyID == "" || len(st.KeyID) > 1024:
		return fmt.Errorf("status key id of %d bytes, want 1..=1024", len(st.KeyID))
	case wantKeyID != "" && st.KeyID != wantKeyID:
		return fmt.Errorf("status key id %q, want %q", st.KeyID, wantKeyID)
	}
	return nil
}

// stop sends SIGTERM, waits up to 10 s, then kills.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	p.log.Close()
}

// cpuSeconds is the process's user+system CPU time (/proc/PID/stat fields
// 14 and 15, in clock ticks of 1/100 s on Linux).
func (p *proc) cpuSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc stat format")
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); utime is field 14, stime field 15.
	if len(fields) < 13 {
		return 0, fmt.Errorf("unexpected /proc stat format")
	}
	utime, err1 := strconv.ParseUint(fields[11], 10, 64)
	stime, err2 := strconv.ParseUint(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	const clockTicks = 100 // USER_HZ, fixed at 100 on Linux
	return float64(utime+stime) / clockTicks, nil
}

// peakRSS is the process's VmHWM (peak resident set) in bytes.
func (p *proc) peakRSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("unexpected VmHWM line %q", line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", p.cmd.Process.Pid)
}

// tail returns the last lines of a log, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

// machineBusy is the CPU seconds every CPU of the machine spent not idle
// (/proc/stat), to tell how much of it went to other processes during a
// measurement.
func machineBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("unexpected /proc/stat format")
	}
	var busy uint64
	for i, v := range f[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, err
		}
		// user nice system idle iowait irq softirq steal guest guest_nice:
		// idle and iowait are not busy; guest time is already in user.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		busy += n
	}
	return float64(busy) / 100, nil
}

// selfCPU is this driver's own user+system CPU seconds.
func selfCPU() (float64, error) {
	p := &proc{cmd: &exec.Cmd{Process: &os.Process{Pid: os.Getpid()}}}
	return p.cpuSeconds()
}
