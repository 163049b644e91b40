package credentials

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubeletconfig "k8s.io/kubelet/config/v1"
	cpv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
	"k8s.io/utils/clock"
	"sigs.k8s.io/yaml"

	"github.com/nodeprefetch/image-prefetcher/agent/reaper"
)

// Kubelet credential provider plugins, run with the kubelet's exec protocol: a
// CredentialProviderRequest as JSON on stdin, a CredentialProviderResponse as
// JSON on stdout. As in the kubelet, a plugin is asked about the image's
// repository name (no tag or digest), its answer is cached under that name,
// the image's registry or globally as the response's cacheKeyType says, for
// its cacheDuration (the provider's defaultCacheDuration when it gives none; 0
// means not cached), and the auth keys of the answers of all plugins are
// matched against the image together, like docker config keys.

const (
	configGroup   = "kubelet.config.k8s.io"
	configKind    = "CredentialProviderConfig"
	requestKind   = "CredentialProviderRequest"
	responseKind  = "CredentialProviderResponse"
	pluginGroup   = "credentialprovider.kubelet.k8s.io"
	globalKey     = "global"
	maxStderrEcho = 512

	// DefaultPluginTimeout bounds one plugin run; the kubelet uses a minute.
	DefaultPluginTimeout = time.Minute
)

// acceptedConfigVersions are the CredentialProviderConfig versions read; their
// shape is the same for the fields used here.
var acceptedConfigVersions = map[string]bool{
	configGroup + "/v1":      true,
	configGroup + "/v1beta1": true,
}

// acceptedPluginVersions are the exec protocol versions spoken; the request
// and response have the same shape in both.
var acceptedPluginVersions = map[string]bool{
	pluginGroup + "/v1":      true,
	pluginGroup + "/v1beta1": true,
}

// Option tunes a Keyring or PluginProvider.
type Option func(*options)

type options struct {
	clock   clock.PassiveClock
	timeout time.Duration
}

