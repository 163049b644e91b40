package app

import (
	"bytes"
	"encoding/json"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
)

func TestResolveBuild(t *testing.T) {
	vcs := func(settings ...string) *debug.BuildInfo {
		bi := &debug.BuildInfo{}
		for i := 0; i < len(settings); i += 2 {
			bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
		}
		return bi
	}
	for _, tc := range []struct {
		name            string
		version, commit string
		bi              *debug.BuildInfo
		wantV, wantC    string
	}{
		{"ldflags win over the VCS stamp", "v1.2.3", "abc1234", vcs("vcs.revision", "fff", "vcs.modified", "true"), "v1.2.3", "abc1234"},
		{"go build from a clean checkout", "dev", "", vcs("vcs.revision", "0123456789abcdef", "vcs.modified", "false"), "dev", "0123456789abcdef"},
		{"go build from a modified checkout", "dev", "", vcs("vcs.revision", "0123456789abcdef", "vcs.modified", "true"), "dev", "0123456789abcdef-dirty"},
		{"no VCS stamp (-buildvcs=false, no .git)", "dev", "", vcs("-trimpath", "true"), "dev", "unknown"},
		{"no build info", "", "", nil, "dev", "unknown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := resolveBuild(tc.version, tc.commit, tc.bi)
			if b.Version != tc.wantV || b.Commit != tc.wantC {
				t.Errorf("version %q commit %q, want %q %q", b.Version, b.Commit, tc.wantV, tc.wantC)
			}
		})
	}
}

// setBuild sets what -ldflags -X would for the test.
func setBuild(t *testing.T, version, commit string) {
	t.Helper()
	oldV, oldC := Version, Commit
	Version, Commit = version, commit
	t.Cleanup(func() { Version, Commit = oldV, oldC })
}

func TestVersionCommand(t *testing.T) {
	setBuild(t, "v1.2.3", "abc1234")
	want := "image-prefetcher v1.2.3 (commit abc1234, " + runtime.Version() + ", " + runtime.GOOS + "/" + runtime.GOARCH + ")\n"
	for _, arg := range []string{"version", "--version"} {
		var stdout, stderr bytes.Buffer
		if code := Main([]string{arg}, &stdout, &stderr); code != ExitOK {
			t.Errorf("%s: exit %d", arg, code)
		}
		if stdout.String() != want || stderr.Len() > 0 {
			t.Errorf("%s printed %q (stderr %q), want %q", arg, stdout.String(), stderr.String(), want)
		}
	}
}

// TestFirstLogLineNamesTheBuild: the first line fetch logs says which build
// runs, so a pod's log tells it before anything can go wrong.
func TestFirstLogLineNamesTheBuild(t *testing.T) {
	setBuild(t, "v1.2.3", "abc1234")
	cri := critest.Start(t)
	cri.AddImage(present, critest.Image{Size: 10})
	var stdout, stderr bytes.Buffer
	code := Main([]string{"fetch", "--label=false", "--log-format=json", "--cri-socket=" + cri.Path(),
		"--image-list-file=" + writeList(t, present)}, &stdout, &stderr)
	if code != ExitOK {
		t.Fatalf("fetch exit %d\n%s", code, stderr.String())
	}
	first, _, _ := strings.Cut(stderr.String(), "\n")
	var line map[string]any
	if err := json.Unmarshal([]byte(first), &line); err != nil {
		t.Fatalf("first line %q: %v", first, err)
	}
	for k, want := range map[string]string{"level": "INFO", "msg": "image-prefetcher starting", "command": "fetch",
		"version": "v1.2.3", "commit": "abc1234", "goVersion": runtime.Version()} {
		if line[k] != want {
			t.Errorf("first line's %s = %v, want %q: %s", k, line[k], want, first)
		}
	}
}
