package progress_test

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nodeprefetch/image-prefetcher/agent/progress"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// callLog records the containerd API methods a client calls.
type callLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *callLog) add(method string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	// "/containerd.services.leases.v1.Leases/Create" -> "Leases.Create"
	svc := path.Base(path.Dir(method))
	l.calls = append(l.calls, svc[strings.LastIndex(svc, ".")+1:]+"."+path.Base(method))
}

func (l *callLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}

// countingDial connects to the fake containerd like dial, logging every call.
func countingDial(t *testing.T, sock string) (*grpc.ClientConn, *callLog) {
	t.Helper()
	l := &callLog{}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			l.add(method)
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			l.add(method)
			return streamer(ctx, desc, cc, method, opts...)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, l
}

// What a small image costs on containerd when its pull ends before the first
// poll: its lease made and deleted, nothing read.
func TestContainerdPullEndingBeforeTheFirstPollCostsTheLeaseAlone(t *testing.T) {
	f, sock := startFake(t)
	conn, calls := countingDial(t, sock)
	src := progress.NewContainerd(conn, "team-a")
	w := &progress.Watcher{Source: src, Interval: time.Hour}
	const image = "registry.example/small:1"
	tr := w.Follow(context.Background(), image)
	if tr == nil {
		t.Fatal("Follow returned nil")
	}
	key := progress.LeaseID("team-a", image)
	a := tr.Watch(1, 20*time.Second)
	// The pull: a layer and a manifest fetched under the lease.
	f.ingest(key, "layer-sha256:l", "sha256:l", 1000, 64<<10)
	f.commit(key, "layer-sha256:l", "sha256:l", nil, 64<<10, time.Now())
	f.commit(key, "manifest-sha256:m", "sha256:m", []byte(`{"config":{"size":10},"layers":[{"size":65536}]}`), 0, time.Now())
	a.Stop()
	tr.Close(pull.TransferPulled)
	want := []string{"Leases.Create", "Leases.Delete"}
	if got := calls.get(); !slices.Equal(got, want) {
		t.Errorf("containerd calls %v, want %v", got, want)
	}
}

// On containerd, a pull still running at the first poll is followed through
// its lease, and a blob that stops is caught as a stall while another pull's
// blob on the node goes on.
func TestContainerdPullStillRunningIsFollowedAndItsStallCaught(t *testing.T) {
	f, sock := startFake(t)
	conn, calls := countingDial(t, sock)
	src := progress.NewContainerd(conn, "team-a")
	w := &progress.Watcher{Source: src, Interval: 20 * time.Millisecond}
	const image = "registry.example/big:1"
	tr := w.Follow(context.Background(), image)
	if tr == nil {
		t.Fatal("Follow returned nil")
	}
	defer tr.Close(pull.TransferFailed)
	key := progress.LeaseID("team-a", image)
	start := time.Now()
	a := tr.Watch(1, 300*time.Millisecond)
	f.ingest(key, "layer-sha256:big", "sha256:big", 5*mib, 50*mib) // 5 MiB, then nothing
	stalled := false
	for i := 0; !stalled && time.Since(start) < soon; i++ {
		// Another pull on the node opens blob after blob (new refs: the
		// fake changes a known ingest's offset in place, which its server
		// may be sending at that moment).
		f.ingest("", fmt.Sprintf("layer-sha256:other%d", i), "sha256:other", 1000, 1<<30)
		select {
		case <-a.Stalled():
			stalled = true
		case <-time.After(5 * time.Millisecond):
		}
	}
	if !stalled {
		t.Fatal("no stall reported")
	}
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("stall reported after %s, before the 300ms window", took)
	}
	if b := a.Stop(); b.Fetched != 5*mib {
		t.Errorf("bytes %+v, want 5 MiB fetched", b)
	}
	if !slices.Contains(calls.get(), "Leases.ListResources") {
		t.Errorf("the lease was never read: calls %v", calls.get())
	}
}
