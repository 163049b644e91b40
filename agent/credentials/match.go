package credentials

import (
	"errors"
	"fmt"
	"net"
	"path"
	"sort"
	"strings"

	"github.com/distribution/reference"
)

// Matching follows the kubelet's keyring rules (written anew here):
//   - a key is host, host:port or host/path, optionally with a scheme;
//   - the host is compared label by label, each label a path.Match glob, and the
//     label counts must be equal, so *.example.com matches a.example.com but
//     neither example.com nor a.b.example.com;
//   - ports are compared exactly: a key with a port matches only that port, and
//     a key without a port matches only images without one (as the kubelet does;
//     docker config entries for "localhost" are not meant for "localhost:5000");
//   - a key path is a prefix of the image's repository path on segment
//     boundaries (quay.io/a matches quay.io/a/b, not quay.io/ab);
//   - the Docker Hub names are one registry.

// dockerHubHosts are the names under which Docker Hub appears in docker config
// files; all of them mean the registry that reference normalises to docker.io.
var dockerHubHosts = map[string]bool{
	"docker.io":            true,
	"index.docker.io":      true,
	"registry-1.docker.io": true,
}

const dockerHubHost = "docker.io"

// pattern is a parsed docker config key or matchImages entry.
type pattern struct {
	labels []string // lower-case host labels, possibly globs
	port   string
	path   string // "" or "/seg/seg", no trailing slash
	// canonical is host[:port][/path] after normalisation; its length orders
	// matches (longer is more specific).
	canonical string
	globs     int // how many labels hold glob characters
}

func parsePattern(key string) (pattern, error) {
	s := strings.TrimSpace(key)
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+len("://"):]
	}
	host, p := s, ""
	if i := strings.IndexByte(s, '/'); i >= 0 {
		host, p = s[:i], s[i:]
	}
	if j := strings.IndexAny(p, "?#"); j >= 0 {
		p = p[:j]
	}
	h, port, err := splitHostPort(host)
	if err != nil {
		return pattern{}, err
	}
	h = strings.ToLower(h)
	p = strings.TrimRight(p, "/")
	if dockerHubHosts[h] && port == "" {
		h = dockerHubHost
		// "https://index.docker.io/v1/" is the classic key for all of Docker
		// Hub; the API version is not a repository path.
		if p == "/v1" || p == "/v2" {
			p = ""
		}
	}
	pt := pattern{labels: strings.Split(h, "."), port: port, path: p}
	for _, l := range pt.labels {
		if strings.ContainsFunc(l, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return pattern{}, fmt.Errorf("space or control character in host %q", h)
		}
		if l == "" {
			return pattern{}, fmt.Errorf("empty label in host %q", h)
		}
		if _, err := path.Match(l, ""); err != nil {
			return pattern{}, fmt.Errorf("bad glob in host %q: %w", h, err)
		}
		if strings.ContainsAny(l, `*?[\`) {
			pt.globs++
		}
	}
	pt.canonical = h
	if port != "" {
		pt.canonical += ":" + port
	}
	pt.canonical += p
	return pt, nil
}

func splitHostPort(host string) (string, string, error) {
	if host == "" {
		return "", "", errors.New("empty host")
	}
	if !strings.Contains(host, ":") {
		return host, "", nil
	}
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		return host[1 : len(host)-1], "", nil
	}
	h, port, err := net.SplitHostPort(host)
	if err != nil {
		return "", "", fmt.Errorf("bad host %q: %w", host, err)
	}
	if h == "" {
		return "", "", fmt.Errorf("bad host %q: empty host name", host)
	}
	if port == "" {
		return h, "", nil
	}
	for _, c := range port {
		if c < '0' || c > '9' {
			return "", "", fmt.Errorf("bad port %q", port)
		}
	}
	return h, port, nil
}

// target is an image reference split the way patterns are.
type target struct {
	labels   []string
	port     string
	path     string // "/repo/path"
	registry string // host[:port], lower case, Docker Hub normalised
}

func parseTarget(image string) (target, error) {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return target{}, fmt.Errorf("parse image %q: %w", image, err)
	}
	h, port, err := splitHostPort(reference.Domain(named))
	if err != nil {
		return target{}, fmt.Errorf("parse image %q: %w", image, err)
	}
	h = strings.ToLower(h)
	if dockerHubHosts[h] && port == "" {
		h = dockerHubHost
	}
	reg := h
	if port != "" {
		reg += ":" + port
	}
	return target{labels: strings.Split(h, "."), port: port, path: "/" + reference.Path(named), registry: reg}, nil
}

func (p pattern) matches(t target) bool {
	if len(p.labels) != len(t.labels) || p.port != t.port {
		return false
	}
	for i, l := range p.labels {
		if ok, _ := path.Match(l, t.labels[i]); !ok {
			return false
		}
	}
	if p.path == "" {
		return true
	}
	return t.path == p.path || strings.HasPrefix(t.path, p.path+"/")
}

// moreSpecific orders patterns: longer canonical key first, then fewer glob
// labels. Equal patterns keep their given order (callers sort stably).
func moreSpecific(a, b pattern) bool {
	if len(a.canonical) != len(b.canonical) {
		return len(a.canonical) > len(b.canonical)
	}
	return a.globs < b.globs
}

// matched is one matching entry waiting to be ordered.
type matched struct {
	pat  pattern
	cred Credential
}

func sortMatched(ms []matched) []Credential {
	sort.SliceStable(ms, func(i, j int) bool { return moreSpecific(ms[i].pat, ms[j].pat) })
	out := make([]Credential, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.cred)
	}
	return out
}
