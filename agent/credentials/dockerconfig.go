package credentials

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// DockerConfig is one parsed docker config file: a mounted pull secret of type
// kubernetes.io/dockerconfigjson ({"auths": {...}}) or the legacy
// kubernetes.io/dockercfg (the bare map of registry to entry).
//
// A bad entry does not make the file unusable: it is left out and described in
// Warnings (each an *EntryError naming the file, the key and the field), and
// every good entry is kept. Only problems with the file as a whole (unreadable,
// not a JSON object) are returned as errors by LoadDockerConfig.
//
// DockerConfig holds secrets in unexported fields and prints only its path and
// keys, so it is safe to pass to a logger.
type DockerConfig struct {
	// Path is the file name used in errors and in Credential.Source.
	Path string
	// Warnings lists the entries that were left out and why.
	Warnings []error

	entries []dockerEntry
}

type dockerEntry struct {
	key  string // as written in the file, user info redacted (displayKey)
	pat  pattern
	auth authFields
}

// authFields holds an entry's secrets; each match gets a fresh
// runtimeapi.AuthConfig (a protobuf message, not to be copied or shared).
type authFields struct {
	username, password, identityToken, registryToken string
}

func (a authFields) authConfig() *runtimeapi.AuthConfig {
	return &runtimeapi.AuthConfig{
		Username:      a.username,
		Password:      a.password,
		IdentityToken: a.identityToken,
		RegistryToken: a.registryToken,
	}
}

// EntryError describes a docker config entry that was left out. It never holds
// a secret: only the file, the key (user info redacted), the field and what
// was wrong.
type EntryError struct {
	File    string
	Section string // "auths" for dockerconfigjson, "" for legacy dockercfg
	Key     string // user info redacted
	Field   string // "" when the whole entry is at fault
	Err     error
}

func (e *EntryError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s[%q]", e.File, e.Section, e.Key)
	if e.Field != "" {
		b.WriteString("." + e.Field)
	}
	b.WriteString(": " + e.Err.Error())
	return b.String()
}

func (e *EntryError) Unwrap() error { return e.Err }

// Keys returns the registry keys of the usable entries, sorted, user info
// redacted.
func (c *DockerConfig) Keys() []string {
	keys := make([]string, 0, len(c.entries))
	for _, e := range c.entries {
		keys = append(keys, e.key)
	}
	return keys
}

// String names the file and its usable keys; never a secret.
func (c *DockerConfig) String() string {
	return fmt.Sprintf("docker config %s (keys %q, %d skipped)", c.Path, c.Keys(), len(c.Warnings))
}

// Format keeps every fmt verb on String, so %+v cannot reach the entries.
func (c *DockerConfig) Format(f fmt.State, _ rune) { io.WriteString(f, c.String()) }

// LoadDockerConfig reads and parses the docker config file at path.
func LoadDockerConfig(path string) (*DockerConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read docker config: %w", err)
	}
	return ParseDockerConfig(path, data)
}

// Top-level keys of a docker CLI config.json that sit beside "auths" and hold no
// credentials this agent can use.
var cliConfigKeys = []string{"credsStore", "credHelpers"}

// ParseDockerConfig parses data as a docker config file called name (used in
// errors and sources only).
func ParseDockerConfig(name string, data []byte) (*DockerConfig, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, fmt.Errorf("%s: not a docker config file (want a JSON object): %w", name, redactJSONError(err))
	}
	if top == nil {
		return nil, fmt.Errorf("%s: not a docker config file (want a JSON object, got null)", name)
	}
	cfg := &DockerConfig{Path: name}
	section := ""
	entries := top
	if raw, ok := top["auths"]; ok {
		section = "auths"
		entries = nil
		if err := json.Unmarshal(raw, &entries); err != nil || entries == nil {
			return nil, fmt.Errorf("%s: auths: want a JSON object, got %s", name, jsonKind(raw))
		}
		for _, k := range cliConfigKeys {
			if _, ok := top[k]; ok {
				cfg.Warnings = append(cfg.Warnings, fmt.Errorf("%s: %s: credential helpers are not supported, ignored", name, k))
			}
		}
	} else {
		// A legacy file is the bare map; a docker CLI config with helpers only
		// has no "auths" and must not be read as registries named credsStore.
		for _, k := range cliConfigKeys {
			if _, ok := top[k]; ok {
				cfg.Warnings = append(cfg.Warnings, fmt.Errorf("%s: %s: credential helpers are not supported, ignored", name, k))
				delete(top, k)
			}
		}
	}
	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		e, field, err := parseEntry(k, entries[k])
		if err != nil {
			cfg.Warnings = append(cfg.Warnings, &EntryError{File: name, Section: section, Key: displayKey(k), Field: field, Err: err})
			continue
		}
		cfg.entries = append(cfg.entries, e)
	}
	return cfg, nil
}

