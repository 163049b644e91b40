package app

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/imagelist"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

// BenchmarkFinalPresenceCheck measures the presence check that ends a pass,
// against the fake CRI runtime, for lists of 100 and 1000 images. Each
// iteration runs a whole pass (which includes the check), then the check
// alone as the pass makes it (one ListImages: absent), then the alternative
// (one ImageStatus per image: missing), so all figures come from the same
// run. "warm" passes find every image present (the steady state every
// --recheck-interval, where the check weighs most); "cold" ones pull every
// image (the fake pulls at once, so this is an upper bound of the check's
// share too). Reported per pass: pass-ns (ns/op), check-ns, status-check-ns,
// and check/rest, the check's cost over the rest of the pass.
//
//	go test -run '^$' -bench BenchmarkFinalPresenceCheck -benchtime 20x ./agent/app/
func BenchmarkFinalPresenceCheck(b *testing.B) {
	for _, cold := range []bool{false, true} {
		for _, n := range []int{100, 1000} {
			name := fmt.Sprintf("warm/images=%d", n)
			if cold {
				name = fmt.Sprintf("cold/images=%d", n)
			}
			b.Run(name, func(b *testing.B) { benchmarkPresenceCheck(b, n, cold) })
		}
	}
}

func benchmarkPresenceCheck(b *testing.B, n int, cold bool) {
	cri := critest.Start(b)
	refs := make([]string, n)
	for i := range refs {
		refs[i] = fmt.Sprintf("registry.test/bench/image-%04d:1", i)
		cri.AddImage(refs[i], critest.Image{Size: 10})
	}
	path := filepath.Join(b.TempDir(), "images.txt")
	if err := os.WriteFile(path, []byte(strings.Join(refs, "\n")+"\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	list, err := imagelist.ParseFile(path)
	if err != nil {
		b.Fatal(err)
	}
	o := testOptions(cri.Path(), path)
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode}})
	p, err := newPrefetcher(o, io.Discard, client)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.close)
	ctx := context.Background()
	if rep, err := p.pass(ctx); err != nil || rep.State != nodelabel.Succeeded {
		b.Fatalf("first pass: %s %v", rep.State, err)
	}

	var passT, checkT, statusT time.Duration
	iters := 0
	for b.Loop() {
		if cold {
			b.StopTimer()
			for _, r := range refs {
				cri.DeleteImage(r)
			}
			b.StartTimer()
		}
		start := time.Now()
		if rep, err := p.pass(ctx); err != nil || rep.State != nodelabel.Succeeded {
			b.Fatalf("pass: %s %v", rep.State, err)
		}
		passT += time.Since(start)
		start = time.Now()
		if gone, unanswered, err := p.absent(ctx, list.Entries); len(gone)+len(unanswered) > 0 || err != nil {
			b.Fatalf("check: %d gone, %d unanswered, %v", len(gone), len(unanswered), err)
		}
		checkT += time.Since(start)
		start = time.Now()
		if absent, _, unanswered, err := p.missing(ctx, list.Entries); len(absent)+len(unanswered) > 0 || err != nil {
			b.Fatalf("status check: %d absent, %d unanswered, %v", len(absent), len(unanswered), err)
		}
		statusT += time.Since(start)
		iters++
	}
	per := func(d time.Duration) float64 { return float64(d) / float64(iters) }
	b.ReportMetric(per(passT), "ns/op")
	b.ReportMetric(per(checkT), "check-ns/op")
	b.ReportMetric(per(statusT), "status-check-ns/op")
	b.ReportMetric(float64(checkT)/float64(passT-checkT), "check/rest")
}
