// Command driver is kekd's load driver. It starts each KMS v2 plugin named
// in a plan (kekd, the Go reference plugin, the transport floor), one after
// another on the same machine, and calls it only through kube-apiserver's
// own client, k8s.io/apiserver's kmsv2.NewGRPCService: one connection,
// multiplexed, as in production.
//
// Per server it measures: time from exec to the first good Status; Status,
// Encrypt and Decrypt at each concurrency (throughput, p50/p99/p99.9,
// errors, the server's CPU seconds per 1,000 calls from /proc/PID/stat); a
// cold-start storm (the server restarted, then one Decrypt per prepared
// ciphertext fired at once through one connection); and peak RSS (VmHWM).
// Every answer is checked (Status v2/ok and its key id, Encrypt's key id and
// size, Decrypt's plaintext); any error or wrong answer makes the run fail.
//
// It writes the results as JSON, the generated section of
// docs/benchmarks.md (between its markers) and a PNG plot. benches/run.sh
// builds everything and writes the plan; see there.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
)

// Plan is what benches/run.sh asks for.
type Plan struct {
	Servers []ServerSpec `json:"servers"`
	// Meta is shown in the report as given: versions, mode, command.
	Meta [][2]string `json:"meta"`
}

// ServerReport is everything measured for one server.
type ServerReport struct {
	Name    string   `json:"name"`
	Role    string   `json:"role"`
	Backend string   `json:"backend"`
	Results []Result `json:"results"`
	// StartMS are the times from exec to first good Status, one per start.
	StartMS []float64   `json:"start_ms"`
	Storm   StormResult `json:"storm"`
	// PeakRSS is the largest VmHWM of this server's processes, in bytes.
	PeakRSS int64 `json:"peak_rss_bytes"`
}

// Report is the whole run.
type Report struct {
	Date        string         `json:"date"`
	Mode        string         `json:"mode"`
	Duration    float64        `json:"scenario_seconds"`
	Concurrency []int          `json:"concurrency"`
	StormSize   int            `json:"storm_size"`
	Meta        [][2]string    `json:"meta"`
	Servers     []ServerReport `json:"servers"`
	// Criterion holds the micro-benchmarks: name and "[low median high]".
	Criterion [][2]string `json:"criterion,omitempty"`
}

