package critest_test

import (
	"context"
	"encoding/base64"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodeprefetch/image-prefetcher/agent/cri"
	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

const ref = "docker.io/library/busybox:1.36"

func dial(t *testing.T, srv *critest.Server) runtimeapi.ImageServiceClient {
	t.Helper()
	c, err := cri.Dial(context.Background(), srv.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.Images
}

func pull(ctx context.Context, c runtimeapi.ImageServiceClient, image string, auth *runtimeapi.AuthConfig) error {
	_, err := c.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: image}, Auth: auth})
	return err
}

func TestScriptLastStepRepeats(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	ctx := context.Background()
	srv.OnPull(ref, critest.Unavailable(), critest.NotFound(ref))
	want := []codes.Code{codes.Unavailable, codes.NotFound, codes.NotFound}
	for i, w := range want {
		if got := status.Code(pull(ctx, c, ref, nil)); got != w {
			t.Errorf("call %d: code %v, want %v", i+1, got, w)
		}
	}
	if srv.PullCalls(ref) != 3 || srv.HasImage(ref) {
		t.Errorf("calls = %d, present = %v", srv.PullCalls(ref), srv.HasImage(ref))
	}
	srv.OnPull(ref) // back to the default: success
	if err := pull(ctx, c, ref, nil); err != nil {
		t.Fatal(err)
	}
	st, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil || st.GetImage().GetSize() != critest.DefaultPullSize || len(st.GetImage().GetRepoDigests()) != 1 {
		t.Errorf("status after pull = %v, %v", st, err)
	}
	if srv.StatusCalls(ref) != 1 {
		t.Errorf("status calls = %d", srv.StatusCalls(ref))
	}
}

func TestStallEndsWithTheCallersDeadline(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	srv.OnPull(ref, critest.Stall(), critest.Succeed().After(10*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if got := status.Code(pull(ctx, c, ref, nil)); got != codes.DeadlineExceeded {
		t.Fatalf("stalled call: %v", got)
	}
	if err := pull(context.Background(), c, ref, nil); err != nil {
		t.Fatalf("second call: %v", err)
	}
	calls := srv.PullCallsFor(ref)
	if len(calls) != 2 || calls[0].Timeout <= 0 || calls[0].Timeout > 50*time.Millisecond || calls[1].Timeout != 0 {
		t.Errorf("calls = %+v", calls)
	}
}

func TestStopEndsStalls(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	srv.OnPull(ref, critest.Stall())
	errc := make(chan error, 1)
	go func() { errc <- pull(context.Background(), c, ref, nil) }()
	for srv.PullCalls(ref) == 0 {
		time.Sleep(time.Millisecond)
	}
	srv.Stop()
	select {
	case err := <-errc:
		if err == nil {
			t.Error("stalled pull succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not end the stalled call")
	}
}

func TestRequireAuth(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	ctx := context.Background()
	srv.RequireAuth(ref, critest.Credential{Username: "alice", Password: "s3cret"})
	other := "docker.io/library/nginx:latest"
	if err := pull(ctx, c, other, nil); err != nil {
		t.Errorf("other image needs no auth: %v", err)
	}
	for _, auth := range []*runtimeapi.AuthConfig{nil, {Username: "alice", Password: "wrong"}, {Username: "bob", Password: "s3cret"}} {
		err := pull(ctx, c, ref, auth)
		if st, _ := status.FromError(err); st.Code() != codes.Unknown || !strings.Contains(st.Message(), "401 Unauthorized") {
			t.Errorf("auth %v: %v", auth, err)
		}
	}
	if err := pull(ctx, c, ref, &runtimeapi.AuthConfig{Username: "alice", Password: "s3cret"}); err != nil {
		t.Errorf("right password: %v", err)
	}
	encoded := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	if err := pull(ctx, c, ref, &runtimeapi.AuthConfig{Auth: encoded}); err != nil {
		t.Errorf("auth field: %v", err)
	}
	users := []string{}
	for _, call := range srv.PullCallsFor(ref) {
		users = append(users, call.Username)
	}
	if want := []string{"", "alice", "bob", "alice", "alice"}; !slices.Equal(users, want) {
		t.Errorf("users = %q, want %q", users, want)
	}
}

func TestMaxConcurrentPulls(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	srv.SetDefaultPull(critest.Succeed().After(50 * time.Millisecond))
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pull(context.Background(), c, "docker.io/library/img:"+string(rune('a'+i)), nil); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := srv.MaxConcurrentPulls(); got < 2 || got > 4 {
		t.Errorf("max concurrent pulls = %d", got)
	}
	if srv.TotalPullCalls() != 4 || len(srv.Images()) != 4 {
		t.Errorf("total = %d, images = %v", srv.TotalPullCalls(), srv.Images())
	}
	srv.ResetCounters()
	if srv.TotalPullCalls() != 0 || srv.MaxConcurrentPulls() != 0 || len(srv.Calls()) != 0 {
		t.Error("counters not reset")
	}
}

func TestImagesByIDTagAndDigest(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	ctx := context.Background()
	srv.AddImage(ref, critest.Image{ID: "sha256:abc", RepoDigests: []string{"docker.io/library/busybox@sha256:def"}, Size: 7})
	for _, name := range []string{ref, "sha256:abc", "docker.io/library/busybox@sha256:def"} {
		st, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: name}})
		if err != nil || st.GetImage().GetId() != "sha256:abc" {
			t.Errorf("status %s = %v, %v", name, st, err)
		}
	}
	if _, err := c.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: "sha256:abc"}}); err != nil {
		t.Fatal(err)
	}
	st, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil || st.GetImage() != nil {
		t.Errorf("status after remove = %v, %v", st, err)
	}
	srv.OnStatus(ref, critest.Fail(codes.Internal, "boom"))
	if _, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); status.Code(err) != codes.Internal {
		t.Errorf("scripted status: %v", err)
	}
	fs, err := c.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{})
	if err != nil || len(fs.ImageFilesystems) != 1 {
		t.Errorf("ImageFsInfo = %v, %v", fs, err)
	}
}

