// A kubelet credential provider plugin for tests, driven by environment
// variables set in the provider config's env. Standard library only so that it
// builds quickly at test time.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

type request struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
}

type authConfig struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type response struct {
	APIVersion    string                `json:"apiVersion"`
	Kind          string                `json:"kind"`
	CacheKeyType  string                `json:"cacheKeyType"`
	CacheDuration string                `json:"cacheDuration,omitempty"`
	Auth          map[string]authConfig `json:"auth,omitempty"`
}

func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("read stdin: %v", err)
	}
	var req request
	if err := json.Unmarshal(in, &req); err != nil {
		fail("decode request: %v", err)
	}
	if req.Kind != "CredentialProviderRequest" || req.APIVersion != os.Getenv("PLUGIN_API_VERSION") || req.Image == "" {
		fail("unexpected request %s", in)
	}
	runs := 0
	if f := os.Getenv("PLUGIN_COUNT_FILE"); f != "" {
		old, _ := os.ReadFile(f)
		runs = strings.Count(string(old), "\n") + 1
		fh, err := os.OpenFile(f, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			fail("count file: %v", err)
		}
		fmt.Fprintln(fh, req.Image)
		fh.Close()
	}
	switch os.Getenv("PLUGIN_MODE") {
	case "fail":
		fail("no metadata server for %s", req.Image)
	case "sleep":
		time.Sleep(time.Hour)
	case "badjson":
		fmt.Print(`{"apiVersion": `)
		return
	}
	if d, err := time.ParseDuration(os.Getenv("PLUGIN_DELAY")); err == nil {
		time.Sleep(d)
	}
	registry, _, _ := strings.Cut(req.Image, "/")
	keys := os.Getenv("PLUGIN_AUTH_KEYS")
	if keys == "" {
		keys = "{registry}"
	}
	resp := response{
		APIVersion:    req.APIVersion,
		Kind:          "CredentialProviderResponse",
		CacheKeyType:  os.Getenv("PLUGIN_CACHE_KEY"),
		CacheDuration: os.Getenv("PLUGIN_CACHE_DURATION"),
		Auth:          map[string]authConfig{},
	}
	if v := os.Getenv("PLUGIN_RESPONSE_VERSION"); v != "" {
		resp.APIVersion = v
	}
	for _, k := range strings.Split(keys, ",") {
		resp.Auth[strings.ReplaceAll(k, "{registry}", registry)] = authConfig{
			Username: strings.Join(os.Args[1:], ","),
			Password: fmt.Sprintf("%s-run%d", os.Getenv("PLUGIN_PASSWORD"), runs),
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(resp); err != nil {
		fail("encode: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}