func main() {
	planPath := flag.String("plan", "", "JSON plan written by benches/run.sh (required)")
	quick := flag.Bool("quick", false, "smoke mode: short scenarios, small storm")
	durationFlag := flag.Duration("duration", 0, "measured time per scenario (default 4s, quick 300ms)")
	concFlag := flag.String("concurrency", "1,16,64,256", "concurrency levels")
	stormFlag := flag.Int("storm", 0, "Decrypts in the cold-start storm (default 10000, quick 2000)")
	starts := flag.Int("starts", 0, "extra cold starts timed per server (default 4, quick 1)")
	only := flag.String("only", "", "comma-separated server names to run (default all)")
	outJSON := flag.String("json", "", "write the results here")
	outMD := flag.String("markdown", "", "docs/benchmarks.md: its generated section is replaced")
	outPNG := flag.String("png", "", "write the latency plot here")
	reportOnly := flag.String("report-from", "", "skip measuring: redraw the report from this JSON")
	criterionOut := flag.String("criterion", "", "cargo bench output to summarise in the report")
	flag.Parse()
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")

	var report Report
	if *reportOnly != "" {
		b, err := os.ReadFile(*reportOnly)
		if err != nil {
			log.Fatal(err)
		}
		if err := json.Unmarshal(b, &report); err != nil {
			log.Fatalf("%s: %v", *reportOnly, err)
		}
	} else {
		if *planPath == "" {
			log.Fatal("-plan is required (benches/run.sh writes it)")
		}
		b, err := os.ReadFile(*planPath)
		if err != nil {
			log.Fatal(err)
		}
		var plan Plan
		if err := json.Unmarshal(b, &plan); err != nil {
			log.Fatalf("%s: %v", *planPath, err)
		}
		cfg := runConfig{duration: 4 * time.Second, warmup: 500 * time.Millisecond, storm: 10000, starts: 4}
		mode := "full"
		if *quick {
			cfg = runConfig{duration: 300 * time.Millisecond, warmup: 100 * time.Millisecond, storm: 2000, starts: 1}
			mode = "quick"
		}
		if *durationFlag > 0 {
			cfg.duration = *durationFlag
		}
		if *stormFlag > 0 {
			cfg.storm = *stormFlag
		}
		if *starts > 0 {
			cfg.starts = *starts
		}
		for f := range strings.SplitSeq(*concFlag, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				log.Fatalf("-concurrency: %q is not a positive number", f)
			}
			cfg.concurrency = append(cfg.concurrency, n)
		}
		report = Report{
			Date:        time.Now().UTC().Format(time.RFC3339),
			Mode:        mode,
			Duration:    cfg.duration.Seconds(),
			Concurrency: cfg.concurrency,
			StormSize:   cfg.storm,
			Meta:        plan.Meta,
		}
		if *criterionOut != "" {
			b, err := os.ReadFile(*criterionOut)
			if err != nil {
				log.Fatal(err)
			}
			report.Criterion = parseCriterion(string(b))
		}
		var names []string
		if *only != "" {
			names = strings.Split(*only, ",")
		}
		failed := 0
		for i := range plan.Servers {
			spec := &plan.Servers[i]
			if names != nil && !slices.Contains(names, spec.Name) {
				continue
			}
			sr, err := measure(spec, cfg)
			if err != nil {
				log.Printf("FAIL %s: %v", spec.Name, err)
				failed++
				continue
			}
			report.Servers = append(report.Servers, sr)
		}
		if *outJSON != "" {
			b, _ := json.MarshalIndent(report, "", "  ")
			if err := os.WriteFile(*outJSON, append(b, '\n'), 0o644); err != nil {
				log.Fatal(err)
			}
		}
		// Any error or wrong answer fails the run: the numbers of a server
		// that answers wrongly mean nothing.
		passed := 0
		for _, s := range report.Servers {
			if msg := s.problem(); msg != "" {
				log.Printf("FAIL %s: %s", s.Name, msg)
				failed++
			} else {
				passed++
			}
		}
		printSummary(report)
		if failed > 0 {
			fmt.Printf("bench: %d passed, %d failed\n", passed, failed)
			os.Exit(1)
		}
		fmt.Printf("bench: %d passed, %d failed\n", passed, failed)
	}
	if *outPNG != "" {
		if err := drawPlot(report, *outPNG); err != nil {
			log.Fatalf("plot: %v", err)
		}
	}
	if *outMD != "" {
		if err := writeMarkdown(report, *outMD); err != nil {
			log.Fatalf("markdown: %v", err)
		}
	}
}

type runConfig struct {
	duration, warmup time.Duration
	concurrency      []int
	storm            int
	starts           int
}

// callTimeout is the apiserver's default KMS call timeout (3 s), used for
// the scenarios. The storm is judged by its wall time, so its calls get
// longer rather than being cut off at the apiserver's limit.
const (
	callTimeout  = 3 * time.Second
	stormTimeout = 30 * time.Second
)

