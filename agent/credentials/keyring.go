package credentials

import (
	"context"
	"errors"
)

// Keyring is the agent's Provider: kubelet credential provider plugins first
// (as the reference tool does), then docker config entries, most specific
// first across all files (equally specific entries keep the order of the files
// as given, then of the keys in each file).
type Keyring struct {
	configs  []*DockerConfig
	plugins  *PluginProvider
	warnings []error
}

var _ Provider = (*Keyring)(nil)

// NewKeyring loads the docker config files (pull secrets) and, when
// pluginConfigPath is set, the kubelet credential provider config whose plugin
// binaries live in pluginBinDir. A file that cannot be read or parsed at all is
// an error; bad entries inside a file are skipped and reported by Warnings.
func NewKeyring(dockerConfigPaths []string, pluginConfigPath, pluginBinDir string, opts ...Option) (*Keyring, error) {
	k := &Keyring{}
	for _, path := range dockerConfigPaths {
		c, err := LoadDockerConfig(path)
		if err != nil {
			return nil, err
		}
		k.configs = append(k.configs, c)
		k.warnings = append(k.warnings, c.Warnings...)
	}
	if pluginConfigPath != "" {
		pp, err := NewPluginProvider(pluginConfigPath, pluginBinDir, opts...)
		if err != nil {
			return nil, err
		}
		k.plugins = pp
		k.warnings = append(k.warnings, pp.Warnings()...)
	}
	return k, nil
}

// Warnings lists what was skipped while loading (bad docker config entries,
// unsupported plugins). None of them holds a secret.
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
	var ms []matched
	for _, c := range k.configs {
		ms = append(ms, c.match(t)...)
	}
	creds = append(creds, sortMatched(ms)...)
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