// entryFields are the fields read from an entry; others (email, serveraddress)
// are ignored as the kubelet ignores them.
var entryFields = []string{"username", "password", "auth", "identitytoken", "registrytoken"}

func parseEntry(key string, raw json.RawMessage) (dockerEntry, string, error) {
	// A key with user info (https://user:password@host) is kept as the kubelet
	// keeps it, matched without the user info and never shown with it.
	pat, err := parseKey(key)
	if err != nil {
		return dockerEntry{}, "", fmt.Errorf("bad registry key: %w", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil || obj == nil {
		return dockerEntry{}, "", fmt.Errorf("want a JSON object, got %s", jsonKind(raw))
	}
	// Field names are matched without regard to case, as encoding/json does for
	// the kubelet's struct; an exact-case field wins over a differently cased one.
	vals := map[string]string{}
	for _, f := range entryFields {
		v, ok := obj[f]
		if !ok {
			for k, kv := range obj {
				if strings.EqualFold(k, f) {
					v, ok = kv, true
					break
				}
			}
		}
		if !ok {
			continue
		}
		var s *string
		if err := json.Unmarshal(v, &s); err != nil {
			return dockerEntry{}, f, fmt.Errorf("want a string, got %s", jsonKind(v))
		}
		if s != nil {
			vals[f] = *s
		}
	}
	a := authFields{
		username:      vals["username"],
		password:      vals["password"],
		identityToken: vals["identitytoken"],
		registryToken: vals["registrytoken"],
	}
	if enc := strings.TrimSpace(vals["auth"]); enc != "" {
		user, pass, err := decodeAuth(enc)
		if err != nil {
			return dockerEntry{}, "auth", err
		}
		// As in the kubelet, auth overrides username and password.
		a.username, a.password = user, pass
	}
	if a == (authFields{}) {
		return dockerEntry{}, "", errors.New("no credentials (want username/password, auth, identitytoken or registrytoken)")
	}
	return dockerEntry{key: displayKey(key), pat: pat, auth: a}, "", nil
}

// decodeAuth decodes base64("user:password"). Its errors never quote the
// decoded text.
func decodeAuth(enc string) (string, string, error) {
	dec, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		// Some tools write the value without padding.
		var err2 error
		if dec, err2 = base64.RawStdEncoding.DecodeString(enc); err2 != nil {
			return "", "", err
		}
	}
	user, pass, ok := bytes.Cut(dec, []byte(":"))
	if !ok {
		return "", "", errors.New("decoded value is not user:password (no ':')")
	}
	return string(user), string(pass), nil
}

// jsonKind names the kind of a JSON value without quoting it.
func jsonKind(raw json.RawMessage) string {
	s := bytes.TrimSpace(raw)
	if len(s) == 0 {
		return "nothing"
	}
	switch s[0] {
	case '"':
		return "a string"
	case '{':
		return "an object"
	case '[':
		return "an array"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		return "a number"
	}
}

// redactJSONError keeps the position of a syntax error but drops the
// offending character, which may sit inside a secret.
func redactJSONError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at byte offset %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		kind, _, _ := strings.Cut(te.Value, " ")
		return fmt.Errorf("got a JSON %s", kind)
	}
	return errors.New("invalid JSON")
}

// candidates returns every entry, in the file's order, for pick.
func (c *DockerConfig) candidates() []candidate {
	out := make([]candidate, 0, len(c.entries))
	for _, e := range c.entries {
		out = append(out, candidate{pat: e.pat, source: fmt.Sprintf("dockerconfig %s[%q]", c.Path, e.key), auth: e.auth})
	}
	return out
}
