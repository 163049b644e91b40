// Command image-prefetcher is the node agent: it pulls a list of images through
// the node's CRI socket and labels the Node when the whole list is present.
package main

import (
	"context"
	"os"

	"github.com/nodeprefetch/image-prefetcher/agent/app"
	"github.com/nodeprefetch/image-prefetcher/agent/reaper"
)

func main() {
	// The container has no init: as its PID 1 the agent inherits every orphan
	// (a credential plugin's children) and must reap them, or they stay zombies.
	if os.Getpid() == 1 {
		go reaper.Reap(context.Background())
	}
	os.Exit(app.Main(os.Args[1:], os.Stdout, os.Stderr))
}
