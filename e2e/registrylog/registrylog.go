// Package registrylog reads the access log of the harness's fleet registry (docker-registry's combined
// log format): which node asked for what, when, and how many bytes it was served. The fleet tests and the
// fleet benchmark count a rollout's fetches with it.
package registrylog

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Entry is one request.
type Entry struct {
	// Addr is the client's address (a node's address on the fleet bridge).
	Addr string
	// At is when the request began (the log's resolution: one second).
	At           time.Time
	Method, Path string
	Status       int
	// Bytes is the response body's size (0 for "-").
	Bytes int64
}

// Repository returns the repository a registry API path names ("/v2/e2e/random/blobs/sha256:..." is
// "e2e/random"), or "" for another path.
func (e Entry) Repository() string {
	p, ok := strings.CutPrefix(e.Path, "/v2/")
	if !ok {
		return ""
	}
	for _, kind := range []string{"/blobs/", "/manifests/", "/tags/"} {
		if i := strings.LastIndex(p, kind); i > 0 {
			return p[:i]
		}
	}
	return ""
}

// addr - - [02/Jan/2006:15:04:05 -0700] "METHOD /path HTTP/1.1" status bytes "referer" "agent"
var line = regexp.MustCompile(`^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)`)

// Parse reads every request line of r; other lines (the registry's own messages) are skipped.
func Parse(r io.Reader) ([]Entry, error) {
	var out []Entry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		at, err := time.Parse("02/Jan/2006:15:04:05 -0700", m[2])
		if err != nil {
			return nil, fmt.Errorf("line %d: time %q: %w", n, m[2], err)
		}
		status, _ := strconv.Atoi(m[5])
		var size int64
		if m[6] != "-" {
			size, _ = strconv.ParseInt(m[6], 10, 64)
		}
		out = append(out, Entry{Addr: m[1], At: at, Method: m[3], Path: m[4], Status: status, Bytes: size})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// Size is the log's size now: the offset from which a later ReadFrom sees only what came after.
func Size(path string) (int64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("registry log: %w", err)
	}
	return st.Size(), nil
}

// ReadFrom parses the log file from offset on.
func ReadFrom(path string, offset int64) ([]Entry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("registry log: %w", err)
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return nil, fmt.Errorf("registry log %s: %w", path, err)
	}
	entries, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("registry log %s (from byte %d): %w", path, offset, err)
	}
	return entries, nil
}
