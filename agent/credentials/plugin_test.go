package credentials

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	testingclock "k8s.io/utils/clock/testing"
)

// testPlugin is the binary built from testdata/plugin by TestMain.
var testPlugin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "credentials-plugin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testPlugin = filepath.Join(dir, "test-plugin")
	// go test puts its own GOROOT/bin first on PATH
	cmd := exec.Command("go", "build", "-o", testPlugin, "./testdata/plugin/main.go")
	cmd.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build test plugin: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const zeros = "0000000000000000000000000000000000000000000000000000000000000000"

func newFakeClock() *testingclock.FakeClock {
	return testingclock.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
}

// pluginSetup writes config into a temp dir and links each name in the bin
// dir to the test plugin. It returns the config path, the bin dir and the
// file counting plugin runs.
func pluginSetup(t *testing.T, config string, names ...string) (string, string, string) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := os.Symlink(testPlugin, filepath.Join(bin, n)); err != nil {
			t.Fatal(err)
		}
	}
	count := filepath.Join(dir, "runs")
	config = strings.ReplaceAll(config, "@@COUNT@@", count)
	return writeFile(t, dir, "credential-provider-config.yaml", config), bin, count
}

func runs(t *testing.T, count string) []string {
	t.Helper()
	b, err := os.ReadFile(count)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

// providerYAML is one provider entry of a CredentialProviderConfig.
func providerYAML(name, matchImages, defaultCache string, env map[string]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "- name: %s\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n", name)
	fmt.Fprintf(&b, "  matchImages: [%s]\n", matchImages)
	if defaultCache != "" {
		fmt.Fprintf(&b, "  defaultCacheDuration: %s\n", defaultCache)
	}
	b.WriteString("  args: [--a, --b]\n  env:\n")
	b.WriteString("  - {name: PLUGIN_API_VERSION, value: credentialprovider.kubelet.k8s.io/v1}\n")
	b.WriteString("  - {name: PLUGIN_COUNT_FILE, value: \"@@COUNT@@\"}\n")
	for k, v := range env {
		fmt.Fprintf(&b, "  - {name: %s, value: %q}\n", k, v)
	}
	return b.String()
}

func configYAML(providers ...string) string {
	return "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n" + strings.Join(providers, "")
}

func lookupOne(t *testing.T, p Provider, image string) Credential {
	t.Helper()
	creds, err := p.Lookup(context.Background(), image)
	if err != nil {
		t.Fatalf("Lookup(%s): %v", image, err)
	}
	if len(creds) != 1 {
		t.Fatalf("Lookup(%s) = %v, want one credential", image, creds)
	}
	return creds[0]
}

