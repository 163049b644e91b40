package credentials

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestCredentialNeverPrintsSecret(t *testing.T) {
	t.Parallel()
	const secret = "hunter2-very-secret"
	c := Credential{
		Source: `dockerconfig /etc/pull-secrets/a/.dockerconfigjson["127.0.0.1:5001"]`,
		Auth: &runtimeapi.AuthConfig{
			Username: "user", Password: secret, Auth: secret, IdentityToken: secret, RegistryToken: secret,
		},
	}
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		outs = append(outs, fmt.Sprintf(verb, c), fmt.Sprintf(verb, &c), fmt.Sprintf(verb, []Credential{c}))
	}
	outs = append(outs, fmt.Sprint(c), fmt.Sprintln(c, &c), fmt.Sprintf("%v", struct{ C Credential }{c}))

	for _, h := range []func(*bytes.Buffer) slog.Handler{
		func(b *bytes.Buffer) slog.Handler { return slog.NewTextHandler(b, nil) },
		func(b *bytes.Buffer) slog.Handler { return slog.NewJSONHandler(b, nil) },
	} {
		var b bytes.Buffer
		l := slog.New(h(&b))
		l.Info("try", "cred", c, "ptr", &c, "list", []Credential{c})
		l.Info("try", slog.Any("cred", c))
		outs = append(outs, b.String())
	}
	j, err := json.Marshal(map[string]any{"c": c, "list": []Credential{c}})
	if err != nil {
		t.Fatal(err)
	}
	outs = append(outs, string(j))

	for _, o := range outs {
		if strings.Contains(o, secret) {
			t.Errorf("output holds the secret: %s", o)
		}
		if !strings.Contains(o, "127.0.0.1:5001") {
			t.Errorf("output lacks the source: %s", o)
		}
	}
}

func TestDockerConfigNeverPrintsSecret(t *testing.T) {
	t.Parallel()
	const secret = "hunter2-very-secret"
	c, err := ParseDockerConfig("f", []byte(`{"auths":{"a.io":{"username":"u","password":"`+secret+`"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
		if o := fmt.Sprintf(verb, c); strings.Contains(o, secret) || !strings.Contains(o, "a.io") {
			t.Errorf("%s: %s", verb, o)
		}
	}
}
