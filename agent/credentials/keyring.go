package credentials

import (
	"context"
	"errors"
	"strings"
)

// Keyring is the agent's Provider: kubelet credential provider plugins first
// (as the reference tool does), then docker config entries, each group in the
// kubelet's order (see match.go); equal keys keep the order of the files as
// given, then of the keys in each file.
type Keyring struct {
	configs  []*DockerConfig
	plugins  *PluginProvider
	warnings []error
	problems []error
}

var _ Provider = (*Keyring)(nil)

// FileError is a credential file that could not be used at all: missing,
// unreadable, not a docker config, or a credential provider config that does
// not load. Its message names the file and what is wrong, never a secret.
type FileError struct {
	File string
	Err  error
}

func (e *FileError) Error() string {
	msg := e.Err.Error()
	if !strings.Contains(msg, e.File) {
		msg = e.File + ": " + msg
	}
	return msg
}

func (e *FileError) Unwrap() error { return e.Err }

// NewKeyring loads the docker config files (pull secrets) and, when
// pluginConfigPath is set, the kubelet credential provider config whose plugin
// binaries live in pluginBinDir.
//
// No file can stop the keyring from being built: a file that cannot be used
// at all is left out and reported by Problems (as a *FileError), bad entries
// inside a file are left out and reported by Warnings, and everything that
// does load is used. A pull then goes on with the credentials that loaded,
// anonymous where none match, as the kubelet pulls when a pull secret is
// missing: one broken secret must not block images that need no credential.
func NewKeyring(dockerConfigPaths []string, pluginConfigPath, pluginBinDir string, opts ...Option) *Keyring {
	k := &Keyring{}
	for _, path := range dockerConfigPaths {
		c, err := LoadDockerConfig(path)
		if err != nil {
			k.problems = append(k.problems, &FileError{File: path, Err: err})
			continue
		}
		k.configs = append(k.configs, c)
		k.warnings = append(k.warnings, c.Warnings...)
	}
	if pluginConfigPath != "" {
		pp, err := NewPluginProvider(pluginConfigPath, pluginBinDir, opts...)
		if err != nil {
			k.problems = append(k.problems, &FileError{File: pluginConfigPath, Err: err})
		} else {
			k.plugins = pp
			k.warnings = append(k.warnings, pp.Warnings()...)
		}
	}
	return k
}

// Problems lists the files that could not be used at all (each a
// *FileError). None of them holds a secret.
func (k *Keyring) Problems() []error { return k.problems }

// Warnings lists what was skipped inside files that loaded (bad docker config
// entries, each an *EntryError; unsupported plugins; ignored credential
// helpers). None of them holds a secret.
func (k *Keyring) Warnings() []error { return k.warnings }

// Lookup returns the credentials to try for image, in order; none means
// anonymous. Identical credentials found under several keys are returned once,
// at their first place, so a pull does not try the same secret twice. When a
// plugin fails, the credentials found elsewhere are still returned together
// with the error; callers should try them and report the error.
func (k *Keyring) Lookup(ctx context.Context, image string) ([]Credential, error) {
	t, err := parseTarget(image)
	if err != nil {
		return nil, err
	}
	var creds []Credential
	var errs []error
	if k.plugins != nil {
		pc, err := k.plugins.Lookup(ctx, image)
		creds = append(creds, pc...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	var cands []candidate
	for _, c := range k.configs {
		cands = append(cands, c.candidates()...)
	}
	creds = append(creds, pick(cands, t)...)
	return dedupe(creds), errors.Join(errs...)
}

func dedupe(creds []Credential) []Credential {
	type secret struct{ u, p, a, s, i, r string }
	seen := map[secret]bool{}
	out := creds[:0]
	for _, c := range creds {
		a := c.Auth
		key := secret{a.GetUsername(), a.GetPassword(), a.GetAuth(), a.GetServerAddress(), a.GetIdentityToken(), a.GetRegistryToken()}
		if seen[key] {
			continue
		}
		seen[key] = true
		out = append(out, c)
	}
	return out
}
