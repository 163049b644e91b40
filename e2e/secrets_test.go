package e2e_test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// The agent with a pull secret whose keys carry user info (https://user:pass@host, which the
// kubelet accepts) and whose values carry passwords, auth and an identity token, pulling from
// the harness's basic-auth registry: one image succeeds with the right credentials, one fails
// with wrong ones (and the token), one is missing. No secret string appears in any line the
// agent's container logged, any event of the run (the Node's, the instance namespace's), or
// the agent's /metrics and /readyz.
func TestPodNeverPrintsSecrets(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	user, password := env.AuthUser, env.AuthPassword(t)
	private := env.Image(t, env.AuthRegistry+"/e2e/private:latest").Ref
	denied := env.AuthRegistry + "/e2e/denied-" + suffix(t) + ":latest"
	missing := env.AuthRegistry + "/e2e/private:no-such-tag-" + suffix(t)
	list := []string{private, denied, missing}

	wrongUser, wrongPassword, token := "e2e-wrong-"+secret(t), secret(t), secret(t)
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	config := map[string]any{"auths": map[string]any{
		// Only e2e/private: the denied image has only wrong credentials to try.
		fmt.Sprintf("https://%s:%s@%s/e2e/private", user, password, env.AuthRegistry): map[string]string{
			"username": user, "password": password, "auth": b64(user + ":" + password),
		},
		fmt.Sprintf("https://%s:%s@%s/e2e/denied-%s", wrongUser, wrongPassword, env.AuthRegistry, suffix(t)): map[string]string{
			"auth": b64(wrongUser + ":" + wrongPassword), "identitytoken": token,
		},
	}}
	pullSecret, err := json.Marshal(config)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{
		"password":            password,
		"auth":                b64(user + ":" + password),
		"user:password":       user + ":" + password,
		"wrong password":      wrongPassword,
		"wrong auth":          b64(wrongUser + ":" + wrongPassword),
		"identity token":      token,
		"the pull secret":     b64(string(pullSecret)),
		"wrong user:password": wrongUser + ":" + wrongPassword,
	}
	if len(password) < 12 {
		t.Fatalf("the harness's registry password has %d characters: too short to grep for", len(password))
	}

	in := newInstance(t, env, "secrets", list, "pull-secret")
	in.opts.PullSecret = pullSecret
	// Always: the private image is pulled with the credentials even when an earlier test left it
	// on the node (in use by its pods, so it cannot be removed first).
	in.opts.ExtraArgs = []string{"--pull-policy=Always"}
	in.apply()
	in.waitLabel(ctx, "failed")
	// The pass goes on after the first failure: wait for the private image's pull.
	pulled := "image=" + private + " outcome=pulled"
	err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		return strings.Contains(in.logs(), pulled), nil
	})
	if err != nil {
		t.Fatalf("no %q in the agent's log: %s not pulled with the user-info key's credentials: %v\n%s", pulled, private, err, in.diagnose())
	}
	requireAllPresent(ctx, t, images, []string{private})
	// Both failures reported, each with its reason, before anything is read.
	var events string
	err = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		events = ""
		for _, e := range in.events(ctx) {
			events += e.Reason + ": " + e.Message + "\n"
		}
		return strings.Contains(events, denied) && strings.Contains(events, "Unauthorized") &&
			strings.Contains(events, missing) && strings.Contains(events, "NotFound"), nil
	})
	if err != nil {
		t.Fatalf("no Node events for both failures (Unauthorized %s, NotFound %s): %v\n%s", denied, missing, err, events)
	}

	outputs := map[string]string{}
	outputs["agent logs"] = in.logs()
	for _, ns := range []string{metav1.NamespaceDefault, in.opts.Namespace} {
		l, err := in.cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		for _, e := range l.Items {
			// Every field a user sees: kubectl describe, get events -o yaml.
			raw, _ := json.Marshal(e)
			b.Write(raw)
			b.WriteString("\n")
		}
		outputs["events in "+ns] = b.String()
	}
	for _, path := range []string{"/metrics", "/readyz", "/healthz"} {
		outputs[path] = httpGet(ctx, t, fmt.Sprintf("http://127.0.0.1:%d%s", in.opts.ListenPort, path))
	}

	// The outputs are the run's: each names the images it should.
	for what, wantAll := range map[string][]string{
		"agent logs":                           {private, denied, missing, "<redacted>"},
		"events in " + metav1.NamespaceDefault: {denied, missing},
		"/metrics":                             {"image_prefetcher_"},
	} {
		for _, want := range wantAll {
			if !strings.Contains(outputs[what], want) {
				t.Errorf("%s do not contain %q: the check reads the wrong output\n%s", what, want, tail(outputs[what]))
			}
		}
	}
	for what, out := range outputs {
		t.Logf("%s: %d bytes, %d lines", what, len(out), strings.Count(out, "\n"))
		for name, s := range secrets {
			if strings.Contains(out, s) {
				t.Errorf("the %s appears in the %s", name, what)
			}
		}
	}
}

// secret is a random string nothing else contains.
func secret(t *testing.T) string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func httpGet(ctx context.Context, t *testing.T, url string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return string(body)
}

func tail(s string) string {
	if len(s) > 3000 {
		return "..." + s[len(s)-3000:]
	}
	return s
}
