package app

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version and Commit are set at build time:
//
//	-ldflags "-X github.com/nodeprefetch/image-prefetcher/agent/app.Version=v1.2.3
//	          -X github.com/nodeprefetch/image-prefetcher/agent/app.Commit=0123abc"
//
// Unset, Version says "dev" and Commit is taken from the VCS stamp `go build`
// puts in a binary built from a git checkout (see build).
var (
	Version = "dev"
	Commit  = ""
)

// buildInfo says which build of the agent is running.
type buildInfo struct {
	Version   string
	Commit    string
	GoVersion string
	Platform  string // GOOS/GOARCH
}

// build is the running binary's buildInfo.
func build() buildInfo {
	bi, _ := debug.ReadBuildInfo()
	return resolveBuild(Version, Commit, bi)
}

// resolveBuild fills what the ldflags left unset from bi (nil: none).
func resolveBuild(version, commit string, bi *debug.BuildInfo) buildInfo {
	b := buildInfo{Version: version, Commit: commit, GoVersion: runtime.Version(),
		Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if b.Version == "" {
		b.Version = "dev"
	}
	if b.Commit == "" && bi != nil {
		var revision, modified string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value
			}
		}
		if revision != "" && modified == "true" {
			// Built from a tree with uncommitted changes: the commit alone
			// would claim more than it is.
			revision += "-dirty"
		}
		b.Commit = revision
	}
	if b.Commit == "" {
		b.Commit = "unknown"
	}
	return b
}

// String is the `version` command's line.
func (b buildInfo) String() string {
	return fmt.Sprintf("image-prefetcher %s (commit %s, %s, %s)", b.Version, b.Commit, b.GoVersion, b.Platform)
}

// logStart is the first log line of run and fetch: which build runs, and
// where, so that a pod's log says it before anything can go wrong.
func (p *prefetcher) logStart(command string) {
	b := build()
	p.log.Info("image-prefetcher starting", "command", command, "version", b.Version, "commit", b.Commit,
		"goVersion", b.GoVersion, "platform", b.Platform)
}
