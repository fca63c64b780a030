package main

import (
	"fmt"
	"image/color"
	"math"
	"strings"
)

// roleBefore marks a baseline server: an older kekd (benches/run.sh's
// KEKD_BENCH_BASELINE or KEKD_BENCH_BASELINE_REV) measured in the same run
// as the current one. It is paired with the "kekd" server of its backend.
const roleBefore = "kekd-before"

// worse is how far a ratio may go the wrong way before the report puts it
// in bold.
const worse = 0.10

// pair is a current kekd server and its baseline twin.
type pair struct {
	now, before *ServerReport
}

// pairs lists each baseline server with the current kekd of its backend,
// in the order of the servers.
func (r Report) pairs() []pair {
	var out []pair
	for i := range r.Servers {
		b := &r.Servers[i]
		if b.Role != roleBefore {
			continue
		}
		if k := r.find("kekd", b.Backend); k != nil {
			out = append(out, pair{now: k, before: b})
		}
	}
	return out
}

// ratio is now ÷ before, and whether it is more than worse the wrong way
// (higherBetter: a ratio below 1 is the wrong way). ok is false when there
// is nothing to divide.
func ratio(now, before float64, higherBetter bool) (x float64, bad, ok bool) {
	if now <= 0 || before <= 0 {
		return 0, false, false
	}
	x = now / before
	if higherBetter {
		return x, x < 1-worse, true
	}
	return x, x > 1+worse, true
}

// fmtRatio prints a ratio as "1.02×", in bold when it is bad.
func fmtRatio(now, before float64, higherBetter bool) string {
	x, bad, ok := ratio(now, before, higherBetter)
	switch {
	case !ok:
		return "—"
	case bad:
		return fmt.Sprintf("**%.2f×**", x)
	}
	return fmt.Sprintf("%.2f×", x)
}

// geoMean is the geometric mean of now ÷ before over every scenario both
// servers ran, for one measure; n is how many scenarios it covers.
func (p pair) geoMean(r Report, measure func(*Result) float64) (mean float64, n int) {
	sum := 0.0
	for _, op := range Ops {
		for _, c := range r.Concurrency {
			a, b := p.now.result(op, c), p.before.result(op, c)
			if a == nil || b == nil || measure(a) <= 0 || measure(b) <= 0 {
				continue
			}
			sum += math.Log(measure(a) / measure(b))
			n++
		}
	}
	if n == 0 {
		return 0, 0
	}
	return math.Exp(sum / float64(n)), n
}

func throughput(x *Result) float64 { return x.Throughput }
func p50(x *Result) float64        { return x.P50 }
func p99(x *Result) float64        { return x.P99 }
func cpuPerCall(x *Result) float64 { return x.CPUPer1k }

// fmtGeoMean prints a pair's geometric-mean ratio for one measure.
func (p pair) fmtGeoMean(r Report, measure func(*Result) float64, higherBetter bool) string {
	m, n := p.geoMean(r, measure)
	if n == 0 {
		return "—"
	}
	return fmtRatio(m, 1, higherBetter)
}

// baselineWhat is what run.sh says the baseline is ("" if it said nothing).
func (r Report) baselineWhat() string {
	for _, kv := range r.Meta {
		if strings.HasPrefix(kv[0], roleBefore) {
			return kv[1]
		}
	}
	return ""
}

