package app

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodeprefetch/image-prefetcher/agent/cri/critest"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
)

// A docker config key with user info (https://user:password@host) is used as
// the kubelet uses it, its host matched, and the password reaches neither the
// log (debug level, text and JSON) nor a Node event, even from a key that does
// not parse.
func TestDockerConfigKeyWithUserInfoIsUsedAndNeverShown(t *testing.T) {
	const private = "registry.test/private/app:1"
	secrets := []string{"Pa55-Secret-Word", "Other-Secret"}
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			cri := critest.Start(t)
			cri.RequireAuth(private, critest.Credential{Username: "u", Password: "p"})
			dc := filepath.Join(t.TempDir(), ".dockerconfigjson")
			if err := os.WriteFile(dc, []byte(`{"auths":{
				"https://robot:Pa55-Secret-Word@registry.test": {"username":"u","password":"p"},
				"https://robot:Pa55/Other-Secret@other.test": {"username":"u2","password":"p2"}
			}}`), 0o600); err != nil {
				t.Fatal(err)
			}
			client := newNodeClient()
			o := testOptions(cri.Path(), writeList(t, private))
			o.DockerConfigs = []string{dc}
			o.Log = LogOptions{Format: format, Level: "debug"}
			p, logs := newFaultPrefetcher(t, o, false, client)
			rep, err := p.pass(context.Background())
			if err != nil || rep.State != nodelabel.Succeeded {
				t.Fatalf("pass: %q %v\n%s", rep.State, err, logs)
			}
			if calls := cri.PullCallsFor(private); len(calls) == 0 || calls[len(calls)-1].Username != "u" {
				t.Errorf("%s not pulled with the key's credentials: %+v", private, calls)
			}
			var events []string
			for _, e := range nodeEvents(t, client) {
				events = append(events, e.Reason+": "+e.Message)
			}
			all := strings.Join(events, "\n") + "\n" + logs.String()
			for _, s := range secrets {
				if strings.Contains(all, s) {
					t.Errorf("%q shown in the log or an event:\n%s", s, all)
				}
			}
			skipped := `auths[\"https://<redacted>@other.test\"]: bad registry key: not a registry URL`
			if !strings.Contains(strings.Join(events, "\n"), nodelabel.EventReasonCredentialFileSkipped+": credential entry skipped: "+dc+": "+strings.ReplaceAll(skipped, `\"`, `"`)) {
				t.Errorf("no event names the skipped key, redacted:\n%s", strings.Join(events, "\n"))
			}
			if !strings.Contains(logs.String(), `https://<redacted>@registry.test`) {
				t.Errorf("the log does not name the credential used, redacted:\n%s", logs)
			}
		})
	}
}

// The agent keeps one keyring across passes, so a credential plugin's answer
// (here for the registry, for 12h) serves every pass that pulls: three passes,
// each pulling the image again, run the plugin once. A keyring built per pass
// ran it three times.
func TestCredentialPluginRunsOnceAcrossPasses(t *testing.T) {
	const private = "registry.test/private/app:1"
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	count := filepath.Join(dir, "runs")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	plugin := `#!/bin/sh
cat >/dev/null
echo run >>"$COUNT_FILE"
printf '%s' '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"12h","auth":{"registry.test":{"username":"u","password":"p"}}}'
`
	if err := os.WriteFile(filepath.Join(bin, "registry-plugin"), []byte(plugin), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "credential-provider-config.yaml")
	if err := os.WriteFile(cfg, []byte(`apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: registry-plugin
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: ["registry.test"]
  defaultCacheDuration: 1m
  env: [{name: COUNT_FILE, value: "`+count+`"}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	cri := critest.Start(t)
	cri.RequireAuth(private, critest.Credential{Username: "u", Password: "p"})
	o := testOptions(cri.Path(), writeList(t, private))
	o.CredProviderConfig, o.CredProviderBinDir = cfg, bin
	p, logs := newFaultPrefetcher(t, o, false, newNodeClient())
	for i := range 3 {
		cri.DeleteImage(private)
		if rep, err := p.pass(context.Background()); err != nil || rep.State != nodelabel.Succeeded {
			t.Fatalf("pass %d: %q %v\n%s", i, rep.State, err, logs)
		}
	}
	if n := len(cri.PullCallsFor(private)); n != 3 {
		t.Errorf("%d pulls, want one per pass", n)
	}
	b, err := os.ReadFile(count)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "run"); n != 1 {
		t.Errorf("the plugin ran %d times in 3 passes, want once", n)
	}
}
