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
// ciphertext fired at once through one connection; with -storm-rounds,
// several in turns, keeping the fastest); and peak RSS (VmHWM).
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
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"
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
	Date     string  `json:"date"`
	Mode     string  `json:"mode"`
	Duration float64 `json:"scenario_seconds"`
	Rounds   int     `json:"rounds"`
	// OtherCPU is the share of the machine's CPU time, during the
	// scenarios, used by neither the servers nor the driver: other work on
	// a shared machine, which disturbs the numbers.
	OtherCPU    float64        `json:"other_cpu_share"`
	Concurrency []int          `json:"concurrency"`
	StormSize   int            `json:"storm_size"`
	Meta        [][2]string    `json:"meta"`
	Servers     []ServerReport `json:"servers"`
	// Criterion holds the micro-benchmarks: name and "[low median high]".
	Criterion [][2]string `json:"criterion,omitempty"`
	// StormRounds is how many storms each server had (it keeps its
	// fastest); 0 means 1.
	StormRounds int `json:"storm_rounds,omitempty"`
}

func main() {
	planPath := flag.String("plan", "", "JSON plan written by benches/run.sh (required)")
	quick := flag.Bool("quick", false, "smoke mode: short scenarios, small storm")
	durationFlag := flag.Duration("duration", 0, "measured time per scenario and round (default 2s, quick 300ms)")
	roundsFlag := flag.Int("rounds", 0, "rounds per scenario; each server keeps its best (default 2, quick 1)")
	concFlag := flag.String("concurrency", "1,16,64,256", "concurrency levels")
	stormFlag := flag.Int("storm", 0, "Decrypts in the cold-start storm (default 10000, quick 2000)")
	starts := flag.Int("starts", 0, "extra cold starts timed per server (default 4, quick 1)")
	stormRounds := flag.Int("storm-rounds", 1, "storms per server, in turns; each server keeps its fastest (benches/run.sh asks 3 with a baseline)")
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
		cfg := runConfig{duration: 2 * time.Second, warmup: 300 * time.Millisecond, rounds: 2, storm: 10000, starts: 4}
		mode := "full"
		if *quick {
			cfg = runConfig{duration: 300 * time.Millisecond, warmup: 100 * time.Millisecond, rounds: 1, storm: 2000, starts: 1}
			mode = "quick"
		}
		if *roundsFlag > 0 {
			cfg.rounds = *roundsFlag
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
		cfg.stormRounds = max(1, *stormRounds)
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
			Rounds:      cfg.rounds,
			Concurrency: cfg.concurrency,
			StormSize:   cfg.storm,
			Meta:        plan.Meta,
		}
		if cfg.stormRounds > 1 {
			report.StormRounds = cfg.stormRounds
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
		var servers []*live
		for i := range plan.Servers {
			spec := &plan.Servers[i]
			if names != nil && !slices.Contains(names, spec.Name) {
				continue
			}
			servers = append(servers, bringUp(spec, cfg))
		}
		report.OtherCPU = scenarios(servers, cfg)
		log.Printf("other processes used %.0f%% of the machine's CPU during the scenarios", 100*report.OtherCPU)
		for _, l := range servers {
			stormAndStop(l, cfg)
			l.fail(nil) // stops it, if a failure left it running
		}
		// More storms, the servers taking turns (each round starting with
		// a different one), so that which server storms first is no
		// advantage: a baseline and its twin are compared on this.
		for round := 1; round < cfg.stormRounds; round++ {
			for k := range servers {
				stormAgain(servers[(k+round)%len(servers)])
			}
		}
		for _, l := range servers {
			if l.err != nil {
				log.Printf("FAIL %s: %v", l.spec.Name, l.err)
				failed++
				continue
			}
			report.Servers = append(report.Servers, l.sr)
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
	rounds           int
	concurrency      []int
	storm            int
	starts           int
	stormRounds      int
}

// callTimeout is the apiserver's default KMS call timeout (3 s), used for
// the scenarios. The storm is judged by its wall time, so its calls get
// longer rather than being cut off at the apiserver's limit.
const (
	callTimeout  = 3 * time.Second
	stormTimeout = 30 * time.Second
)

// live is a server kept running through the scenarios.
type live struct {
	spec    *ServerSpec
	sr      ServerReport
	p       *proc
	cancel  context.CancelFunc
	client  kmsservice.Service
	c       *caller
	attempt int
	err     error
	// stormSamples are the storm's Decrypt inputs, kept for more rounds.
	stormSamples []Sample
}

// bringUp times the cold starts, then starts the server for the scenarios
// and prepares its Decrypt inputs.
func bringUp(spec *ServerSpec, cfg runConfig) *live {
	l := &live{spec: spec, sr: ServerReport{Name: spec.Name, Role: spec.Role, Backend: spec.Backend}}
	log.Printf("%s: starting (%s)", spec.Name, strings.Join(spec.Argv, " "))
	for range cfg.starts {
		l.attempt++
		p, took, err := startServer(spec, l.attempt)
		if err != nil {
			l.err = err
			return l
		}
		l.sr.StartMS = append(l.sr.StartMS, ms(took))
		l.sr.notePeak(p)
		p.stop()
	}
	l.attempt++
	p, took, err := startServer(spec, l.attempt)
	if err != nil {
		l.err = err
		return l
	}
	l.p = p
	l.sr.StartMS = append(l.sr.StartMS, ms(took))
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	if l.client, err = envelopekmsv2.NewGRPCService(ctx, "unix://"+spec.Socket, spec.Name, callTimeout); err != nil {
		l.fail(err)
		return l
	}
	st, err := l.client.Status(ctx)
	if err == nil {
		err = checkStatus(st, "")
	}
	if err != nil {
		l.fail(fmt.Errorf("status: %w", err))
		return l
	}
	l.c = &caller{client: l.client, keyID: st.KeyID, timeout: callTimeout, clearOK: spec.Role == "floor"}
	for range 256 {
		l.c.seeds = append(l.c.seeds, randomBytes(32))
	}
	if l.c.samples, err = prepare(l.client, st.KeyID, 256, callTimeout, l.c.clearOK); err != nil {
		l.fail(err)
	}
	return l
}

// fail records the first error and stops the server.
func (l *live) fail(err error) {
	if l.err == nil {
		l.err = err
	}
	if l.cancel != nil {
		l.cancel()
	}
	if l.p != nil {
		l.p.stop()
		l.p = nil
	}
}

// scenarios runs every call at every concurrency against every live
// server, interleaved: for each scenario the servers take turns, round
// after round (each round starting with a different server), and each
// server keeps its best round. On a shared machine, work of other
// processes then hits every server alike instead of whichever one was
// being measured when it came. It returns the share of the machine's CPU
// used by other processes meanwhile.
func scenarios(servers []*live, cfg runConfig) float64 {
	busy0, err0 := machineBusy()
	self0, _ := selfCPU()
	cpu0 := make([]float64, len(servers))
	for i, l := range servers {
		if l.err == nil {
			cpu0[i], _ = l.p.cpuSeconds()
		}
	}
	wall0 := time.Now()
	for _, op := range Ops {
		for _, n := range cfg.concurrency {
			best := make([]*Result, len(servers))
			for round := range cfg.rounds {
				for k := range servers {
					i := (k + round) % len(servers)
					l := servers[i]
					if l.err != nil {
						continue
					}
					r, err := runScenario(l.p, l.c, op, n, cfg.warmup, cfg.duration)
					if err != nil {
						l.fail(err)
						continue
					}
					// Errors are never hidden by a better round.
					if best[i] == nil || r.Errors > 0 || (best[i].Errors == 0 && r.Throughput > best[i].Throughput) {
						best[i] = &r
					}
				}
			}
			for i, l := range servers {
				if r := best[i]; r != nil && l.err == nil {
					log.Printf("%-14s %-7s c=%-3d %9.0f/s p50 %8.1fµs p99 %8.1fµs p99.9 %8.1fµs cpu %.3fs/1k errors %d",
						l.spec.Name, op, n, r.Throughput, r.P50, r.P99, r.P999, r.CPUPer1k, r.Errors)
					l.sr.Results = append(l.sr.Results, *r)
				}
			}
		}
	}
	busy1, err1 := machineBusy()
	if err0 != nil || err1 != nil {
		return 0
	}
	self1, _ := selfCPU()
	other := (busy1 - busy0) - (self1 - self0)
	for i, l := range servers {
		if l.err == nil {
			c, _ := l.p.cpuSeconds()
			other -= c - cpu0[i]
		}
	}
	total := time.Since(wall0).Seconds() * float64(runtime.NumCPU())
	return max(0, other/total)
}

// stormAndStop prepares the storm's ciphertexts, restarts the server so the
// burst meets a fresh process and a fresh connection (as after an
// apiserver or node restart), fires the storm and stops the server.
func stormAndStop(l *live, cfg runConfig) {
	if l.err != nil {
		return
	}
	samples, err := prepare(l.client, l.c.keyID, cfg.storm, callTimeout, l.c.clearOK)
	if err != nil {
		l.fail(err)
		return
	}
	l.sr.notePeak(l.p)
	l.cancel()
	l.p.stop()
	l.p = nil

	l.stormSamples = samples
	if l.sr.Storm, err = stormOnce(l); err != nil {
		l.err = err
		return
	}
	log.Printf("%-14s peak RSS %.1f MiB; starts %v ms", l.spec.Name, float64(l.sr.PeakRSS)/(1<<20), l.sr.StartMS)
}

// stormAgain fires one more storm at a freshly started server and keeps
// the faster of its storms (a storm with errors is never hidden).
func stormAgain(l *live) {
	if l.err != nil {
		return
	}
	st, err := stormOnce(l)
	if err != nil {
		l.err = err
		return
	}
	if st.Errors > 0 || (l.sr.Storm.Errors == 0 && st.WallMS < l.sr.Storm.WallMS) {
		l.sr.Storm = st
	}
}

// stormOnce starts the server, calls Status through a fresh client (as the
// apiserver does first, which also opens the connection), fires the storm
// at it and stops it.
func stormOnce(l *live) (StormResult, error) {
	l.attempt++
	p2, took, err := startServer(l.spec, l.attempt)
	if err != nil {
		return StormResult{}, err
	}
	defer p2.stop()
	l.sr.StartMS = append(l.sr.StartMS, ms(took))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, err := envelopekmsv2.NewGRPCService(ctx, "unix://"+l.spec.Socket, l.spec.Name, stormTimeout)
	if err != nil {
		return StormResult{}, err
	}
	st, err := client.Status(ctx)
	if err == nil {
		err = checkStatus(st, l.c.keyID)
	}
	if err != nil {
		return StormResult{}, fmt.Errorf("status before the storm: %w", err)
	}
	res, err := storm(p2, client, l.stormSamples, stormTimeout)
	if err != nil {
		return StormResult{}, err
	}
	log.Printf("%-14s storm of %d Decrypts: %.1f ms wall, p50 %.1fµs p99 %.1fµs, cpu %.2fs, errors %d",
		l.spec.Name, res.Calls, res.WallMS, res.P50, res.P99, res.CPUSeconds, res.Errors)
	l.sr.notePeak(p2)
	return res, nil
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
	printBaseline(r)
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
		// "change:" compares with the previous run on this machine, which
		// says nothing here.
		if name != "change:" {
			res = append(res, [2]string{name, strings.TrimSpace(after)})
		}
	}
	return res
}
