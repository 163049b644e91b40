package credentials

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// messageText holds the fixed words of this package's docker config errors; a
// "secret" that is part of them is not a leak.
const messageText = `not a docker config file (want a JSON object, got null): invalid JSON at byte offset
auths: want a JSON object, got an array a string a number a boolean nothing an object credsStore credHelpers
credential helpers are not supported, ignored bad registry key: empty host bad glob in host bad port empty label in
host syntax error in pattern not a registry URL: invalid port after host invalid character in host name
net/url: invalid control character in URL invalid URL escape invalid userinfo <redacted>
decoded value is not user:password (no ':') no credentials (want username/password, auth, identitytoken or registrytoken)
illegal base64 data at input byte username password identitytoken registrytoken`

// fuzzSecrets collects, from a document parsed loosely, every value that is
// or decodes to a secret, the user info of every key (https://user:pw@host),
// and every key the errors may quote, its user info redacted.
func fuzzSecrets(data []byte) (secrets, keys []string) {
	var top map[string]json.RawMessage
	if json.Unmarshal(data, &top) != nil {
		return nil, nil
	}
	sections := []map[string]json.RawMessage{top}
	var auths map[string]json.RawMessage
	if json.Unmarshal(top["auths"], &auths) == nil {
		sections = append(sections, auths)
	}
	for _, sec := range sections {
		for k, raw := range sec {
			keys = append(keys, displayKey(k))
			if at := strings.LastIndexByte(k, '@'); at >= 0 {
				info := k[:at]
				if i := strings.Index(info, "://"); i >= 0 {
					info = info[i+len("://"):]
				}
				_, pass, _ := strings.Cut(info, ":")
				secrets = append(secrets, info, pass)
			}
			var entry map[string]json.RawMessage
			if json.Unmarshal(raw, &entry) != nil {
				continue
			}
			for f, v := range entry {
				keys = append(keys, f)
				var s string
				if json.Unmarshal(v, &s) != nil {
					continue
				}
				secrets = append(secrets, s)
				for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding} {
					if dec, err := enc.DecodeString(strings.TrimSpace(s)); err == nil {
						_, pass, _ := strings.Cut(string(dec), ":")
						secrets = append(secrets, string(dec), pass)
					}
				}
			}
		}
	}
	return secrets, keys
}

func FuzzLoadDockerConfig(f *testing.F) {
	for _, seed := range []string{
		`{"auths":{"127.0.0.1:5001":{"username":"user","password":"Correct-Horse-Battery"}}}`,
		`{"auths":{"quay.io":{"auth":"` + b64("robot:Correct-Horse-Battery") + `"}}}`,
		`{"auths":{"quay.io":{"auth":"` + b64("no-colon-Correct-Horse-Battery") + `"}}}`,
		`{"auths":{"quay.io":{"auth":"!!!"},"*.example.com":{"identitytoken":"Correct-Horse-Battery"}}}`,
		`{"https://index.docker.io/v1/":{"auth":"` + b64("u:Correct-Horse-Battery") + `","email":"a@b"}}`,
		`{"auths":{"a.io":{"password":12345678901234}}, "credHelpers":{"b.io":"x"}}`,
		`{"auths":{"a.io":{"registrytoken":"Correct-Horse-Battery"}},"auths":[]}`,
		`{"a.io:port/x":{"password":"Correct-Horse-Battery"}}`,
		`{"auths":{"https://robot:Correct-Horse-Battery@quay.io":{"auth":"` + b64("u:p") + `"}}}`,
		`{"auths":{"https://robot:Correct/Horse-Battery@quay.io":{"auth":"` + b64("u:p") + `"}}}`,
		`{"auths":{"robot:Correct-Horse:Battery@quay.io:x/y":{"auth":"` + b64("u:p") + `"}}}`,
		`{"auths":{"a.io":{"password":"Correct-Horse-Battery"`,
		`[]`, `null`, ``,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		const name = "pull-secret/.dockerconfigjson"
		cfg, err := ParseDockerConfig(name, data)
		var texts []string
		if err != nil {
			if cfg != nil {
				t.Fatalf("error %v with a config", err)
			}
			if !strings.HasPrefix(err.Error(), name+": ") {
				t.Errorf("error %q does not name the file", err)
			}
			texts = append(texts, err.Error())
		} else {
			for _, w := range cfg.Warnings {
				if !strings.HasPrefix(w.Error(), name+": ") {
					t.Errorf("warning %q does not name the file", w)
				}
				texts = append(texts, w.Error())
			}
			texts = append(texts, fmt.Sprintf("%+v", cfg))
			for _, e := range cfg.entries {
				if len(e.pat.labels) == 0 || e.pat.labels[0] == "" {
					t.Errorf("kept entry %q with a bad key", e.key)
				}
				if e.auth == (authFields{}) {
					t.Errorf("kept entry %q without credentials", e.key)
				}
			}
		}
		secrets, keys := fuzzSecrets(data)
		quoted := name + "\n" + messageText + "\n" + strings.Join(keys, "\n")
		for _, s := range secrets {
			// Short values and values that are also keys or message words
			// cannot be told apart from legitimate error text.
			if len(s) < 8 || strings.Contains(quoted, s) || strings.Contains(fmt.Sprintf("%q", keys), s) {
				continue
			}
			for _, text := range texts {
				if strings.Contains(text, s) {
					t.Errorf("%q leaks secret %q", text, s)
				}
			}
		}
	})
}
