package credentials

import (
	"strings"
	"testing"
)

// The kubelet's rules each row of TestMatchesLikeTheKubelet checks. "docs"
// quotes the API documentation of CredentialProvider.matchImages
// (k8s.io/kubelet/config/v1) and CredentialProviderResponse.auth
// (k8s.io/kubelet/pkg/apis/credentialprovider/v1), which state the same rules;
// "keyring" is behaviour of the kubelet's keyring
// (pkg/credentialprovider/keyring.go) the docs do not spell out.
const (
	ruleLabels   = `docs: "Both contain the same number of domain parts and each part matches"`
	ruleGlob     = `docs: "Each glob can only match a single subdomain segment, so *.io does not match *.k8s.io"`
	ruleTLD      = `docs: globs are supported "as subdomains like '*.k8s.io' or 'k8s.*.io', and top-level-domains such as 'k8s.*'"`
	rulePartial  = `docs: "Matching partial subdomains like 'app*.k8s.io' is also supported"`
	ruleCase     = `keyring: each label is a filepath.Match of the label as written: case counts`
	rulePort     = `docs: "If the imageMatch contains a port, then the port must match in the image as well"`
	ruleNoPort   = `keyring: ports are compared for equality, so a key without a port does not match an image with one`
	rulePath     = `docs: "The URL path of an imageMatch must be a prefix of the target image URL path"`
	ruleRepo     = `keyring: the image is looked up by its repository name, without tag or digest`
	ruleScheme   = `keyring: a docker config key gets https:// unless it starts with http:// or https://, and the scheme is dropped`
	ruleV1V2     = `keyring: "It also considers /v2/ and /v1/ equivalent to the hostname" (a path starting /v1/ or /v2/ loses that prefix)`
	ruleUserInfo = `keyring: a key is parsed as a URL whose host does not include user info`
	ruleMatchRaw = `keyring: matchImages entries are read as written, https:// put in front, so one with a scheme matches nothing`
	ruleHubKey   = `keyring: images are normalized, so Docker Hub images are docker.io/...; a key docker.io matches them`
	ruleHubAlias = `keyring: no Docker Hub aliases: registry-1.docker.io and index.docker.io/path are keys like any other`
	ruleHubFall  = `keyring: when no key matches a Docker Hub image, entries under exactly index.docker.io are used`
	ruleHubLocal = `keyring: for that fallback, a host with neither '.' nor ':' (localhost) counts as Docker Hub`
	ruleHubMatch = `keyring: the Docker Hub fallback is the keyring's, not matchImages'`
)

