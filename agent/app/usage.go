package app

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/pflag"
)

// commandUsage heads the --help output of run and fetch, before the flags.
var commandUsage = map[string]string{
	"run": `Usage: image-prefetcher run [flags]

The DaemonSet container: serves /healthz, /readyz and /metrics, passes over the list now and
every --recheck-interval, and labels the Node image-prefetcher.stackrox.io/<instance>=succeeded|failed.

Flags:
`,
	"fetch": `Usage: image-prefetcher fetch [flags]

One pass over the list, for init containers, Jobs and local use. Exit codes: 0 every image is
present and the node says so, 1 images missing or the pass could not run, 2 bad flags,
3 node label not written.

Flags:
`,
}

// newFlagSet is the flag set of a command. Its usage (--help, -h) goes to
// stdout: it was asked for, and is read or piped as such.
func newFlagSet(name, header string, stdout io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.Usage = func() {
		fmt.Fprint(stdout, header)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args into fs; done says the command ends here, with
// code: --help (its usage already printed by pflag) or a bad flag.
func parseFlags(fs *pflag.FlagSet, name string, args []string, stderr io.Writer) (code int, done bool) {
	err := fs.Parse(args)
	switch {
	case err == nil:
		return ExitOK, false
	case errors.Is(err, pflag.ErrHelp):
		return ExitOK, true
	}
	// With ContinueOnError pflag prints nothing itself: without this line a
	// mistyped flag exits 2 in silence.
	return usageError(stderr, name, err), true
}

// usageError prints err, a usage error of the command name, and where its
// flags are described, and returns ExitUsage.
func usageError(stderr io.Writer, name string, err error) int {
	printError(stderr, name, err)
	fmt.Fprintf(stderr, "See 'image-prefetcher %s --help'.\n", name)
	return ExitUsage
}

// printError prints err with one line per line of it (errors.Join puts one
// problem on each), each naming the command: the first line is what a
// crash-looping pod's log shows, and it must say what is wrong on its own.
func printError(w io.Writer, name string, err error) {
	for line := range strings.SplitSeq(err.Error(), "\n") {
		fmt.Fprintf(w, "image-prefetcher %s: %s\n", name, line)
	}
}
