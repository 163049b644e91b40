package credentials

import (
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

type wantEntry struct{ key, user, pass, identity, registry string }

func checkEntries(t *testing.T, c *DockerConfig, want []wantEntry) {
	t.Helper()
	if len(c.entries) != len(want) {
		t.Fatalf("%s: %d entries (%q), want %d", c.Path, len(c.entries), c.Keys(), len(want))
	}
	for i, w := range want {
		e := c.entries[i]
		got := wantEntry{e.key, e.auth.username, e.auth.password, e.auth.identityToken, e.auth.registryToken}
		if got != w {
			t.Errorf("entry %d = %+v, want %+v", i, got, w)
		}
	}
}

func TestParseDockerConfigFormats(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		data string
		want []wantEntry
	}{
		{
			name: "dockerconfigjson username/password",
			data: `{"auths":{"127.0.0.1:5001":{"username":"u","password":"p","email":"e@x"}}}`,
			want: []wantEntry{{key: "127.0.0.1:5001", user: "u", pass: "p"}},
		},
		{
			name: "dockerconfigjson auth only",
			data: `{"auths":{"quay.io":{"auth":"` + b64("robot:s3cr:et") + `"}}}`,
			want: []wantEntry{{key: "quay.io", user: "robot", pass: "s3cr:et"}},
		},
		{
			name: "auth overrides username and password",
			data: `{"auths":{"quay.io":{"username":"a","password":"b","auth":"` + b64("c:d") + `"}}}`,
			want: []wantEntry{{key: "quay.io", user: "c", pass: "d"}},
		},
		{
			name: "auth without padding",
			data: `{"auths":{"quay.io":{"auth":"` + strings.TrimRight(b64("ab:c"), "=") + `"}}}`,
			want: []wantEntry{{key: "quay.io", user: "ab", pass: "c"}},
		},
		{
			name: "identity and registry tokens",
			data: `{"auths":{"a.io":{"identitytoken":"idt"},"b.io":{"registrytoken":"rt"}}}`,
			want: []wantEntry{{key: "a.io", identity: "idt"}, {key: "b.io", registry: "rt"}},
		},
		{
			name: "field names in any case, null values",
			data: `{"auths":{"a.io":{"Username":"u","Password":"p","auth":null}}}`,
			want: []wantEntry{{key: "a.io", user: "u", pass: "p"}},
		},
		{
			name: "legacy dockercfg",
			data: `{"https://index.docker.io/v1/":{"auth":"` + b64("hub:pw") + `","email":"x@y"},"quay.io":{"username":"q","password":"w"}}`,
			want: []wantEntry{{key: "https://index.docker.io/v1/", user: "hub", pass: "pw"}, {key: "quay.io", user: "q", pass: "w"}},
		},
		{
			name: "empty auths",
			data: `{"auths":{}}`,
		},
		{
			name: "docker CLI config with helpers",
			data: `{"auths":{"a.io":{"auth":"` + b64("u:p") + `"}},"credsStore":"desktop"}`,
			want: []wantEntry{{key: "a.io", user: "u", pass: "p"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseDockerConfig("f", []byte(tc.data))
			if err != nil {
				t.Fatal(err)
			}
			checkEntries(t, c, tc.want)
		})
	}
}

func TestParseDockerConfigBadEntriesKeepGoodOnes(t *testing.T) {
	t.Parallel()
	const secret = "TopSecretPassw0rd"
	data := `{"auths":{
		"good.io": {"username":"u","password":"` + secret + `"},
		"quay.io": {"auth":"!!notbase64"},
		"nocolon.io": {"auth":"` + b64(secret) + `"},
		"num.io": {"username":"u","password":12345},
		"arr.io": ["` + secret + `"],
		"str.io": "` + secret + `",
		"empty.io": {"email":"a@b"},
		"badkey:port": {"username":"u","password":"` + secret + `"},
		"*[.io": {"username":"u","password":"` + secret + `"}
	}}`
	c, err := ParseDockerConfig("pull-secret/.dockerconfigjson", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, c, []wantEntry{{key: "good.io", user: "u", pass: secret}})
	want := []string{
		`pull-secret/.dockerconfigjson: auths["*[.io"]: bad registry key: not a registry URL: invalid IP-literal`,
		`pull-secret/.dockerconfigjson: auths["arr.io"]: want a JSON object, got an array`,
		`pull-secret/.dockerconfigjson: auths["badkey:port"]: bad registry key: not a registry URL: invalid port ":port" after host`,
		`pull-secret/.dockerconfigjson: auths["empty.io"]: no credentials`,
		`pull-secret/.dockerconfigjson: auths["nocolon.io"].auth: decoded value is not user:password`,
		`pull-secret/.dockerconfigjson: auths["num.io"].password: want a string, got a number`,
		`pull-secret/.dockerconfigjson: auths["quay.io"].auth: illegal base64 data at input byte 0`,
		`pull-secret/.dockerconfigjson: auths["str.io"]: want a JSON object, got a string`,
	}
	if len(c.Warnings) != len(want) {
		t.Fatalf("warnings = %q, want %d", c.Warnings, len(want))
	}
	for i, w := range c.Warnings {
		var ee *EntryError
		if !errors.As(w, &ee) {
			t.Errorf("warning %d is %T, want *EntryError", i, w)
		}
		if !strings.HasPrefix(w.Error(), want[i]) {
			t.Errorf("warning %d = %q, want prefix %q", i, w, want[i])
		}
		if strings.Contains(w.Error(), secret) {
			t.Errorf("warning %d holds the secret: %q", i, w)
		}
	}
}

func TestParseDockerConfigLegacyBadEntry(t *testing.T) {
	t.Parallel()
	c, err := ParseDockerConfig("s/.dockercfg", []byte(`{"a.io":{"auth":"%%%"},"b.io":{"auth":"`+b64("u:p")+`"}}`))
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, c, []wantEntry{{key: "b.io", user: "u", pass: "p"}})
	if len(c.Warnings) != 1 || !strings.HasPrefix(c.Warnings[0].Error(), `s/.dockercfg: ["a.io"].auth: illegal base64`) {
		t.Errorf("warnings = %q", c.Warnings)
	}
}