// TestMatchesLikeTheKubelet is the differential test of matching: each row's
// want is what the kubelet does, by the rule cited. "docker" rows are docker
// config keys (and plugin response keys, read the same way), "match" rows
// matchImages entries. Rows marked changed matched the other way before the
// matching was made the kubelet's.
func TestMatchesLikeTheKubelet(t *testing.T) {
	t.Parallel()
	const docker, match = "docker", "match"
	tests := []struct {
		kind, key, image string
		want             bool
		rule             string
		changed          bool
	}{
		{match, "*.example.com", "a.example.com/x:1", true, ruleLabels, false},
		{match, "*.example.com", "example.com/x:1", false, ruleLabels, false},
		{match, "*.example.com", "a.b.example.com/x:1", false, ruleGlob, false},
		{match, "*.io", "a.k8s.io/x:1", false, ruleGlob, false},
		{match, "*.*.registry.io", "a.b.registry.io/x:1", true, ruleLabels, false},
		{match, "k8s.*.io", "k8s.registry.io/x:1", true, ruleTLD, false},
		{match, "k8s.*", "k8s.io/x:1", true, ruleTLD, false},
		{match, "app*.k8s.io", "app1.k8s.io/x:1", true, rulePartial, false},
		{match, "app*.k8s.io", "web.k8s.io/x:1", false, rulePartial, false},
		{match, "*", "localhost/x:1", true, ruleLabels, false},
		{docker, "QUAY.IO", "quay.io/x/y:1", false, ruleCase, true},
		{docker, "quay.io", "QUAY.IO/x/y:1", false, ruleCase, true},

		{match, "registry.io:8080/path", "registry.io:8080/path/x:1", true, rulePort, false},
		{match, "registry.io:8080", "registry.io/x:1", false, rulePort, false},
		{match, "registry.io:8080", "registry.io:8081/x:1", false, rulePort, false},
		{match, "registry.io", "registry.io:8080/x:1", false, ruleNoPort, false},
		{docker, "127.0.0.1", "127.0.0.1:5001/private/rand:img-0", false, ruleNoPort, false},
		{docker, "127.0.0.1:5001", "127.0.0.1:5001/private/rand:img-0", true, rulePort, false},

		{match, "quay.io/a", "quay.io/a/b:1", true, rulePath, false},
		{match, "quay.io/a", "quay.io/a:1", true, rulePath, false},
		{match, "quay.io/a", "quay.io/ab:1", true, rulePath, true},
		{docker, "quay.io/a", "quay.io/abc/d:1", true, rulePath, true},
		{docker, "quay.io/a/", "quay.io/a:1", false, rulePath, true},
		{docker, "quay.io/a/", "quay.io/a/b:1", true, rulePath, false},
		{match, "quay.io/a/b", "quay.io/a:1", false, rulePath, false},
		{match, "quay.io/b", "quay.io/a/b:1", false, rulePath, false},
		{docker, "quay.io/a/b", "quay.io/a/b@sha256:" + strings.Repeat("a", 64), true, ruleRepo, false},
		{docker, "quay.io/a/b:1", "quay.io/a/b:1", false, ruleRepo, false},

		{docker, "https://quay.io", "quay.io/x:1", true, ruleScheme, false},
		{docker, "http://quay.io/", "quay.io/x:1", true, ruleScheme, false},
		{docker, "https://quay.io/v2/", "quay.io/x:1", true, ruleV1V2, true},
		{docker, "https://quay.io/v1/team", "quay.io/team/x:1", true, ruleV1V2, true},
		{docker, "https://quay.io/v1", "quay.io/x:1", false, ruleV1V2, false},
		{docker, "https://robot:pw@quay.io", "quay.io/x:1", true, ruleUserInfo, true},
		{docker, "robot:pw@quay.io/team", "quay.io/team/x:1", true, ruleUserInfo, true},
		{match, "https://quay.io", "quay.io/x:1", false, ruleMatchRaw, true},

		{docker, "docker.io", "busybox", true, ruleHubKey, false},
		{docker, "docker.io/library", "docker.io/library/busybox:1", true, ruleHubKey, false},
		{docker, "docker.io/someone", "busybox", false, rulePath, false},
		{docker, "registry-1.docker.io", "busybox", false, ruleHubAlias, true},
		{docker, "index.docker.io/library", "busybox", false, ruleHubAlias, true},
		{docker, "registry-1.docker.io", "registry-1.docker.io/library/busybox:1", true, ruleLabels, false},
		{docker, "docker.io", "registry-1.docker.io/library/busybox:1", false, ruleHubAlias, true},
		{docker, "https://index.docker.io/v1/", "busybox", true, ruleHubFall, false},
		{docker, "index.docker.io", "index.docker.io/someone/app:1", true, ruleHubFall, false},
		{docker, "https://index.docker.io/v1/", "localhost/x:1", true, ruleHubLocal, true},
		{docker, "https://index.docker.io/v1/", "quay.io/x:1", false, ruleHubFall, false},
		{docker, "index.docker.io:443", "busybox", false, ruleHubFall, false},
		{match, "index.docker.io", "busybox", false, ruleHubMatch, false},
	}
	for _, tc := range tests {
		tg, err := parseTarget(tc.image)
		if err != nil {
			t.Errorf("parseTarget(%q): %v", tc.image, err)
			continue
		}
		var got bool
		if tc.kind == docker {
			p, err := parseKey(tc.key)
			if err != nil {
				t.Errorf("parseKey(%q): %v", tc.key, err)
				continue
			}
			got = len(pick([]candidate{{pat: p}}, tg)) == 1
		} else {
			p, err := parseMatchImage(tc.key)
			if err != nil {
				t.Errorf("parseMatchImage(%q): %v", tc.key, err)
				continue
			}
			got = p.matches(tg)
		}
		if got != tc.want {
			t.Errorf("%s key %q, image %q: matches = %v, want %v (%s)", tc.kind, tc.key, tc.image, got, tc.want, tc.rule)
		}
	}
}

