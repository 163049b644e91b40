package credentials

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// A docker config key (or a plugin's auth key) may carry user info,
// https://user:password@host, which the kubelet accepts: it parses the key as
// a URL and matches its host. Such keys are accepted the same way here, and
// the user info is never shown: not in errors, warnings, sources, the config's
// String, nor anything logged of them.
func TestKeysWithUserInfoAreUsedAndNeverShown(t *testing.T) {
	t.Parallel()
	secrets := []string{"Pa55-Secret-Word", "Other-Secret", "Third-Secret-Word", "Fourth-Secret", "Plugin-Secret-Word", "Plugin-Bad-Secret"}
	dir := t.TempDir()
	dc := writeFile(t, dir, "pull/.dockerconfigjson", `{"auths":{
		"https://robot:Pa55-Secret-Word@registry.test": {"username":"u","password":"p"},
		"https://robot:Pa55/Other-Secret@other.test": {"username":"u2","password":"p2"},
		"robot:Third-Secret-Word@third.test/team": {"username":"u3","password":"p3"},
		"https://robot:Fourth-Secret@bad..test": {"username":"u4","password":"p4"}
	}}`)
	cfg, bin, _ := pluginSetup(t, configYAML(providerYAML("p", `"plugin.test"`, "1m", map[string]string{
		"PLUGIN_CACHE_KEY": "Registry", "PLUGIN_PASSWORD": "x",
		"PLUGIN_AUTH_KEYS": "https://robot:Plugin-Secret-Word@{registry},robot:Plugin/Bad-Secret@{registry}",
	})), "p")
	k := NewKeyring([]string{dc}, cfg, bin)

	var logs bytes.Buffer
	text := slog.New(slog.NewTextHandler(&logs, nil))
	jsonLog := slog.New(slog.NewJSONHandler(&logs, nil))
	var shown []string
	show := func(msg string, args ...any) {
		text.Warn(msg, args...)
		jsonLog.Warn(msg, args...)
	}
	for _, err := range append(k.Problems(), k.Warnings()...) {
		shown = append(shown, err.Error())
		show("credentials", "warning", err.Error(), "err", err)
	}
	wantUser := map[string]string{"registry.test/x:1": "u", "third.test/team/x:1": "u3", "plugin.test/x:1": "--a,--b"}
	for _, image := range []string{"registry.test/x:1", "third.test/team/x:1", "plugin.test/x:1", "other.test/x:1"} {
		creds, err := k.Lookup(context.Background(), image)
		if err != nil {
			shown = append(shown, err.Error())
			show("lookup", "image", image, "error", err.Error())
		}
		if want := wantUser[image]; want != "" && (len(creds) != 1 || creds[0].Auth.Username != want) {
			t.Errorf("%s: %v, want the credential of user %s (the key's user info dropped, as the kubelet does)", image, creds, want)
		}
		for _, c := range creds {
			b, _ := json.Marshal(c)
			shown = append(shown, c.Source, fmt.Sprintf("%v %+v %#v %s %q", c, c, c, c, c), string(b))
			show("attempt", "credential", c.Source, "cred", c)
		}
	}
	loaded, err := LoadDockerConfig(dc)
	if err != nil {
		t.Fatal(err)
	}
	shown = append(shown, loaded.String(), fmt.Sprintf("%+v", loaded), strings.Join(loaded.Keys(), " "))
	shown = append(shown, logs.String())

	all := strings.Join(shown, "\n")
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("%q shown:\n%s", s, all)
		}
	}
	for _, want := range []string{
		`["https://<redacted>@registry.test"]`,
		`auths["https://<redacted>@other.test"]: bad registry key: not a registry URL`,
		`auths["https://<redacted>@bad..test"]: bad registry key: not a registry URL`,
		`plugin p["https://<redacted>@plugin.test"]`,
		`response auth key "<redacted>@plugin.test": not a registry URL`,
	} {
		if !strings.Contains(all, want) {
			t.Errorf("nothing shows %s:\n%s", want, all)
		}
	}
}