func TestParseDockerConfigFileErrors(t *testing.T) {
	t.Parallel()
	tests := []struct{ data, want string }{
		{`{"auths":{"a.io":{"password":"Sup3rSecretValue"`, `f: not a docker config file (want a JSON object): invalid JSON at byte offset`},
		{`not json`, `f: not a docker config file (want a JSON object): invalid JSON at byte offset 2`},
		{`["a"]`, `f: not a docker config file (want a JSON object): got a JSON array`},
		{`null`, `f: not a docker config file (want a JSON object, got null)`},
		{``, `f: not a docker config file`},
		{`{"auths":"Sup3rSecretValue"}`, `f: auths: want a JSON object, got a string`},
		{`{"auths":null}`, `f: auths: want a JSON object, got null`},
	}
	for _, tc := range tests {
		_, err := ParseDockerConfig("f", []byte(tc.data))
		if err == nil {
			t.Errorf("%q: no error", tc.data)
			continue
		}
		if !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("%q: error %q, want prefix %q", tc.data, err, tc.want)
		}
		if strings.Contains(err.Error(), "Sup3rSecretValue") {
			t.Errorf("%q: error holds the secret: %q", tc.data, err)
		}
	}
}

func TestLoadDockerConfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := writeFile(t, dir, "a/.dockerconfigjson", `{"auths":{"a.io":{"username":"u","password":"p"}}}`)
	c, err := LoadDockerConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.Path != p || len(c.Keys()) != 1 {
		t.Errorf("config = %v", c)
	}
	missing := filepath.Join(dir, "missing")
	if _, err := LoadDockerConfig(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: error %v does not name %s", err, missing)
	}
	bad := writeFile(t, dir, "b/.dockerconfigjson", `{`)
	if _, err := LoadDockerConfig(bad); err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("bad file: error %v does not name %s", err, bad)
	}
}