// Do runs as a call arrives, Then once it has had its effect: a test removes
// an image during another call, or right after the image is pulled.
func TestStepHooks(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	ctx := context.Background()
	const other = "docker.io/library/other:1"
	srv.AddImage(other, critest.Image{})
	srv.OnPull(ref, critest.Succeed().Doing(func() { srv.DeleteImage(other) }).AndThen(func() { srv.DeleteImage(ref) }))
	if err := pull(ctx, c, ref, nil); err != nil {
		t.Fatal(err)
	}
	if srv.HasImage(other) || srv.HasImage(ref) {
		t.Errorf("images after the pull: %v, want none (Do removed %s, Then the pulled one)", srv.Images(), other)
	}
	var atStatus bool
	srv.AddImage(other, critest.Image{})
	srv.OnStatus(other, critest.Succeed().AndThen(func() { atStatus = true; srv.DeleteImage(other) }))
	st, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: other}})
	if err != nil || st.GetImage() == nil || !atStatus || srv.HasImage(other) {
		t.Errorf("status %v %v, hook ran %v: want the image answered, then removed", st, err, atStatus)
	}
}

func TestListImagesScriptAndCount(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	ctx := context.Background()
	srv.AddImage(ref, critest.Image{})
	srv.OnList(critest.Unavailable(), critest.Succeed())
	if _, err := c.ListImages(ctx, &runtimeapi.ListImagesRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("first ListImages: %v, want Unavailable", err)
	}
	resp, err := c.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil || len(resp.GetImages()) != 1 {
		t.Errorf("second ListImages: %v %v, want the one image", resp, err)
	}
	if n := srv.ListCalls(); n != 2 {
		t.Errorf("ListCalls = %d, want 2", n)
	}
}

func TestDiskFullStep(t *testing.T) {
	t.Parallel()
	srv := critest.Start(t)
	c := dial(t, srv)
	srv.OnPull(ref, critest.DiskFull(ref))
	err := pull(context.Background(), c, ref, nil)
	if status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "no space left on device") || srv.HasImage(ref) {
		t.Errorf("pull on a full disk: %v, present %v", err, srv.HasImage(ref))
	}
}