func TestPluginImageCacheKey(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(providerYAML("img-plugin", `"127.0.0.1:5001"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Image", "PLUGIN_CACHE_DURATION": "10m", "PLUGIN_PASSWORD": "pw",
	})), "img-plugin")
	clock := newFakeClock()
	pp, err := NewPluginProvider(cfg, bin, WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	const a, a2, b = "127.0.0.1:5001/private/rand:img-0", "127.0.0.1:5001/private/rand@sha256:" + zeros, "127.0.0.1:5001/private/other:img-1"
	c := lookupOne(t, pp, a)
	if c.Source != `plugin img-plugin["127.0.0.1:5001"]` || c.Auth.Username != "--a,--b" || c.Auth.Password != "pw-run1" {
		t.Errorf("credential = %s %q/%q", c.Source, c.Auth.Username, c.Auth.Password)
	}
	if c := lookupOne(t, pp, a); c.Auth.Password != "pw-run1" {
		t.Errorf("second lookup ran the plugin again: %q", c.Auth.Password)
	}
	// As in the kubelet, the plugin is asked about the repository, so the
	// Image key covers its other tags and digests.
	if c := lookupOne(t, pp, a2); c.Auth.Password != "pw-run1" {
		t.Errorf("same repository by digest: %q, want cached run 1", c.Auth.Password)
	}
	// Image keys do not cover another repository of the same registry.
	if c := lookupOne(t, pp, b); c.Auth.Password != "pw-run2" {
		t.Errorf("other image: %q, want a new run", c.Auth.Password)
	}
	// The response's cacheDuration (10m) wins over defaultCacheDuration (1m);
	// the entry serves until 10m have passed, the last instant included.
	clock.Step(10 * time.Minute)
	if c := lookupOne(t, pp, a); c.Auth.Password != "pw-run1" {
		t.Errorf("at 10m: %q, want cached run 1", c.Auth.Password)
	}
	clock.Step(time.Nanosecond)
	if c := lookupOne(t, pp, a); c.Auth.Password != "pw-run3" {
		t.Errorf("after 10m: %q, want a new run", c.Auth.Password)
	}
	repoA, repoB := "127.0.0.1:5001/private/rand", "127.0.0.1:5001/private/other"
	if got := runs(t, count); strings.Join(got, " ") != strings.Join([]string{repoA, repoB, repoA}, " ") {
		t.Errorf("plugin runs = %q", got)
	}
	// Images outside matchImages never run the plugin.
	if creds, err := pp.Lookup(context.Background(), "127.0.0.1:5000/private/rand:img-0"); err != nil || len(creds) != 0 {
		t.Errorf("non-matching image: %v, %v", creds, err)
	}
	if got := runs(t, count); len(got) != 3 {
		t.Errorf("plugin runs = %q", got)
	}
}

func TestPluginRegistryCacheKeyAndDefaultDuration(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(providerYAML("reg-plugin", `"*.example.com"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Registry", "PLUGIN_PASSWORD": "pw",
	})), "reg-plugin")
	clock := newFakeClock()
	pp, err := NewPluginProvider(cfg, bin, WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	if c := lookupOne(t, pp, "a.example.com/x:1"); c.Auth.Password != "pw-run1" || c.Source != `plugin reg-plugin["a.example.com"]` {
		t.Errorf("first: %s %q", c.Source, c.Auth.Password)
	}
	if c := lookupOne(t, pp, "a.example.com/y/z:2"); c.Auth.Password != "pw-run1" {
		t.Errorf("same registry: %q, want cached run 1", c.Auth.Password)
	}
	if c := lookupOne(t, pp, "b.example.com/x:1"); c.Auth.Password != "pw-run2" {
		t.Errorf("other registry: %q, want run 2", c.Auth.Password)
	}
	// No cacheDuration in the response: defaultCacheDuration (1m) applies.
	clock.Step(time.Minute)
	if c := lookupOne(t, pp, "a.example.com/q:1"); c.Auth.Password != "pw-run1" {
		t.Errorf("at 60s: %q, want cached run 1", c.Auth.Password)
	}
	clock.Step(time.Millisecond)
	if c := lookupOne(t, pp, "a.example.com/q:1"); c.Auth.Password != "pw-run3" {
		t.Errorf("after 60s: %q, want run 3", c.Auth.Password)
	}
	if got := runs(t, count); len(got) != 3 {
		t.Errorf("plugin runs = %q", got)
	}
}

func TestPluginGlobalCacheAndZeroDuration(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(
		providerYAML("global", `"*.global.test"`, "", map[string]string{
			"PLUGIN_CACHE_KEY": "Global", "PLUGIN_CACHE_DURATION": "5m", "PLUGIN_PASSWORD": "g",
		}),
		providerYAML("nocache", `"*.nocache.test"`, "1h", map[string]string{
			"PLUGIN_CACHE_KEY": "Image", "PLUGIN_CACHE_DURATION": "0s", "PLUGIN_PASSWORD": "n",
			"PLUGIN_AUTH_KEYS": "*.nocache.test",
		}),
	), "global", "nocache")
	pp, err := NewPluginProvider(cfg, bin, WithClock(newFakeClock()))
	if err != nil {
		t.Fatal(err)
	}
	lookupOne(t, pp, "a.global.test/x:1")
	// A Global answer is reused for any image; its auth key (a.global.test)
	// does not match b.global.test, so no credential comes back.
	if creds, err := pp.Lookup(context.Background(), "b.global.test/x:1"); err != nil || len(creds) != 0 {
		t.Errorf("global cache: %v, %v", creds, err)
	}
	for i := 1; i <= 2; i++ {
		c := lookupOne(t, pp, "a.nocache.test/x:1")
		if want := fmt.Sprintf("n-run%d", i+1); c.Auth.Password != want || c.Source != `plugin nocache["*.nocache.test"]` {
			t.Errorf("cacheDuration 0s, lookup %d: %s %q, want %q", i, c.Source, c.Auth.Password, want)
		}
	}
	if got := runs(t, count); len(got) != 3 {
		t.Errorf("plugin runs = %q", got)
	}
}

