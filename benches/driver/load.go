package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	kmsservice "k8s.io/kms/pkg/service"
)

// Op is one of the three KMS v2 calls.
type Op string

// The calls, in the order they are measured.
const (
	OpStatus  Op = "Status"
	OpEncrypt Op = "Encrypt"
	OpDecrypt Op = "Decrypt"
)

// Ops lists every call, in table order.
var Ops = []Op{OpStatus, OpEncrypt, OpDecrypt}

// Sample is one prepared Decrypt input and the seed it must give back.
type Sample struct {
	Seed       []byte
	Ciphertext []byte
	KeyID      string
}

// Result is one scenario's measurement.
type Result struct {
	Server      string  `json:"server"`
	Op          Op      `json:"op"`
	Concurrency int     `json:"concurrency"`
	Calls       int     `json:"calls"`
	Errors      int     `json:"errors"`
	FirstError  string  `json:"first_error,omitempty"`
	Seconds     float64 `json:"seconds"`
	Throughput  float64 `json:"throughput"`
	P50         float64 `json:"p50_us"`
	P99         float64 `json:"p99_us"`
	P999        float64 `json:"p999_us"`
	// CPUPer1k is the server's user+system CPU seconds per 1,000 calls.
	CPUPer1k float64 `json:"cpu_s_per_1k"`
}

// caller runs one kind of call and checks its answer.
type caller struct {
	client kmsservice.Service
	// clearOK is set for the transport floor, whose "ciphertext" holds the
	// plaintext by design.
	clearOK bool
	keyID   string
	samples []Sample
	seeds   [][]byte
	timeout time.Duration
}

// call makes call number i of op and returns an error for a failed call or
// a wrong answer.
func (c *caller) call(op Op, i int) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	uid := uids[i%len(uids)]
	switch op {
	case OpStatus:
		st, err := c.client.Status(ctx)
		if err != nil {
			return err
		}
		return checkStatus(st, c.keyID)
	case OpEncrypt:
		seed := c.seeds[i%len(c.seeds)]
		res, err := c.client.Encrypt(ctx, uid, seed)
		if err != nil {
			return err
		}
		return checkEncrypt(res, c.keyID, seed, c.clearOK)
	case OpDecrypt:
		s := &c.samples[i%len(c.samples)]
		pt, err := c.client.Decrypt(ctx, uid, &kmsservice.DecryptRequest{Ciphertext: s.Ciphertext, KeyID: s.KeyID})
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, s.Seed) {
			return fmt.Errorf("decrypt returned %d bytes that are not the seed", len(pt))
		}
		return nil
	}
	return fmt.Errorf("unknown op %q", op)
}

// checkEncrypt applies the apiserver's rules to an Encrypt answer.
// Unless clearOK, the ciphertext must not contain the seed.
func checkEncrypt(res *kmsservice.EncryptResponse, keyID string, seed []byte, clearOK bool) error {
	switch {
	case res.KeyID != keyID:
		return fmt.Errorf("encrypt key id %q, Status said %q", res.KeyID, keyID)
	case len(res.Ciphertext) == 0 || len(res.Ciphertext) > 1024:
		return fmt.Errorf("encrypt ciphertext of %d bytes, want 1..=1024", len(res.Ciphertext))
	case !clearOK && bytes.Contains(res.Ciphertext, seed):
		return fmt.Errorf("encrypt ciphertext contains the plaintext")
	}
	return nil
}

// uids are request uids as the apiserver sends them (UUIDs), made once so
// the driver spends no time on them per call.
var uids = func() []string {
	out := make([]string, 1024)
	for i := range out {
		b := randomBytes(16)
		out[i] = fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
	}
	return out
}()

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

// prepare encrypts n distinct random 32-byte seeds (as the apiserver's
// seeds are) through client, with some concurrency, and returns them.
func prepare(client kmsservice.Service, keyID string, n int, timeout time.Duration, clearOK bool) ([]Sample, error) {
	samples := make([]Sample, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	for range min(n, 32) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				seed := randomBytes(32)
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				res, err := client.Encrypt(ctx, uids[i%len(uids)], seed)
				cancel()
				if err == nil {
					err = checkEncrypt(res, keyID, seed, clearOK)
				}
				if err != nil {
					select {
					case errs <- fmt.Errorf("preparing ciphertexts: %w", err):
					default:
					}
					next.Store(int64(n))
					return
				}
				samples[i] = Sample{Seed: seed, Ciphertext: res.Ciphertext, KeyID: res.KeyID}
			}
		})
	}
	wg.Wait()
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	return samples, nil
}

