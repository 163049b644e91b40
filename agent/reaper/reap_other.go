//go:build !linux

package reaper

import "context"

// Reap does nothing where the agent does not run as a container's PID 1.
func Reap(ctx context.Context) { <-ctx.Done() }

// Orphans reaps nothing outside Linux.
func Orphans() ([]int, error) { return nil, nil }
