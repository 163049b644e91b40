// Command image-prefetcher is the node agent: it pulls a list of images through
// the node's CRI socket and labels the Node when the whole list is present.
package main

import (
	"os"

	"github.com/nodeprefetch/image-prefetcher/agent/app"
)

func main() {
	os.Exit(app.Main(os.Args[1:], os.Stdout, os.Stderr))
}
