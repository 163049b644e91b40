package app

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"

	"github.com/nodeprefetch/image-prefetcher/agent/pullslots"
)

// PullSlotOptions are the flags of the cluster-wide pull bound
// (agent/pullslots); embedded in Options.
type PullSlotOptions struct {
	// MaxConcurrentNodes is K, the nodes of this instance that may pull at
	// once; 0 leaves pulls unbounded (no Leases, no API calls for them).
	MaxConcurrentNodes    int
	Namespace             string
	PullSlotLeaseDuration time.Duration
	// SeedFirst: one node pulls a new list alone before the others take slots.
	SeedFirst bool
}

func defaultPullSlotOptions() PullSlotOptions {
	return PullSlotOptions{
		Namespace:             os.Getenv("POD_NAMESPACE"),
		PullSlotLeaseDuration: pullslots.DefaultLeaseDuration,
	}
}

func (o *PullSlotOptions) addFlags(fs *pflag.FlagSet) {
	fs.IntVar(&o.MaxConcurrentNodes, "max-concurrent-nodes", o.MaxConcurrentNodes,
		"Nodes of this instance that pull at the same time, cluster-wide, through Leases <instance>-pull-slot-<i> in --namespace; 0 means unbounded. A node whose images are all present takes no slot.")
	fs.StringVar(&o.Namespace, "namespace", o.Namespace, "Namespace of this instance, where the pull slot Leases live (default: $POD_NAMESPACE).")
	fs.DurationVar(&o.PullSlotLeaseDuration, "pull-slot-lease-duration", o.PullSlotLeaseDuration,
		"How long a pull slot stays held without renewal (renewed every third of it while pulling); a dead node's slot is free after this.")
	fs.BoolVar(&o.SeedFirst, "seed-first", o.SeedFirst,
		"With --max-concurrent-nodes: one node pulls a new list alone first (it holds slot 0); the others take slots once its pass has ended. With a pull-through mirror in front of the registry, the registry then serves a rollout about what one node's pull costs.")
}

func (o *PullSlotOptions) validate() error {
	if o.MaxConcurrentNodes < 0 {
		return fmt.Errorf("--max-concurrent-nodes=%d: must be 0 (unbounded) or more", o.MaxConcurrentNodes)
	}
	if o.MaxConcurrentNodes == 0 {
		if o.SeedFirst {
			return errors.New("--seed-first needs --max-concurrent-nodes: the first node seeds through the pull slots")
		}
		return nil
	}
	var errs []error
	if o.Namespace == "" {
		errs = append(errs, errors.New("--max-concurrent-nodes needs --namespace (or $POD_NAMESPACE)"))
	}
	if o.PullSlotLeaseDuration < 3*time.Second || o.PullSlotLeaseDuration > pullslots.MaxLeaseDuration {
		errs = append(errs, fmt.Errorf("--pull-slot-lease-duration=%s: must be within [3s, %s]", o.PullSlotLeaseDuration, pullslots.MaxLeaseDuration))
	}
	return errors.Join(errs...)
}

// setupPullSlots installs the cluster-wide bound when --max-concurrent-nodes is
// set. client is the one the labels use; nil (with --label=false) builds one.
func (p *prefetcher) setupPullSlots(client kubernetes.Interface, log *slog.Logger) error {
	o := p.opts
	if o.MaxConcurrentNodes == 0 {
		return nil
	}
	if o.NodeName == "" {
		return errors.New("--max-concurrent-nodes needs --node-name (or $NODE_NAME): it holds the slot")
	}
	if client == nil {
		var err error
		// The slots are the instance's Leases: always as the ServiceAccount
		// (a node may write only its own Lease in kube-node-lease).
		if client, err = kubeClient(o.Kubeconfig, ""); err != nil {
			return err
		}
	}
	sem, err := pullslots.New(pullslots.Semaphore{
		Client:        client.CoordinationV1(),
		Namespace:     o.Namespace,
		Instance:      o.Instance,
		Holder:        o.NodeName,
		Process:       processID,
		Slots:         o.MaxConcurrentNodes,
		Seed:          o.SeedFirst,
		LeaseDuration: o.PullSlotLeaseDuration,
		StartJitter:   pullslots.DefaultStartJitter,
		ClaimJitter:   pullslots.DefaultClaimJitter,
		Log:           log,
	})
	if err != nil {
		return fmt.Errorf("--max-concurrent-nodes: %w", err)
	}
	p.slots = sem
	return nil
}

// processID names this process among the instance's processes on a node
// (run, a fetch beside it), on the pull slot it holds and on its containerd
// leases: its host name (the pod's name, unless the pod uses the host's
// network), process ID (1 in most containers) and start time, so that two
// containers of host-network pods are told apart too.
var processID = func() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s/%d/%d", host, os.Getpid(), time.Now().UnixNano())
}()
