package app

import (
	"bytes"
	"strings"
	"testing"
)

// TestParseErrorsSayWhatAndWhereHelpIs: a mistyped flag of any command exits
// 2 with one line naming the command and the flag, then the --help hint, on
// stderr (pflag's ContinueOnError prints nothing itself).
func TestParseErrorsSayWhatAndWhereHelpIs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // in the first line, besides the command
	}{
		{[]string{"fetch", "--no-such-flag"}, "--no-such-flag"},
		{[]string{"fetch", "--overall-timeout=5"}, `"--overall-timeout"`}, // a duration without unit
		{[]string{"fetch", "--image-list-file"}, "--image-list-file"},     // no value
		{[]string{"fetch", "-x"}, "'x'"},
		{[]string{"run", "--max-parallel-pulls=two"}, `"--max-parallel-pulls"`},
		{[]string{"run", "--recheck-interval", "often"}, `"--recheck-interval"`},
		{[]string{"collect", "--max-results=lots"}, `"--max-results"`},
		{[]string{"collect", "--grpc-adress=:1"}, "--grpc-adress"},
		{[]string{"aggregate-metrics", "--shutdown-timeout=soon"}, `"--shutdown-timeout"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := Main(tc.args, &stdout, &stderr)
			if code != ExitUsage {
				t.Errorf("exit %d, want %d", code, ExitUsage)
			}
			if stdout.Len() > 0 {
				t.Errorf("stdout is not empty:\n%s", stdout.String())
			}
			lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
			cmd := tc.args[0]
			if len(lines) != 2 {
				t.Fatalf("stderr has %d lines, want the error and the hint:\n%s", len(lines), stderr.String())
			}
			if !strings.HasPrefix(lines[0], "image-prefetcher "+cmd+": ") || !strings.Contains(lines[0], tc.want) {
				t.Errorf("first line %q does not name the command %q and %s", lines[0], cmd, tc.want)
			}
			if want := "See 'image-prefetcher " + cmd + " --help'."; lines[1] != want {
				t.Errorf("second line %q, want %q", lines[1], want)
			}
		})
	}
}

// TestHelpGoesToStdout: --help and -h print the command's usage and flags on
// stdout and exit 0.
func TestHelpGoesToStdout(t *testing.T) {
	for _, tc := range []struct {
		cmd   string
		flags []string // some of the command's own flags, all must be listed
	}{
		{"run", []string{"--recheck-interval", "--listen-address", "--image-list-file", "--instance"}},
		{"fetch", []string{"--image-list-file", "--overall-timeout", "--instance"}},
		{"collect", []string{"--max-results", "--grpc-address", "--http-address"}},
		{"aggregate-metrics", []string{"--max-results"}},
	} {
		for _, help := range []string{"--help", "-h"} {
			t.Run(tc.cmd+" "+help, func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				if code := Main([]string{tc.cmd, help}, &stdout, &stderr); code != ExitOK {
					t.Errorf("exit %d, want %d", code, ExitOK)
				}
				if stderr.Len() > 0 {
					t.Errorf("stderr is not empty:\n%s", stderr.String())
				}
				out := stdout.String()
				if !strings.Contains(out, "image-prefetcher "+tc.cmd) && !strings.Contains(out, "alias "+tc.cmd) {
					t.Errorf("usage does not name the command:\n%s", out)
				}
				for _, f := range tc.flags {
					if !strings.Contains(out, f) {
						t.Errorf("usage does not list %s:\n%s", f, out)
					}
				}
			})
		}
	}
}

// TestInvalidInstanceIsTheFirstLine: INSTANCE with a dot makes run and fetch
// exit 2, and the first line they print (what a crash-looping pod's log
// shows) names the instance and the rule, even when $NODE_NAME is unset too.
func TestInvalidInstanceIsTheFirstLine(t *testing.T) {
	for _, cmd := range []string{"run", "fetch"} {
		for _, node := range []string{testNode, ""} {
			t.Run(cmd+" NODE_NAME="+node, func(t *testing.T) {
				t.Setenv("INSTANCE", "my.images")
				t.Setenv("NODE_NAME", node)
				var stdout, stderr bytes.Buffer
				if code := Main([]string{cmd}, &stdout, &stderr); code != ExitUsage {
					t.Errorf("exit %d, want %d", code, ExitUsage)
				}
				first, _, _ := strings.Cut(stderr.String(), "\n")
				for _, want := range []string{"image-prefetcher " + cmd + ": ", "--instance", `"my.images"`,
					"at most 63 lowercase letters, digits or '-'", "must not contain dots"} {
					if !strings.Contains(first, want) {
						t.Errorf("first line %q does not say %q", first, want)
					}
				}
				if !strings.HasSuffix(stderr.String(), "See 'image-prefetcher "+cmd+" --help'.\n") {
					t.Errorf("no --help hint at the end:\n%s", stderr.String())
				}
				if stdout.Len() > 0 {
					t.Errorf("stdout is not empty:\n%s", stdout.String())
				}
			})
		}
	}
}