// The fallback to index.docker.io is only for Docker Hub images no key
// matches (keyring: Lookup returns the matches when there are any).
func TestDockerHubFallbackOnlyWithoutAMatch(t *testing.T) {
	t.Parallel()
	var cands []candidate
	for _, k := range []string{"https://index.docker.io/v1/", "docker.io/library"} {
		p, err := parseKey(k)
		if err != nil {
			t.Fatal(err)
		}
		cands = append(cands, candidate{pat: p, source: k})
	}
	for image, want := range map[string]string{
		"busybox":         "docker.io/library",
		"someone/app:1":   "https://index.docker.io/v1/",
		"quay.io/x/app:1": "",
	} {
		tg, err := parseTarget(image)
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(sources(pick(cands, tg)), ",")
		if got != want {
			t.Errorf("%s: %q, want %q", image, got, want)
		}
	}
}

// TestOrderLikeTheKubelet: docs: "the kubelet will traverse all keys in
// reverse order so that: longer keys come before shorter keys with the same
// prefix; non-wildcard keys come before wildcard keys with the same prefix".
// The order is the keys' reverse byte order, across hosts too: a.example.com
// comes before *.example.com/x/y/z, which the longest-first order this agent
// used before put first.
func TestOrderLikeTheKubelet(t *testing.T) {
	t.Parallel()
	keys := []string{"*.example.com", "*.example.com/x/y/z", "a.example.com", "https://a.example.com/x", "a.example.com/x/y"}
	var cands []candidate
	for _, k := range keys {
		p, err := parseKey(k)
		if err != nil {
			t.Fatal(err)
		}
		cands = append(cands, candidate{pat: p, source: k})
	}
	tg, err := parseTarget("a.example.com/x/y/z/w:1")
	if err != nil {
		t.Fatal(err)
	}
	got := sources(pick(cands, tg))
	want := []string{"a.example.com/x/y", "https://a.example.com/x", "a.example.com", "*.example.com/x/y/z", "*.example.com"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("order = %q\nwant    %q", got, want)
	}
}

func TestParseKeyErrors(t *testing.T) {
	t.Parallel()
	tests := []struct{ key, want string }{
		{"", "empty host"},
		{"https://", "empty host"},
		{"/path", "empty host"},
		{"a..b", `empty label in host "a..b"`},
		{"a.", `empty label in host "a."`},
		{"*[.io", `not a registry URL: invalid IP-literal`},
		{"host:port", `not a registry URL: invalid port ":port" after host`},
		{"a.io:*", `not a registry URL: invalid port ":*" after host`},
		{"a b.io", `not a registry URL: invalid character " " in host name`},
		{"a\tb.io", `not a registry URL: net/url: invalid control character in URL`},
	}
	for _, tc := range tests {
		_, err := parseKey(tc.key)
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("parseKey(%q): error %v, want prefix %q", tc.key, err, tc.want)
		}
	}
	// "reg.io:" has an empty port, which means no port.
	p, err := parseKey("reg.io:")
	if err != nil || p.port != "" || strings.Join(p.labels, ".") != "reg.io" {
		t.Errorf("parseKey(reg.io:) = %+v, %v", p, err)
	}
}

func TestDisplayKey(t *testing.T) {
	t.Parallel()
	for key, want := range map[string]string{
		"quay.io/x":                      "quay.io/x",
		"https://robot:pw@quay.io/x":     "https://<redacted>@quay.io/x",
		"robot:pw@quay.io":               "<redacted>@quay.io",
		"https://robot:p/w@x@quay.io":    "https://<redacted>@quay.io",
		"https://robot:a://b@quay.io":    "https://<redacted>@quay.io",
		"x://robot:pw@quay.io:5000/v1/a": "x://<redacted>@quay.io:5000/v1/a",
	} {
		if got := displayKey(key); got != want {
			t.Errorf("displayKey(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestParseTargetErrors(t *testing.T) {
	t.Parallel()
	for _, img := range []string{"", "upper/CASE", "a b", "quay.io/x:bad tag"} {
		if _, err := parseTarget(img); err == nil {
			t.Errorf("parseTarget(%q): no error", img)
		}
	}
}
