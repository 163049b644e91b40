package credentials

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
)

// Keyring is the agent's Provider: kubelet credential provider plugins first
// (as the reference tool does), then docker config entries, each group in the
// kubelet's order (see match.go); equal keys keep the order of the files as
// given, then of the keys in each file.
//
// One Keyring serves the whole process, so that plugin answers stay cached
// for as long as their cacheDuration says: a keyring built per pass would run
// the plugins again at every pass that pulls. Refresh, called at each pass,
// re-reads the files and re-parses only those whose content changed.
type Keyring struct {
	dockerPaths  []string
	pluginConfig string
	pluginBinDir string
	opts         options

	// refresh serializes Refresh; mu guards what Lookup and the reports read.
	refresh sync.Mutex
	mu      sync.RWMutex
	files   []loadedFile
	plugins loadedPlugins
}

// loadedFile is one docker config file as last read.
type loadedFile struct {
	read bool // sum holds the content's hash
	sum  [sha256.Size]byte
	cfg  *DockerConfig // nil when the file could not be used
	err  error         // a *FileError when cfg is nil
}

// loadedPlugins is the credential provider config as last read. Its provider,
// and so its cache, is kept until the config's content changes.
type loadedPlugins struct {
	sum [sha256.Size]byte
	pp  *PluginProvider
	err error
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
	k := &Keyring{
		dockerPaths:  dockerConfigPaths,
		pluginConfig: pluginConfigPath,
		pluginBinDir: pluginBinDir,
		opts:         buildOptions(opts),
	}
	k.Refresh()
	return k
}

// Refresh re-reads every file and takes in those whose content changed since
// the last read. A mounted Secret is updated by swapping a symlink to a new
// copy of the file, which leaves a path's mtime and size poor witnesses, so
// the content itself is compared: the files are a few kilobytes read once a
// pass, and only a changed file is parsed again. The plugin config is read
// again only when its content changed, or when it did not load last time;
// otherwise its plugins and their cached answers are kept.
func (k *Keyring) Refresh() {
	k.refresh.Lock()
	defer k.refresh.Unlock()
	k.mu.RLock()
	old, oldPlugins := k.files, k.plugins
	k.mu.RUnlock()

	files := make([]loadedFile, len(k.dockerPaths))
	for i, path := range k.dockerPaths {
		data, err := os.ReadFile(path)
		if err != nil {
			files[i] = loadedFile{err: &FileError{File: path, Err: fmt.Errorf("read docker config: %w", err)}}
			continue
		}
		sum := sha256.Sum256(data)
		if i < len(old) && old[i].read && old[i].sum == sum {
			files[i] = old[i]
			continue
		}
		cfg, err := ParseDockerConfig(path, data)
		if err != nil {
			files[i] = loadedFile{read: true, sum: sum, err: &FileError{File: path, Err: err}}
			continue
		}
		files[i] = loadedFile{read: true, sum: sum, cfg: cfg}
	}

	plugins := oldPlugins
	if k.pluginConfig != "" {
		plugins = k.loadPlugins(oldPlugins)
	}

	k.mu.Lock()
	k.files, k.plugins = files, plugins
	k.mu.Unlock()
}

func (k *Keyring) loadPlugins(old loadedPlugins) loadedPlugins {
	data, err := os.ReadFile(k.pluginConfig)
	if err != nil {
		return loadedPlugins{err: &FileError{File: k.pluginConfig, Err: fmt.Errorf("read credential provider config: %w", err)}}
	}
	sum := sha256.Sum256(data)
	if old.pp != nil && old.sum == sum {
		return old
	}
	pp, err := parsePluginConfig(k.pluginConfig, data, k.pluginBinDir, k.opts)
	if err != nil {
		return loadedPlugins{sum: sum, err: &FileError{File: k.pluginConfig, Err: err}}
	}
	return loadedPlugins{sum: sum, pp: pp}
}

// Problems lists the files that could not be used at all (each a
// *FileError) at the last Refresh. None of them holds a secret.
func (k *Keyring) Problems() []error {
	k.mu.RLock()
	defer k.mu.RUnlock()
	var out []error
	for _, f := range k.files {
		if f.err != nil {
			out = append(out, f.err)
		}
	}
	if k.plugins.err != nil {
		out = append(out, k.plugins.err)
	}
	return out
}

// Warnings lists what was skipped inside files that loaded (bad docker config
// entries, each an *EntryError; unsupported plugins or matchImages; ignored
// credential helpers). None of them holds a secret.
func (k *Keyring) Warnings() []error {
	k.mu.RLock()
	defer k.mu.RUnlock()
	var out []error
	for _, f := range k.files {
		if f.cfg != nil {
			out = append(out, f.cfg.Warnings...)
		}
	}
	if k.plugins.pp != nil {
		out = append(out, k.plugins.pp.Warnings()...)
	}
	return out
}

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
	k.mu.RLock()
	files, pp := k.files, k.plugins.pp
	k.mu.RUnlock()
	var creds []Credential
	var errs []error
	if pp != nil {
		pc, err := pp.Lookup(ctx, image)
		creds = append(creds, pc...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	var cands []candidate
	for _, f := range files {
		if f.cfg != nil {
			cands = append(cands, f.cfg.candidates()...)
		}
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