func TestPluginConcurrentLookupsRunOnce(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(providerYAML("slow", `"*.example.com"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Image", "PLUGIN_DELAY": "200ms", "PLUGIN_PASSWORD": "s",
	})), "slow")
	pp, err := NewPluginProvider(cfg, bin, WithClock(newFakeClock()))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			creds, err := pp.Lookup(context.Background(), "a.example.com/x:1")
			if err == nil && (len(creds) != 1 || creds[0].Auth.Password != "s-run1") {
				err = fmt.Errorf("got %v", creds)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := runs(t, count); len(got) != 1 {
		t.Errorf("plugin ran %d times, want once", len(got))
	}
}

func TestPluginFailures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		opts []Option
		want string
	}{
		{"exit status", map[string]string{"PLUGIN_MODE": "fail"}, nil,
			`exit status 1 (stderr: "no metadata server for a.example.com/x")`},
		{"timeout", map[string]string{"PLUGIN_MODE": "sleep"}, []Option{WithPluginTimeout(300 * time.Millisecond)},
			"image a.example.com/x: timed out after 300ms"},
		{"bad json", map[string]string{"PLUGIN_MODE": "badjson"}, nil, "bad response: invalid JSON"},
		{"wrong apiVersion", map[string]string{"PLUGIN_CACHE_KEY": "Image", "PLUGIN_RESPONSE_VERSION": "credentialprovider.kubelet.k8s.io/v1alpha1"}, nil,
			`response has apiVersion "credentialprovider.kubelet.k8s.io/v1alpha1"`},
		{"bad cacheKeyType", map[string]string{"PLUGIN_CACHE_KEY": "Node"}, nil, `cacheKeyType "Node" is not Image, Registry or Global`},
		{"bad cacheDuration", map[string]string{"PLUGIN_CACHE_KEY": "Image", "PLUGIN_CACHE_DURATION": "soon"}, nil, "bad response"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"PLUGIN_PASSWORD": "Very-Secret-Pw"}
			for k, v := range tc.env {
				env[k] = v
			}
			cfg, bin, _ := pluginSetup(t, configYAML(providerYAML("flaky", `"*.example.com"`, "1m", env)), "flaky")
			pp, err := NewPluginProvider(cfg, bin, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			creds, err := pp.Lookup(context.Background(), "a.example.com/x:1")
			if err == nil {
				t.Fatalf("no error, creds %v", creds)
			}
			prefix := fmt.Sprintf("credential provider plugin flaky (config %s): ", cfg)
			if !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant prefix %q and %q", err, prefix, tc.want)
			}
			if strings.Contains(err.Error(), "Very-Secret-Pw") {
				t.Errorf("error holds the secret: %q", err)
			}
		})
	}
}

// A shell-script plugin whose child keeps stdout open must still be stopped
// by the timeout.
func TestPluginTimeoutKillsChildren(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	writeFile(t, bin, "hang", "#!/bin/sh\nsleep 600\n")
	if err := os.Chmod(filepath.Join(bin, "hang"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := writeFile(t, dir, "cfg.yaml", configYAML(providerYAML("hang", `"*.example.com"`, "1m", nil)))
	pp, err := NewPluginProvider(cfg, bin, WithPluginTimeout(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	_, err = pp.Lookup(context.Background(), "a.example.com/x:1")
	if err == nil || !strings.Contains(err.Error(), "plugin hang") || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("error = %v", err)
	}
}

func TestPluginCallerCancel(t *testing.T) {
	t.Parallel()
	cfg, bin, count := pluginSetup(t, configYAML(providerYAML("sleepy", `"*.example.com"`, "1m", map[string]string{
		"PLUGIN_MODE": "sleep",
	})), "sleepy")
	pp, err := NewPluginProvider(cfg, bin, WithPluginTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := pp.Lookup(ctx, "a.example.com/x:1"); !errors.Is(err, context.Canceled) {
		t.Errorf("error = %v, want context.Canceled", err)
	}
	// The plugin still runs, detached from the cancelled caller so that other
	// callers can share it: a second caller joins that run and sees the plugin
	// timeout end it (the process killed: nothing outlives the test, which once
	// left hung plugins behind).
	_, err = pp.Lookup(context.Background(), "a.example.com/x:1")
	if err == nil || !strings.Contains(err.Error(), "timed out after 2s") {
		t.Errorf("second caller: %v, want the shared run's timeout", err)
	}
	if n := len(runs(t, count)); n != 1 {
		t.Errorf("the plugin ran %d times, want 1 (the second caller shares the run)", n)
	}
}

func TestPluginConfigErrors(t *testing.T) {
	t.Parallel()
	good := providerYAML("p", `"*.example.com"`, "1m", nil)
	tests := []struct {
		name, config, want string
	}{
		{"wrong kind", strings.Replace(configYAML(good), "kind: CredentialProviderConfig", "kind: KubeletConfiguration", 1), `got kind "KubeletConfiguration"`},
		{"wrong apiVersion", strings.Replace(configYAML(good), "kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v2", 1), `apiVersion "kubelet.config.k8s.io/v2"`},
		{"no providers", configYAML(), "no providers"},
		{"unknown field", configYAML(good) + "  matchImage: [x]\n", `unknown field "matchImage"`},
		{"missing binary", configYAML(providerYAML("absent", `"a.io"`, "1m", nil)), "providers[0] (absent): plugin binary: stat"},
		{"duplicate", configYAML(good, good), "providers[1] (p): duplicate name"},
		{"path in name", configYAML(providerYAML("../p", `"a.io"`, "1m", nil)), "name must be a plain file name"},
		{"no matchImages", configYAML(providerYAML("p", ``, "1m", nil)), "matchImages is empty"},
		{"bad matchImages", configYAML(providerYAML("p", `"a.io:x"`, "1m", nil)), `matchImages "a.io:x": not a registry URL: invalid port ":x" after host`},
		{"port glob", configYAML(providerYAML("p", `"a.io:*"`, "1m", nil)), `matchImages "a.io:*": not a registry URL: invalid port ":*" after host`},
		{"user info", configYAML(providerYAML("p", `"u:Pa55/Secret-Word@a.io"`, "1m", nil)), `matchImages "<redacted>@a.io": not a registry URL`},
		{"plugin apiVersion", configYAML(strings.Replace(good, "credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1alpha1", 1)), `apiVersion "credentialprovider.kubelet.k8s.io/v1alpha1" not supported`},
		{"negative duration", configYAML(providerYAML("p", `"a.io"`, "-1m", nil)), "defaultCacheDuration must not be negative"},
		{"not yaml", "\t{", "error converting YAML to JSON"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, bin, _ := pluginSetup(t, tc.config, "p")
			_, err := NewPluginProvider(cfg, bin)
			if err == nil || !strings.Contains(err.Error(), cfg) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v\nwant it to name %s and contain %q", err, cfg, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "Secret-Word") {
				t.Errorf("error quotes user info: %v", err)
			}
		})
	}
	if _, err := NewPluginProvider(filepath.Join(t.TempDir(), "nope.yaml"), "/nonexistent"); err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Errorf("missing config: %v", err)
	}
}

func TestPluginConfigV1beta1JSONAndTokenAttributes(t *testing.T) {
	t.Parallel()
	config := `{"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "CredentialProviderConfig", "providers": [
		{"name": "sa", "apiVersion": "credentialprovider.kubelet.k8s.io/v1", "matchImages": ["*.example.com"],
		 "defaultCacheDuration": "1m", "tokenAttributes": {"serviceAccountTokenAudience": "x", "cacheType": "Token", "requireServiceAccount": true}},
		{"name": "p", "apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1", "matchImages": ["*.example.com"],
		 "defaultCacheDuration": "1m", "env": [{"name": "PLUGIN_API_VERSION", "value": "credentialprovider.kubelet.k8s.io/v1beta1"},
		 {"name": "PLUGIN_CACHE_KEY", "value": "Image"}, {"name": "PLUGIN_PASSWORD", "value": "b"}]}]}`
	cfg, bin, _ := pluginSetup(t, config, "p")
	pp, err := NewPluginProvider(cfg, bin)
	if err != nil {
		t.Fatal(err)
	}
	if w := pp.Warnings(); len(w) != 1 || !strings.Contains(w[0].Error(), "providers[0] (sa): skipped: tokenAttributes") {
		t.Errorf("warnings = %v", w)
	}
	if c := lookupOne(t, pp, "a.example.com/x:1"); c.Source != `plugin p["a.example.com"]` || c.Auth.Password != "b-run0" {
		t.Errorf("credential %s %q", c.Source, c.Auth.Password)
	}
}

func TestKeyringPluginsFirst(t *testing.T) {
	t.Parallel()
	cfg, bin, _ := pluginSetup(t, configYAML(
		providerYAML("gke-credential-provider", `"*.gcr.io", "127.0.0.1:5001"`, "1m", map[string]string{
			"PLUGIN_CACHE_KEY": "Registry", "PLUGIN_PASSWORD": "plug", "PLUGIN_AUTH_KEYS": "*.gcr.io,{registry},{registry}/private",
		}),
		providerYAML("broken", `"127.0.0.1:5001"`, "1m", map[string]string{"PLUGIN_MODE": "fail"}),
	), "gke-credential-provider", "broken")
	dc := writeFile(t, t.TempDir(), "a/.dockerconfigjson", `{"auths":{"127.0.0.1:5001":{"username":"u","password":"p"}}}`)
	k := NewKeyring([]string{dc}, cfg, bin)
	if p := k.Problems(); len(p) != 0 {
		t.Fatal(p)
	}
	creds, err := k.Lookup(context.Background(), "127.0.0.1:5001/private/rand:img-0")
	if err == nil || !strings.Contains(err.Error(), "credential provider plugin broken") {
		t.Errorf("error = %v, want the broken plugin's failure", err)
	}
	// The plugin's "127.0.0.1:5001" key holds the same secret as its
	// "127.0.0.1:5001/private" key and is dropped as a duplicate.
	want := []string{
		`plugin gke-credential-provider["127.0.0.1:5001/private"]`,
		`dockerconfig ` + dc + `["127.0.0.1:5001"]`,
	}
	if got := sources(creds); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("sources:\n got %q\nwant %q", got, want)
	}
	creds, err = k.Lookup(context.Background(), "eu.gcr.io/p/i:1")
	// The plugin answers with keys *.gcr.io and eu.gcr.io holding the same
	// secret: the more specific one is kept.
	if err != nil || len(creds) != 1 || creds[0].Source != `plugin gke-credential-provider["eu.gcr.io"]` {
		t.Errorf("gcr: %v, %v", creds, err)
	}
}

// matchImages entries the kubelet keeps but that match no image (a scheme, an
// empty label or host) are left out with a warning; the others are used.
func TestPluginDeadMatchImagesWarn(t *testing.T) {
	t.Parallel()
	cfg, bin, _ := pluginSetup(t, configYAML(providerYAML("p", `"https://a.example.com", "a..io", "", "*.example.com"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Image", "PLUGIN_PASSWORD": "w",
	})), "p")
	pp, err := NewPluginProvider(cfg, bin)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`matchImages "https://a.example.com": ignored: the kubelet reads it without a scheme`,
		`matchImages "a..io": ignored: it matches no image: empty label`,
		`matchImages "": ignored: it matches no image: empty host`,
	}
	w := pp.Warnings()
	if len(w) != len(want) {
		t.Fatalf("warnings = %q", w)
	}
	for i := range want {
		if !strings.Contains(w[i].Error(), want[i]) || !strings.Contains(w[i].Error(), cfg) {
			t.Errorf("warning %d = %q, want %q", i, w[i], want[i])
		}
	}
	if c := lookupOne(t, pp, "a.example.com/x:1"); c.Auth.Password != "w-run1" {
		t.Errorf("credential %s %q", c.Source, c.Auth.Password)
	}
}