// renderBaseline is the report's "Before and after" section: each current
// kekd server beside its baseline twin ("" when the run had no baseline).
func renderBaseline(r Report) string {
	ps := r.pairs()
	if len(ps) == 0 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("\n### Before and after: kekd vs kekd-before\n\n")
	if s := r.baselineWhat(); s != "" {
		w("kekd-before is the baseline, %s. ", s)
	}
	w("Both measured in this run, on the same machine, taking turns in every scenario. "+
		"Each ratio is kekd ÷ kekd-before: for calls/s above 1 is better, for latency, CPU per call, start, storm and RSS below 1 is better. "+
		"A ratio more than %.0f%% the worse way is in **bold**; single ratios of a quick run, or of a run where other processes took CPU, are noisy — "+
		"the geometric means over all scenarios are steadier.\n\n", 100*worse)

	w("| servers | scenarios | calls/s ratio (geometric mean) | p50 ratio (geometric mean) | p99 ratio (geometric mean) | CPU/call ratio (geometric mean) |\n")
	w("|---|---|---|---|---|---|\n")
	for _, p := range ps {
		_, n := p.geoMean(r, throughput)
		w("| %s vs %s | %d | %s | %s | %s | %s |\n", p.now.Name, p.before.Name, n,
			p.fmtGeoMean(r, throughput, true), p.fmtGeoMean(r, p50, false),
			p.fmtGeoMean(r, p99, false), p.fmtGeoMean(r, cpuPerCall, false))
	}

	w("\n| servers | start → first good Status, median ms (kekd / before) | ratio | storm wall ms (kekd / before) | ratio | peak RSS MiB (kekd / before) | ratio |\n")
	w("|---|---|---|---|---|---|---|\n")
	for _, p := range ps {
		w("| %s vs %s | %.1f / %.1f | %s | %.0f / %.0f | %s | %.1f / %.1f | %s |\n",
			p.now.Name, p.before.Name,
			median(p.now.StartMS), median(p.before.StartMS), fmtRatio(median(p.now.StartMS), median(p.before.StartMS), false),
			p.now.Storm.WallMS, p.before.Storm.WallMS, fmtRatio(p.now.Storm.WallMS, p.before.Storm.WallMS, false),
			mib(p.now.PeakRSS), mib(p.before.PeakRSS), fmtRatio(float64(p.now.PeakRSS), float64(p.before.PeakRSS), false))
	}

	w("\n| call | concurrency | backend | calls/s (kekd / before) | calls/s ratio | p50 µs (kekd / before) | p50 ratio | p99 ratio | CPU µs/call (kekd / before) | CPU/call ratio |\n")
	w("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, op := range Ops {
		for _, c := range r.Concurrency {
			for _, p := range ps {
				a, x := p.now.result(op, c), p.before.result(op, c)
				if a == nil || x == nil {
					continue
				}
				w("| %s | %d | %s | %.0f / %.0f | %s | %.0f / %.0f | %s | %s | %.1f / %.1f | %s |\n",
					op, c, p.now.Backend,
					a.Throughput, x.Throughput, fmtRatio(a.Throughput, x.Throughput, true),
					a.P50, x.P50, fmtRatio(a.P50, x.P50, false), fmtRatio(a.P99, x.P99, false),
					a.CPUPer1k*1000, x.CPUPer1k*1000, fmtRatio(a.CPUPer1k, x.CPUPer1k, false))
			}
		}
	}
	return b.String()
}

// printBaseline prints each pair's geometric means, for the terminal.
func printBaseline(r Report) {
	for _, p := range r.pairs() {
		g := func(m func(*Result) float64) string {
			x, n := p.geoMean(r, m)
			if n == 0 {
				return "—"
			}
			return fmt.Sprintf("%.2f×", x)
		}
		q := func(now, before float64) string {
			x, _, ok := ratio(now, before, false)
			if !ok {
				return "—"
			}
			return fmt.Sprintf("%.2f×", x)
		}
		fmt.Printf("%s ÷ %s: calls/s %s, p50 %s, p99 %s, CPU/call %s (geometric means); start %s, storm %s, peak RSS %s\n",
			p.now.Name, p.before.Name, g(throughput), g(p50), g(p99), g(cpuPerCall),
			q(median(p.now.StartMS), median(p.before.StartMS)), q(p.now.Storm.WallMS, p.before.Storm.WallMS),
			q(float64(p.now.PeakRSS), float64(p.before.PeakRSS)))
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// plotColours gives each server its palette entry: the other servers take
// the palette in order, as without a baseline; a baseline server takes its
// twin's colour, lightened, and before says which servers those are.
func plotColours(r Report, palette []color.Color) (colours []color.Color, before []bool) {
	colours = make([]color.Color, len(r.Servers))
	before = make([]bool, len(r.Servers))
	idx := make(map[string]int)
	next := 0
	for i, s := range r.Servers {
		if s.Role == roleBefore {
			continue
		}
		colours[i] = palette[next%len(palette)]
		idx[s.Name] = next
		next++
	}
	for i, s := range r.Servers {
		if s.Role != roleBefore {
			continue
		}
		before[i] = true
		k := next
		if twin := r.find("kekd", s.Backend); twin != nil {
			k = idx[twin.Name]
		} else {
			next++
		}
		colours[i] = lighten(palette[k%len(palette)])
	}
	return colours, before
}

// lighten mixes a colour half-way to white.
func lighten(c color.Color) color.Color {
	r, g, b, _ := c.RGBA()
	mix := func(v uint32) uint8 { return uint8((v>>8 + 255) / 2) }
	return color.RGBA{R: mix(r), G: mix(g), B: mix(b), A: 0xff}
}
