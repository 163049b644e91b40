package credentials

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path"
	"sort"
	"strings"

	"github.com/distribution/reference"
)

// Matching is the kubelet's, rule for rule (written anew here; match_test.go
// states each rule with where the kubelet documents it):
//   - an image is looked up by its repository name (host/path, no tag or
//     digest), as the kubelet looks it up;
//   - a docker config key or a plugin response's auth key is read as a URL
//     (https:// put in front unless it starts with http:// or https://); its
//     user info, query and fragment are dropped, a path starting /v1/ or /v2/
//     loses that prefix, and host[:port][/path] is the entry's key;
//   - a matchImages entry is read as written, with no scheme and no /v1/ rule;
//   - hosts are compared label by label, each label a path.Match glob, with
//     equal label counts and case as written: *.example.com matches
//     a.example.com but neither example.com nor a.b.example.com;
//   - ports must be equal: a key without a port matches only images without one;
//   - the key's path is a prefix of the image's path as a string, not on
//     segment boundaries: quay.io/a matches quay.io/a/b and quay.io/ab;
//   - matches are tried in reverse byte order of their keys (longer keys
//     before their prefixes, names before the globs that cover them), equal
//     keys in the order given;
//   - Docker Hub has no aliases: when no key matches a Docker Hub image, the
//     entries whose key is index.docker.io (https://index.docker.io/v1/ as
//     docker writes it) are used.

// dockerHubKey is the key whose entries serve Docker Hub images no key matches.
const dockerHubKey = "index.docker.io"

// redacted stands for the user info of a key, which may hold a password.
const redacted = "<redacted>"

// pattern is a parsed key or matchImages entry.
type pattern struct {
	key    string   // host[:port][/path]; orders matches
	labels []string // host labels as written, possibly globs
	port   string
	path   string // "" or "/..." as written, compared as a string prefix
}

// displayKey is key as it may be shown: a key with user info
// (https://user:password@host) has everything up to its last '@' after the
// scheme replaced, since a password may itself hold '/', ':' or '@'.
func displayKey(key string) string {
	at := strings.LastIndexByte(key, '@')
	if at < 0 {
		return key
	}
	scheme := ""
	if i := strings.Index(key, "://"); i >= 0 && i < at {
		scheme = key[:i+len("://")]
	}
	return scheme + redacted + key[at:]
}

// parseKey reads a docker config key or a plugin response's auth key the way
// the kubelet's keyring adds it. Its errors never quote user info.
func parseKey(raw string) (pattern, error) {
	s := raw
	if !strings.HasPrefix(s, "https://") && !strings.HasPrefix(s, "http://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return pattern{}, urlError(raw, err)
	}
	p := u.Path
	if strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/v2/") {
		p = p[len("/v1"):]
	}
	if p == "/" {
		p = ""
	}
	pt, err := parseSchemeless(u.Host + p)
	if err != nil && strings.Contains(raw, "@") {
		return pattern{}, errors.New("not a registry URL")
	}
	return pt, err
}

// parseMatchImage reads a matchImages entry the way the kubelet does. Its
// errors never quote user info.
func parseMatchImage(raw string) (pattern, error) {
	pt, err := parseSchemeless(raw)
	if err != nil && strings.Contains(raw, "@") {
		return pattern{}, errors.New("not a registry URL")
	}
	return pt, err
}

// parseSchemeless parses host[:port][/path]. A key the kubelet would keep but
// that can match no image (an empty host label, a bad glob) is an error here,
// so that it is reported rather than silently dead.
func parseSchemeless(s string) (pattern, error) {
	u, err := url.Parse("https://" + s)
	if err != nil {
		return pattern{}, urlError(s, err)
	}
	host, port := splitHostPort(u.Host)
	if host == "" {
		return pattern{}, errors.New("empty host")
	}
	pt := pattern{key: s, labels: strings.Split(host, "."), port: port, path: u.Path}
	for _, l := range pt.labels {
		if l == "" {
			return pattern{}, fmt.Errorf("empty label in host %q", host)
		}
		if _, err := path.Match(l, ""); err != nil {
			return pattern{}, fmt.Errorf("bad glob in host %q: %w", host, err)
		}
	}
	return pt, nil
}

// urlError keeps what url.Parse found wrong without the URL it quotes, and
// says nothing more when the text holds user info.
func urlError(raw string, err error) error {
	if strings.Contains(raw, "@") {
		return errors.New("not a registry URL")
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("not a registry URL: %w", err)
}

// splitHostPort splits host[:port]; what does not split (no port, an IPv6
// address in brackets without one) is all host, as in the kubelet.
func splitHostPort(hostport string) (host, port string) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport, ""
	}
	return h, p
}

// target is an image reference split the way patterns are.
type target struct {
	repo   string // normalized repository name: what plugins are asked about
	host   string // repo's host[:port] as written: a plugin's Registry cache key
	labels []string
	port   string
	path   string // "/" + repository path
}

func parseTarget(image string) (target, error) {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return target{}, fmt.Errorf("parse image %q: %w", image, err)
	}
	domain := reference.Domain(named)
	h, port := splitHostPort(domain)
	return target{
		repo:   named.Name(),
		host:   domain,
		labels: strings.Split(h, "."),
		port:   port,
		path:   "/" + reference.Path(named),
	}, nil
}

// dockerHub says whether the kubelet takes t for a Docker Hub image when
// choosing the fallback: its host is docker.io or index.docker.io, or has
// neither '.' nor ':' (which makes localhost one too, as in the kubelet).
func (t target) dockerHub() bool {
	return t.host == "docker.io" || t.host == dockerHubKey || !strings.ContainsAny(t.host, ".:")
}

func (p pattern) matches(t target) bool {
	if p.port != t.port || len(p.labels) != len(t.labels) || !strings.HasPrefix(t.path, p.path) {
		return false
	}
	for i, l := range p.labels {
		if ok, _ := path.Match(l, t.labels[i]); !ok {
			return false
		}
	}
	return true
}

// candidate is an entry that may apply to an image: a docker config entry or
// a plugin response's auth entry.
type candidate struct {
	pat    pattern
	source string
	auth   authFields
}

// pick returns the credentials of the candidates that apply to t: every match
// in reverse key order (equal keys keep the order given), or when none
// matches a Docker Hub image, the index.docker.io entries.
func pick(cands []candidate, t target) []Credential {
	var ms []candidate
	for _, c := range cands {
		if c.pat.matches(t) {
			ms = append(ms, c)
		}
	}
	if len(ms) == 0 && t.dockerHub() {
		for _, c := range cands {
			if c.pat.key == dockerHubKey {
				ms = append(ms, c)
			}
		}
	}
	sort.SliceStable(ms, func(i, j int) bool { return ms[i].pat.key > ms[j].pat.key })
	out := make([]Credential, 0, len(ms))
	for _, m := range ms {
		out = append(out, Credential{Source: m.source, Auth: m.auth.authConfig()})
	}
	return out
}
