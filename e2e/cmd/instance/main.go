// Command instance prints the manifests of an image prefetcher instance for the e2e cluster:
// overlays/vanilla with the given namespace, name, list and components, plus the e2e-only layer of
// e2e/deploy (agent image by digest, hostNetwork and the API server address for a cluster without
// kube-proxy, the harness's CRI socket directory). `make demo` pipes it into `kubectl apply -f -`.
//
//	go run ./e2e/cmd/instance -instance demo-images -namespace prefetch-demo \
//	    -image 127.0.0.1:5000/e2e/family:a -image 127.0.0.1:5000/e2e/random:4mib
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
	"github.com/nodeprefetch/image-prefetcher/e2e/deploy"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var o deploy.Options
	var images, comps, extra list
	flag.StringVar(&o.Instance, "instance", "demo-images", "instance name")
	flag.StringVar(&o.Namespace, "namespace", "prefetch-demo", "instance namespace")
	flag.Var(&images, "image", "image reference for the list (repeatable)")
	flag.Var(&comps, "component", "component under components/ (repeatable)")
	flag.Var(&extra, "arg", "extra agent argument (repeatable)")
	flag.StringVar(&o.RecheckInterval, "recheck-interval", "", "agent --recheck-interval")
	flag.IntVar(&o.ListenPort, "port", 0, "host port of the agent's metrics/probes (0: a free one)")
	flag.Parse()
	o.Images, o.Components, o.ExtraArgs = images, comps, extra
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "instance:", err)
		os.Exit(1)
	}
}

func run(o deploy.Options) error {
	env, err := clusterenv.Load()
	if err != nil {
		return err
	}
	if env.Mode != clusterenv.Full {
		return fmt.Errorf("the e2e environment at %s is %q, not full (run e2e/cluster.sh up)", env.State, env.Mode)
	}
	o.AgentImage = env.AgentImage
	o.UseHarness(env)
	if o.ListenPort == 0 {
		l, err := net.Listen("tcp", ":0")
		if err != nil {
			return fmt.Errorf("find a free port: %w", err)
		}
		o.ListenPort = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	root, err := bundle.Root()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "image-prefetcher-instance-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	out, err := deploy.Build(root, tmp, o)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}
