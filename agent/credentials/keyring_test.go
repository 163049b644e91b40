package credentials

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func sources(creds []Credential) []string {
	out := make([]string, 0, len(creds))
	for _, c := range creds {
		out = append(out, c.Source)
	}
	return out
}

func TestKeyringDockerConfigOrder(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := writeFile(t, dir, "a/.dockerconfigjson", `{"auths":{
		"127.0.0.1:5001": {"username":"a-host","password":"1"},
		"127.0.0.1:5001/private": {"username":"a-path","password":"2"},
		"127.0.0.1:5000": {"username":"a-other-port","password":"3"},
		"https://index.docker.io/v1/": {"auth":"`+b64("a-hub:4")+`"},
		"*.example.com": {"username":"a-glob","password":"5"},
		"x.example.com": {"username":"a-exact","password":"6"}
	}}`)
	b := writeFile(t, dir, "b/.dockercfg", `{
		"127.0.0.1:5001": {"username":"b-host","password":"7"},
		"127.0.0.1:5001/private/rand": {"username":"b-repo","password":"8"},
		"docker.io/library": {"username":"b-library","password":"9"},
		"registry-1.docker.io": {"username":"b-hub","password":"10"}
	}`)
	c := writeFile(t, dir, "c/.dockerconfigjson", `{"auths":{
		"127.0.0.1:5001": {"username":"a-host","password":"1"},
		"index.docker.io": {"username":"c-hub","password":"11"}
	}}`)
	k := NewKeyring([]string{a, b, c}, "", "")
	if p := k.Problems(); len(p) != 0 {
		t.Fatal(p)
	}
	src := func(file, key string) string { return fmt.Sprintf("dockerconfig %s[%q]", file, key) }
	tests := []struct {
		image string
		want  []string
	}{
		{"127.0.0.1:5001/private/rand:img-0", []string{
			src(b, "127.0.0.1:5001/private/rand"),
			src(a, "127.0.0.1:5001/private"),
			src(a, "127.0.0.1:5001"),
			src(b, "127.0.0.1:5001"),
			// c's 127.0.0.1:5001 holds the same secret as a's and is dropped.
		}},
		{"127.0.0.1:5001/public/x:1", []string{src(a, "127.0.0.1:5001"), src(b, "127.0.0.1:5001")}},
		{"127.0.0.1:5000/private/rand:img-0", []string{src(a, "127.0.0.1:5000")}},
		// As in the kubelet: docker.io/library matches; the index.docker.io
		// entries serve only Docker Hub images nothing matches, and
		// registry-1.docker.io is another registry's name.
		{"docker.io/library/busybox:latest", []string{src(b, "docker.io/library")}},
		{"docker.io/someone/else:1", []string{
			src(a, "https://index.docker.io/v1/"),
			src(c, "index.docker.io"),
		}},
		{"registry-1.docker.io/library/busybox:1", []string{src(b, "registry-1.docker.io")}},
		{"x.example.com/y:1", []string{src(a, "x.example.com"), src(a, "*.example.com")}},
		{"z.example.com/y:1", []string{src(a, "*.example.com")}},
		{"a.b.example.com/y:1", nil},
		{"quay.io/x/y@sha256:" + strings.Repeat("0", 64), nil},
	}
	for _, tc := range tests {
		creds, err := k.Lookup(context.Background(), tc.image)
		if err != nil {
			t.Fatalf("%s: %v", tc.image, err)
		}
		if got := sources(creds); !reflect.DeepEqual(got, tc.want) && !(len(got) == 0 && len(tc.want) == 0) {
			t.Errorf("%s:\n got %q\nwant %q", tc.image, got, tc.want)
		}
	}
	creds, _ := k.Lookup(context.Background(), "127.0.0.1:5001/private/rand:img-0")
	if creds[0].Auth.Username != "b-repo" || creds[0].Auth.Password != "8" {
		t.Errorf("first credential auth = %q/%q", creds[0].Auth.Username, creds[0].Auth.Password)
	}
	if _, err := k.Lookup(context.Background(), "Not A Ref"); err == nil {
		t.Error("bad image: no error")
	}
}

func TestNewKeyringErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := writeFile(t, dir, "good", `{"auths":{"a.io":{"auth":"`+b64("u:p")+`"},"b.io":{"auth":"*"}}}`)
	k := NewKeyring([]string{good}, "", "")
	if p := k.Problems(); len(p) != 0 {
		t.Fatal(p)
	}
	if w := k.Warnings(); len(w) != 1 || !strings.Contains(w[0].Error(), good+`: auths["b.io"].auth`) {
		t.Errorf("warnings = %q", w)
	}
}

// One broken or missing file is reported and left out; the other files are
// still used, and an image no loaded credential matches is pulled anonymously.
func TestKeyringSkipsBrokenFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	const secret = "s3cr3t-in-broken-file"
	good := writeFile(t, dir, "good/.dockerconfigjson", `{"auths":{"private.example.com":{"username":"u","password":"p"}}}`)
	broken := writeFile(t, dir, "broken/.dockerconfigjson", `{"auths":{"public.example.com":{"password":"`+secret+`"`)
	wrongShape := writeFile(t, dir, "shape/.dockerconfigjson", `{"auths":[]}`)
	missing := filepath.Join(dir, "missing/.dockerconfigjson")
	badPlugins := writeFile(t, dir, "providers.yaml", "kind: Nonsense\n")

	k := NewKeyring([]string{broken, missing, good, wrongShape}, badPlugins, dir)
	problems := k.Problems()
	if len(problems) != 4 {
		t.Fatalf("problems = %q, want one per unusable file (4)", problems)
	}
	for i, file := range []string{broken, missing, wrongShape, badPlugins} {
		var fe *FileError
		if !errors.As(problems[i], &fe) || fe.File != file || !strings.Contains(problems[i].Error(), file) {
			t.Errorf("problem %d = %v, want a FileError naming %s", i, problems[i], file)
		}
		if strings.Contains(problems[i].Error(), secret) {
			t.Errorf("problem %d quotes a secret: %v", i, problems[i])
		}
	}
	creds, err := k.Lookup(context.Background(), "private.example.com/app:1")
	if err != nil || len(creds) != 1 || creds[0].Auth.Username != "u" {
		t.Errorf("the good file is not used: %v, %v", sources(creds), err)
	}
	creds, err = k.Lookup(context.Background(), "public.example.com/app:1")
	if err != nil || len(creds) != 0 {
		t.Errorf("public image: %v, %v; want anonymous", sources(creds), err)
	}
}
