package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// runtime is the CRI image service the benchmark drives directly.
type runtime struct {
	images runtimeapi.ImageServiceClient
}

// removeAll makes the content store cold for refs: RemoveImage of each, then
// ImageStatus until every one is gone. Removing the last reference of an
// image lets containerd collect its blobs and snapshots.
func (r runtime) removeAll(ctx context.Context, refs []string) error {
	for _, ref := range refs {
		if _, err := r.images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
			return fmt.Errorf("remove %s: %w", ref, err)
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for _, ref := range refs {
		for {
			st, err := r.images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
			if err != nil {
				return fmt.Errorf("status %s: %w", ref, err)
			}
			if st.GetImage() == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s still present a minute after RemoveImage", ref)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// removeByPath removes every image named <any registry>/<path> for the
// paths of s, whatever registry name it was pulled under (an earlier run's
// proxy ports included): a runtime that keeps layers by digest across names
// (CRI-O) would otherwise find a set's content present.
func (r runtime) removeByPath(ctx context.Context, paths []string) error {
	list, err := r.images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	var refs []string
	for _, img := range list.GetImages() {
		for _, tag := range img.GetRepoTags() {
			for _, p := range paths {
				if strings.HasSuffix(tag, "/"+p) {
					refs = append(refs, tag)
				}
			}
		}
	}
	return r.removeAll(ctx, refs)
}

// pull is one PullImage call.
func (r runtime) pull(ctx context.Context, ref string) error {
	if _, err := r.images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	return nil
}

// sequential pulls one image after another, as the kubelet does with its
// default serialized image pulls.
func (r runtime) sequential(ctx context.Context, refs []string) error {
	for _, ref := range refs {
		if err := r.pull(ctx, ref); err != nil {
			return err
		}
	}
	return nil
}

// parallel pulls every image at once: the raw limit of runtime and network.
func (r runtime) parallel(ctx context.Context, refs []string) error {
	errs := make([]error, len(refs))
	var wg sync.WaitGroup
	for i, ref := range refs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.pull(ctx, ref)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