func buildOptions(opts []Option) options {
	o := options{clock: clock.RealClock{}, timeout: DefaultPluginTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithClock replaces the real clock for plugin cache expiry (tests).
func WithClock(c clock.PassiveClock) Option { return func(o *options) { o.clock = c } }

// WithPluginTimeout bounds each plugin run (default DefaultPluginTimeout).
func WithPluginTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// PluginProvider runs the kubelet credential provider plugins of one
// CredentialProviderConfig file and caches their answers.
type PluginProvider struct {
	configPath string
	plugins    []*plugin
	warnings   []error
}

type plugin struct {
	cfg        kubeletconfig.CredentialProvider
	configPath string
	bin        string
	matchers   []pattern
	defaultTTL time.Duration
	opts       options

	flight singleflight.Group
	mu     sync.Mutex
	cache  map[string]cacheEntry
}

type cacheEntry struct {
	resp    *cpv1.CredentialProviderResponse
	expires time.Time
}

// NewPluginProvider reads the CredentialProviderConfig at configPath (YAML or
// JSON, apiVersion kubelet.config.k8s.io/v1 or v1beta1, decoded strictly as the
// kubelet does) and finds each plugin's binary in binDir.
func NewPluginProvider(configPath, binDir string, opts ...Option) (*PluginProvider, error) {
	data, err := os.ReadFile(configPath)
	if err != nil {
		return nil, fmt.Errorf("read credential provider config: %w", err)
	}
	return parsePluginConfig(configPath, data, binDir, buildOptions(opts))
}

// parsePluginConfig is NewPluginProvider on the config's content.
func parsePluginConfig(configPath string, data []byte, binDir string, o options) (*PluginProvider, error) {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(data, &meta); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", configPath, err)
	}
	if !acceptedConfigVersions[meta.APIVersion] || meta.Kind != configKind {
		return nil, fmt.Errorf("credential provider config %s: want kind %s of apiVersion %s/v1 or %s/v1beta1, got kind %q apiVersion %q",
			configPath, configKind, configGroup, configGroup, meta.Kind, meta.APIVersion)
	}
	var cfg kubeletconfig.CredentialProviderConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", configPath, err)
	}
	if len(cfg.Providers) == 0 {
		return nil, fmt.Errorf("credential provider config %s: no providers", configPath)
	}
	pp := &PluginProvider{configPath: configPath}
	seen := map[string]bool{}
	for i, c := range cfg.Providers {
		where := fmt.Sprintf("credential provider config %s: providers[%d]", configPath, i)
		if c.Name != "" {
			where += fmt.Sprintf(" (%s)", c.Name)
		}
		if c.Name == "" || c.Name == "." || c.Name == ".." || strings.ContainsAny(c.Name, `/\`) {
			return nil, fmt.Errorf("%s: name must be a plain file name in the bin dir", where)
		}
		if seen[c.Name] {
			return nil, fmt.Errorf("%s: duplicate name", where)
		}
		seen[c.Name] = true
		if !acceptedPluginVersions[c.APIVersion] {
			return nil, fmt.Errorf("%s: apiVersion %q not supported (want %s/v1 or %s/v1beta1)", where, c.APIVersion, pluginGroup, pluginGroup)
		}
		if len(c.MatchImages) == 0 {
			return nil, fmt.Errorf("%s: matchImages is empty", where)
		}
		p := &plugin{cfg: c, configPath: configPath, opts: o, cache: map[string]cacheEntry{}}
		for _, m := range c.MatchImages {
			// The kubelet refuses the config only for an entry that is not a
			// URL; one that can match no image is kept and dead there, and
			// left out with a warning here.
			if _, err := url.Parse("https://" + m); err != nil {
				return nil, fmt.Errorf("%s: matchImages %q: %w", where, displayKey(m), urlError(m, err))
			}
			if strings.Contains(m, "://") {
				pp.warnings = append(pp.warnings, fmt.Errorf("%s: matchImages %q: ignored: the kubelet reads it without a scheme, so it matches no image", where, displayKey(m)))
				continue
			}
			pat, err := parseMatchImage(m)
			if err != nil {
				pp.warnings = append(pp.warnings, fmt.Errorf("%s: matchImages %q: ignored: it matches no image: %w", where, displayKey(m), err))
				continue
			}
			p.matchers = append(p.matchers, pat)
		}
		if c.DefaultCacheDuration != nil {
			if c.DefaultCacheDuration.Duration < 0 {
				return nil, fmt.Errorf("%s: defaultCacheDuration must not be negative", where)
			}
			p.defaultTTL = c.DefaultCacheDuration.Duration
		}
		if c.TokenAttributes != nil {
			// Service account tokens belong to the pod being started; a
			// prefetcher has no such pod, so such a plugin cannot be run.
			pp.warnings = append(pp.warnings, fmt.Errorf("%s: skipped: tokenAttributes (service account tokens) are not supported", where))
			continue
		}
		p.bin = filepath.Join(binDir, c.Name)
		st, err := os.Stat(p.bin)
		if err != nil {
			return nil, fmt.Errorf("%s: plugin binary: %w", where, err)
		}
		if st.IsDir() {
			return nil, fmt.Errorf("%s: plugin binary %s is a directory", where, p.bin)
		}
		pp.plugins = append(pp.plugins, p)
	}
	return pp, nil
}

// Warnings lists providers that were skipped and why.
func (pp *PluginProvider) Warnings() []error { return pp.warnings }

// Lookup runs (or answers from cache) every plugin whose matchImages match
// image, in config order, and returns the credentials of their responses'
// auth entries that apply to image, ordered as the kubelet orders them.
// Credentials found are returned even when another plugin failed; err then
// describes the failures.
func (pp *PluginProvider) Lookup(ctx context.Context, image string) ([]Credential, error) {
	t, err := parseTarget(image)
	if err != nil {
		return nil, err
	}
	var cands []candidate
	var errs []error
	for _, p := range pp.plugins {
		if !p.wants(t) {
			continue
		}
		resp, err := p.response(ctx, t)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// Map order is random; sort by key so that equal keys keep an order.
		keys := make([]string, 0, len(resp.Auth))
		for key := range resp.Auth {
			keys = append(keys, key)
		}
		sort.Strings(keys)
		for _, key := range keys {
			pat, err := parseKey(key)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: response auth key %q: %w", p.describe(), displayKey(key), err))
				continue
			}
			a := resp.Auth[key]
			cands = append(cands, candidate{
				pat:    pat,
				source: fmt.Sprintf("plugin %s[%q]", p.cfg.Name, displayKey(key)),
				auth:   authFields{username: a.Username, password: a.Password},
			})
		}
	}
	return pick(cands, t), errors.Join(errs...)
}

func (p *plugin) describe() string {
	return fmt.Sprintf("credential provider plugin %s (config %s)", p.cfg.Name, p.configPath)
}

func (p *plugin) wants(t target) bool {
	for _, m := range p.matchers {
		if m.matches(t) {
			return true
		}
	}
	return false
}

// response returns a response cached for t's repository, its registry or
// globally, or runs the plugin once per repository however many callers ask
// at the same time.
func (p *plugin) response(ctx context.Context, t target) (*cpv1.CredentialProviderResponse, error) {
	if r := p.cached(t); r != nil {
		return r, nil
	}
	ch := p.flight.DoChan(t.repo, func() (any, error) {
		if r := p.cached(t); r != nil {
			return r, nil
		}
		// The run is shared by every waiting caller, so one caller giving up
		// must not kill it; the plugin timeout still bounds it.
		r, err := p.run(context.WithoutCancel(ctx), t.repo)
		if err != nil {
			return nil, err
		}
		p.store(t, r)
		return r, nil
	})
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: %w", p.describe(), ctx.Err())
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*cpv1.CredentialProviderResponse), nil
	}
}

// cached looks for an answer under t's repository, then its registry, then
// globally. An entry serves until its expiry has passed (still at the very
// instant), as in the kubelet.
func (p *plugin) cached(t target) *cpv1.CredentialProviderResponse {
	now := p.opts.clock.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, k := range []string{"image:" + t.repo, "registry:" + t.host, globalKey} {
		if e, ok := p.cache[k]; ok {
			if !now.After(e.expires) {
				return e.resp
			}
			delete(p.cache, k)
		}
	}
	return nil
}

func (p *plugin) store(t target, r *cpv1.CredentialProviderResponse) {
	ttl := p.defaultTTL
	if r.CacheDuration != nil {
		ttl = r.CacheDuration.Duration
	}
	if ttl <= 0 {
		return
	}
	var key string
	switch r.CacheKeyType {
	case cpv1.ImagePluginCacheKeyType:
		key = "image:" + t.repo
	case cpv1.RegistryPluginCacheKeyType:
		key = "registry:" + t.host
	case cpv1.GlobalPluginCacheKeyType:
		key = globalKey
	}
	now := p.opts.clock.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, e := range p.cache {
		if now.After(e.expires) {
			delete(p.cache, k)
		}
	}
	p.cache[key] = cacheEntry{resp: r, expires: now.Add(ttl)}
}

func (p *plugin) run(ctx context.Context, image string) (*cpv1.CredentialProviderResponse, error) {
	req, err := json.Marshal(cpv1.CredentialProviderRequest{
		TypeMeta: metaType(p.cfg.APIVersion, requestKind),
		Image:    image,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: encode request: %w", p.describe(), err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.opts.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.bin, p.cfg.Args...)
	cmd.Env = os.Environ()
	for _, e := range p.cfg.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	cmd.Stdin = bytes.NewReader(req)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	killProcessGroup(cmd)
	// A plugin's children may hold stdout open after it is killed; do not wait
	// for them forever.
	cmd.WaitDelay = 2 * time.Second
	// Through the reaper, which collects the plugin's orphans when the agent is
	// PID 1 but must leave this child to Wait.
	err = reaper.Run(cmd)
	if ctx.Err() == context.DeadlineExceeded {
		return nil, fmt.Errorf("%s: image %s: timed out after %s", p.describe(), image, p.opts.timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: image %s: %w%s", p.describe(), image, err, stderrTail(stderr.Bytes()))
	}
	var resp cpv1.CredentialProviderResponse
	if err := json.Unmarshal(stdout.Bytes(), &resp); err != nil {
		return nil, fmt.Errorf("%s: image %s: bad response: %w", p.describe(), image, redactJSONError(err))
	}
	if resp.APIVersion != p.cfg.APIVersion || resp.Kind != responseKind {
		return nil, fmt.Errorf("%s: image %s: response has apiVersion %q kind %q, want %q %q",
			p.describe(), image, resp.APIVersion, resp.Kind, p.cfg.APIVersion, responseKind)
	}
	switch resp.CacheKeyType {
	case cpv1.ImagePluginCacheKeyType, cpv1.RegistryPluginCacheKeyType, cpv1.GlobalPluginCacheKeyType:
	default:
		return nil, fmt.Errorf("%s: image %s: response cacheKeyType %q is not Image, Registry or Global", p.describe(), image, resp.CacheKeyType)
	}
	if resp.CacheDuration != nil && resp.CacheDuration.Duration < 0 {
		return nil, fmt.Errorf("%s: image %s: response cacheDuration is negative", p.describe(), image)
	}
	return &resp, nil
}

// stderrTail gives the end of a failed plugin's stderr, which usually says why
// it failed. Plugins print diagnostics there, not credentials (those go to
// stdout, which is never echoed).
func stderrTail(b []byte) string {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return ""
	}
	if len(b) > maxStderrEcho {
		b = append([]byte("..."), b[len(b)-maxStderrEcho:]...)
	}
	return fmt.Sprintf(" (stderr: %q)", b)
}

func metaType(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}