// measure runs every scenario against one server.
func measure(spec *ServerSpec, cfg runConfig) (ServerReport, error) {
	sr := ServerReport{Name: spec.Name, Role: spec.Role, Backend: spec.Backend}
	log.Printf("%s: starting (%s)", spec.Name, strings.Join(spec.Argv, " "))
	attempt := 0
	// Cold starts: each one timed, then stopped.
	for range cfg.starts {
		attempt++
		p, took, err := startServer(spec, attempt)
		if err != nil {
			return sr, err
		}
		sr.StartMS = append(sr.StartMS, ms(took))
		sr.notePeak(p)
		p.stop()
	}
	attempt++
	p, took, err := startServer(spec, attempt)
	if err != nil {
		return sr, err
	}
	sr.StartMS = append(sr.StartMS, ms(took))
	stopped := false
	defer func() {
		if !stopped {
			p.stop()
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, err := envelopekmsv2.NewGRPCService(ctx, "unix://"+spec.Socket, spec.Name, callTimeout)
	if err != nil {
		return sr, err
	}
	st, err := client.Status(ctx)
	if err != nil {
		return sr, fmt.Errorf("status: %w", err)
	}
	if err := checkStatus(st, ""); err != nil {
		return sr, err
	}
	clearOK := spec.Role == "floor"
	c := &caller{client: client, keyID: st.KeyID, timeout: callTimeout, clearOK: clearOK}
	for range 256 {
		c.seeds = append(c.seeds, randomBytes(32))
	}
	if c.samples, err = prepare(client, st.KeyID, 256, callTimeout, clearOK); err != nil {
		return sr, err
	}
	for _, op := range Ops {
		for _, n := range cfg.concurrency {
			r, err := runScenario(p, c, op, n, cfg.warmup, cfg.duration)
			if err != nil {
				return sr, err
			}
			log.Printf("%-14s %-7s c=%-3d %9.0f/s p50 %8.1fµs p99 %8.1fµs p99.9 %8.1fµs cpu %.3fs/1k errors %d",
				spec.Name, op, n, r.Throughput, r.P50, r.P99, r.P999, r.CPUPer1k, r.Errors)
			sr.Results = append(sr.Results, r)
		}
	}
	// The storm's ciphertexts, prepared now; then the server restarts so the
	// burst meets a fresh process and a fresh connection, as after an
	// apiserver (or node) restart.
	samples, err := prepare(client, st.KeyID, cfg.storm, callTimeout, clearOK)
	if err != nil {
		return sr, err
	}
	sr.notePeak(p)
	cancel()
	p.stop()
	stopped = true

	attempt++
	p2, took, err := startServer(spec, attempt)
	if err != nil {
		return sr, err
	}
	defer p2.stop()
	sr.StartMS = append(sr.StartMS, ms(took))
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	client2, err := envelopekmsv2.NewGRPCService(ctx2, "unix://"+spec.Socket, spec.Name, stormTimeout)
	if err != nil {
		return sr, err
	}
	// The apiserver calls Status first; that also opens the connection.
	if st2, err := client2.Status(ctx2); err != nil {
		return sr, fmt.Errorf("status before the storm: %w", err)
	} else if err := checkStatus(st2, st.KeyID); err != nil {
		return sr, err
	}
	if sr.Storm, err = storm(p2, client2, samples, stormTimeout); err != nil {
		return sr, err
	}
	log.Printf("%-14s storm of %d Decrypts: %.1f ms wall, p50 %.1fµs p99 %.1fµs, cpu %.2fs, errors %d",
		spec.Name, sr.Storm.Calls, sr.Storm.WallMS, sr.Storm.P50, sr.Storm.P99, sr.Storm.CPUSeconds, sr.Storm.Errors)
	sr.notePeak(p2)
	log.Printf("%-14s peak RSS %.1f MiB; starts %v ms", spec.Name, float64(sr.PeakRSS)/(1<<20), sr.StartMS)
	return sr, nil
}

func (sr *ServerReport) notePeak(p *proc) {
	if rss, err := p.peakRSS(); err == nil && rss > sr.PeakRSS {
		sr.PeakRSS = rss
	}
}

// problem says what makes this server's run a failure ("" if nothing).
func (sr *ServerReport) problem() string {
	for _, r := range sr.Results {
		if r.Errors > 0 {
			return fmt.Sprintf("%s at concurrency %d: %d of %d calls failed; first: %s",
				r.Op, r.Concurrency, r.Errors, r.Calls, r.FirstError)
		}
		if r.Calls == 0 {
			return fmt.Sprintf("%s at concurrency %d: no call completed", r.Op, r.Concurrency)
		}
	}
	if sr.Storm.Errors > 0 {
		return fmt.Sprintf("storm: %d of %d Decrypts failed; first: %s", sr.Storm.Errors, sr.Storm.Calls, sr.Storm.FirstError)
	}
	if sr.Storm.Calls == 0 {
		return "storm: no call made"
	}
	return ""
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printSummary(r Report) {
	for _, s := range r.Servers {
		fmt.Printf("%-14s start %v ms, storm %.0f ms, peak RSS %.1f MiB\n",
			s.Name, s.StartMS, s.Storm.WallMS, float64(s.PeakRSS)/(1<<20))
	}
}

// parseCriterion picks each benchmark's name and time interval out of
// criterion's terminal output: the name ends the line before "time:" (or
// starts the same line, when it is short).
func parseCriterion(out string) [][2]string {
	var res [][2]string
	prev := ""
	for line := range strings.SplitSeq(out, "\n") {
		before, after, ok := strings.Cut(line, "time:")
		if !ok {
			if t := strings.TrimSpace(line); t != "" {
				prev = t
			}
			continue
		}
		name := strings.TrimSpace(before)
		if name == "" {
			name = prev
		}
		res = append(res, [2]string{name, strings.TrimSpace(after)})
	}
	return res
}
