package app

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// restoreKlog puts klog and client-go's warning handler back as a process
// without the agent's wiring has them, for the tests that come after.
func restoreKlog(t *testing.T) {
	t.Cleanup(func() {
		klog.ClearLogger()
		fs := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(fs)
		_ = fs.Set("v", "0")
		rest.SetDefaultWarningHandlerWithContext(rest.WarningLogger{})
	})
}

// jsonLines parses every line of logs as JSON: a klog-formatted line among
// them is what breaks a JSON log pipeline.
func jsonLines(t *testing.T, logs string) map[string]map[string]any {
	t.Helper()
	byMsg := map[string]map[string]any{}
	for line := range strings.Lines(logs) {
		var l map[string]any
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("log line %q is not JSON: %v", line, err)
		}
		msg, _ := l["msg"].(string)
		if _, dup := byMsg[msg]; dup {
			t.Errorf("message %q logged twice", msg)
		}
		byMsg[msg] = l
	}
	return byMsg
}

// TestKlogThroughAgentHandler: with --log-format=json, what client-go logs
// through klog (structured, plain, verbose, contextual) comes out as JSON
// lines of the agent's handler, with the agent's levels and attributes;
// verbose lines only at --log-level=debug, request tracing (V(6)) never.
func TestKlogThroughAgentHandler(t *testing.T) {
	for _, level := range []string{"info", "debug"} {
		t.Run(level, func(t *testing.T) {
			restoreKlog(t)
			o := testOptions(filepath.Join(t.TempDir(), "no.sock"), writeList(t, "registry.test/a:1"))
			o.Log.Format, o.Log.Level = "json", level
			_, _, logs := newTestPrefetcher(t, o)
			logs.Reset()

			klog.InfoS("informer started", "resource", "nodes")
			klog.ErrorS(errors.New("connection refused"), "reflector list failed", "type", "*v1.Node")
			klog.Infof("plain %s", "line")
			klog.V(1).InfoS("watch closed", "reflector", "nodes")
			klog.V(4).InfoS("verbose detail", "key", "value")
			klog.Background().V(4).Info("contextual detail", "key", "value")
			klog.V(5).InfoS("trace")
			klog.V(6).InfoS("GET https://api/nodes")
			klog.Background().V(6).Info("contextual GET https://api/nodes")

			got := jsonLines(t, logs.String())
			want := map[string]map[string]any{
				"informer started":      {"level": "INFO", "resource": "nodes"},
				"reflector list failed": {"level": "ERROR", "error": "connection refused", "type": "*v1.Node"},
				"plain line":            {"level": "INFO"},
			}
			if level == "debug" {
				want["watch closed"] = map[string]any{"level": "DEBUG", "reflector": "nodes"}
				want["verbose detail"] = map[string]any{"level": "DEBUG", "key": "value"}
				want["contextual detail"] = map[string]any{"level": "DEBUG", "key": "value"}
			}
			for msg, attrs := range want {
				l, ok := got[msg]
				if !ok {
					t.Errorf("no line %q in\n%s", msg, logs)
					continue
				}
				attrs["instance"], attrs["node"] = testInstance, testNode
				for k, v := range attrs {
					if l[k] != v {
						t.Errorf("line %q: %s=%v, want %v", msg, k, l[k], v)
					}
				}
			}
			for msg := range got {
				if _, ok := want[msg]; !ok {
					t.Errorf("unexpected line %q", msg)
				}
			}
		})
	}
}

// TestAPIWarningLoggedOnce: a warning of the API server (a deprecated API,
// on every request) becomes one slog warning of the agent, not a klog line
// per request.
func TestAPIWarningLoggedOnce(t *testing.T) {
	restoreKlog(t)
	const warning = "v1 Node field spec.externalID is deprecated"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Add("Warning", fmt.Sprintf("299 - %q", warning))
		fmt.Fprint(w, `{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"}}`)
	}))
	defer srv.Close()
	kubeconfig := serverKubeconfig(t, srv.URL)
	o := testOptions(filepath.Join(t.TempDir(), "no.sock"), writeList(t, "registry.test/a:1"))
	o.Log.Format = "json"
	_, _, logs := newTestPrefetcher(t, o)
	logs.Reset()

	client, err := kubeClient(kubeconfig, "")
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := client.CoreV1().Nodes().Get(context.Background(), "node-a", metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	got := jsonLines(t, logs.String())
	l, ok := got["API server warning"]
	if !ok || len(got) != 1 {
		t.Fatalf("want one API server warning line, got\n%s", logs)
	}
	if l["level"] != "WARN" || l["warning"] != warning || l["node"] != testNode {
		t.Errorf("warning line %v", l)
	}
}

// TestKlogTextFormat: with --log-format=text klog's lines are the agent's
// logfmt lines too.
func TestKlogTextFormat(t *testing.T) {
	restoreKlog(t)
	var logs bytes.Buffer
	log, err := (&LogOptions{Format: "text", Level: "info"}).newLogger(&logs)
	if err != nil {
		t.Fatal(err)
	}
	if err := routeClientGoLogs(log); err != nil {
		t.Fatal(err)
	}
	klog.ErrorS(errors.New("boom"), "reflector list failed", "type", "*v1.Node")
	want := `level=ERROR msg="reflector list failed" error=boom type=*v1.Node`
	if !strings.Contains(logs.String(), want) {
		t.Errorf("got %q, want it to hold %q", logs.String(), want)
	}
}