// runScenario drives op with `concurrency` goroutines sharing one client
// (one connection) for warmup, then for `duration`, measured.
func runScenario(p *proc, c *caller, op Op, concurrency int, warmup, duration time.Duration) (Result, error) {
	// Warm up: same load, not recorded.
	drive(c, op, concurrency, warmup, false)
	cpu0, err := p.cpuSeconds()
	if err != nil {
		return Result{}, err
	}
	lat, calls, errCount, firstErr, elapsed := drive(c, op, concurrency, duration, true)
	cpu1, err := p.cpuSeconds()
	if err != nil {
		return Result{}, err
	}
	r := Result{
		Server:      p.spec.Name,
		Op:          op,
		Concurrency: concurrency,
		Calls:       calls,
		Errors:      errCount,
		Seconds:     elapsed.Seconds(),
		Throughput:  float64(calls) / elapsed.Seconds(),
	}
	if firstErr != nil {
		r.FirstError = firstErr.Error()
	}
	r.P50, r.P99, r.P999 = percentiles(lat)
	if calls > 0 {
		r.CPUPer1k = (cpu1 - cpu0) / float64(calls) * 1000
	}
	return r, nil
}

// drive runs the load and returns the latencies of the calls (all of them,
// failed ones included), the number of calls, errors, the first error and
// the wall time.
func drive(c *caller, op Op, concurrency int, d time.Duration, record bool) ([]time.Duration, int, int, error, time.Duration) {
	var (
		stop     atomic.Bool
		errCount atomic.Int64
		firstErr error
		errOnce  sync.Once
		wg       sync.WaitGroup
		mu       sync.Mutex
		all      []time.Duration
	)
	start := time.Now()
	for g := range concurrency {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 4096)
			for i := g; !stop.Load(); i += concurrency {
				t0 := time.Now()
				err := c.call(op, i)
				lat = append(lat, time.Since(t0))
				if err != nil {
					errCount.Add(1)
					errOnce.Do(func() { firstErr = err })
				}
			}
			if record {
				mu.Lock()
				all = append(all, lat...)
				mu.Unlock()
			}
		})
	}
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	elapsed := time.Since(start)
	return all, len(all), int(errCount.Load()), firstErr, elapsed
}

// StormResult is the cold-start burst: every Decrypt fired at once.
type StormResult struct {
	Calls      int     `json:"calls"`
	Errors     int     `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	WallMS     float64 `json:"wall_ms"`
	P50        float64 `json:"p50_us"`
	P99        float64 `json:"p99_us"`
	P999       float64 `json:"p999_us"`
	CPUSeconds float64 `json:"cpu_s"`
}

// storm fires one Decrypt per sample at once through client: every
// goroutine is started and parked first, then released together.
func storm(p *proc, client kmsservice.Service, samples []Sample, timeout time.Duration) (StormResult, error) {
	lat := make([]time.Duration, len(samples))
	failed := make([]error, len(samples))
	release := make(chan struct{})
	var ready, wg sync.WaitGroup
	ready.Add(len(samples))
	for i := range samples {
		wg.Go(func() {
			s := &samples[i]
			ready.Done()
			<-release
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			t0 := time.Now()
			pt, err := client.Decrypt(ctx, uids[i%len(uids)], &kmsservice.DecryptRequest{Ciphertext: s.Ciphertext, KeyID: s.KeyID})
			lat[i] = time.Since(t0)
			if err == nil && !bytes.Equal(pt, s.Seed) {
				err = fmt.Errorf("decrypt returned %d bytes that are not the seed", len(pt))
			}
			failed[i] = err
		})
	}
	ready.Wait()
	cpu0, err := p.cpuSeconds()
	if err != nil {
		return StormResult{}, err
	}
	start := time.Now()
	close(release)
	wg.Wait()
	wall := time.Since(start)
	cpu1, err := p.cpuSeconds()
	if err != nil {
		return StormResult{}, err
	}
	r := StormResult{Calls: len(samples), WallMS: float64(wall.Microseconds()) / 1000, CPUSeconds: cpu1 - cpu0}
	for _, e := range failed {
		if e != nil {
			if r.Errors == 0 {
				r.FirstError = e.Error()
			}
			r.Errors++
		}
	}
	r.P50, r.P99, r.P999 = percentiles(lat)
	return r, nil
}

// percentiles returns p50, p99 and p99.9 in microseconds (nearest rank).
func percentiles(lat []time.Duration) (p50, p99, p999 float64) {
	if len(lat) == 0 {
		return 0, 0, 0
	}
	slices.Sort(lat)
	at := func(q float64) float64 {
		i := int(q*float64(len(lat))+0.999999) - 1
		i = max(0, min(i, len(lat)-1))
		return float64(lat[i].Nanoseconds()) / 1000
	}
	return at(0.50), at(0.99), at(0.999)
}
