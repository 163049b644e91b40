package app

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/nodeprefetch/image-prefetcher/agent/diskbudget"
	"github.com/nodeprefetch/image-prefetcher/agent/nodelabel"
	"github.com/nodeprefetch/image-prefetcher/agent/pull"
)

// Options are the flags shared by `run` and `fetch`. Names and defaults that
// the reference tool also has are kept, so existing manifests keep working.
type Options struct {
	Instance  string
	NodeName  string
	ImageList string

	CRISocket   string
	HostRoot    string
	DialTimeout time.Duration

	DockerConfigs      []string
	CredProviderConfig string
	CredProviderBinDir string

	// Pull is the pull engine's configuration; it registers and checks its
	// own flags.
	Pull                    pull.Config
	PullProgressLogInterval time.Duration
	// DiskBudget bounds how full a prefetch may make the image filesystem.
	DiskBudget diskbudget.Config
	// MaxResumeBytes bounds what the leases of failed images keep across
	// passes for a resume; zero: only the disk budget bounds it.
	MaxResumeBytes resource.QuantityValue

	Label      bool
	Kubeconfig string
	// ActAsNode writes the node's prefetch state as the node itself
	// (constrained impersonation, associated-node).
	ActAsNode         bool
	LabelWriteTimeout time.Duration
	Log               LogOptions
	// Run holds the flags of `run` alone; nil for `fetch`.
	Run *RunOptions

	PullSlotOptions
	NodeGateOptions

	// PinImages pins the listed images on containerd (see agent/pin).
	PinImages bool
	// ReleasePins lets `fetch` release this instance's pins of images not in
	// its list (all of them with --pin-images=false). `run`, the instance's
	// owner on the node, always does; a fetch beside it must not undo its
	// pins, so it only adds pins unless told.
	ReleasePins bool

	// Collector: the results collector the attempts are sent to.
	Collector CollectorOptions
}

func defaultOptions() *Options {
	return &Options{
		Instance:                os.Getenv("INSTANCE"),
		NodeName:                os.Getenv("NODE_NAME"),
		ImageList:               "/etc/image-prefetcher/images.txt",
		HostRoot:                "/host",
		DialTimeout:             5 * time.Second,
		Pull:                    pull.DefaultConfig(),
		DiskBudget:              diskbudget.DefaultConfig(),
		PullProgressLogInterval: 10 * time.Second,
		Label:                   true,
		Kubeconfig:              os.Getenv("KUBECONFIG"),
		LabelWriteTimeout:       30 * time.Second,
		Log:                     defaultLogOptions(),
		PullSlotOptions:         defaultPullSlotOptions(),
		NodeGateOptions:         defaultNodeGateOptions(),
		Collector:               defaultCollectorOptions(),
	}
}

// RunOptions are the flags of the `run` command alone: its re-check loop and
// its HTTP server.
type RunOptions struct {
	RecheckInterval time.Duration
	ListenAddress   string
}

func defaultRunOptions() *RunOptions {
	return &RunOptions{RecheckInterval: 5 * time.Minute, ListenAddress: ":9477"}
}

func (o *RunOptions) addFlags(fs *pflag.FlagSet) {
	fs.DurationVar(&o.RecheckInterval, "recheck-interval", o.RecheckInterval, "How often presence is re-checked and missing images re-pulled (e.g. after kubelet image GC).")
	fs.StringVar(&o.ListenAddress, "listen-address", o.ListenAddress, "Address of the /healthz, /readyz and /metrics server; empty disables it.")
}

func (o *RunOptions) validate() error {
	if o.RecheckInterval <= 0 {
		return fmt.Errorf("--recheck-interval=%s: must be positive", o.RecheckInterval)
	}
	return nil
}

func (o *Options) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Instance, "instance", o.Instance, "Instance name; the node label key is image-prefetcher.stackrox.io/<instance> (default: $INSTANCE).")
	fs.StringVar(&o.NodeName, "node-name", o.NodeName, "Name of the Node this agent runs on (default: $NODE_NAME).")
	fs.StringVar(&o.ImageList, "image-list-file", o.ImageList, "File with one image reference per line; # starts a comment.")
	fs.StringVar(&o.CRISocket, "cri-socket", o.CRISocket, "CRI socket path or unix:// URL. Empty: detect containerd, CRI-O, k3s/rke2 or cri-dockerd under --host-root.")
	fs.StringVar(&o.HostRoot, "host-root", o.HostRoot, "Where the host's socket directories (for CRI socket detection) and the runtime's image filesystem (for --disk-budget-percent) are mounted.")
	fs.DurationVar(&o.DialTimeout, "cri-dial-timeout", o.DialTimeout, "How long to wait for the CRI runtime to answer before the pass fails.")
	fs.StringArrayVar(&o.DockerConfigs, "docker-config", o.DockerConfigs, "Docker config file (.dockerconfigjson or .dockercfg) with pull credentials; repeatable.")
	fs.StringVar(&o.CredProviderConfig, "image-credential-provider-config", o.CredProviderConfig, "Kubelet CredentialProviderConfig file for credential provider plugins.")
	fs.StringVar(&o.CredProviderBinDir, "image-credential-provider-bin-dir", o.CredProviderBinDir, "Directory holding the credential provider plugin binaries.")
	o.Pull.AddFlags(fs)
	o.DiskBudget.AddFlags(fs)
	fs.Var(&o.MaxResumeBytes, "max-resume-bytes", "On containerd: what the leases of images that failed may keep, in all, for the next pass to resume from (a quantity: 10Gi); beyond it the oldest are let go at the end of a pass. 0: no fixed bound. All are let go whenever the image filesystem is at --disk-budget-percent.")
	fs.DurationVar(&o.PullProgressLogInterval, "pull-progress-log-interval", o.PullProgressLogInterval, "How often each image being pulled gets a progress log line (bytes, total when known, rate), when progress is followed; 0 disables the lines.")
	fs.BoolVar(&o.Label, "label", o.Label, "Write the node label and events; --label=false pulls only (no Kubernetes API needed).")
	fs.BoolVar(&o.PinImages, "pin-images", o.PinImages, "Pin the listed images on containerd (label io.cri-containerd.pinned, set through containerd's images API on the CRI socket) so the kubelet's image GC keeps them. Each pass lets go of the images this instance pinned that left the list, and of all of them with --pin-images=false. Needs --instance; fails on runtimes without that API (CRI-O: use its pinned_images).")
	fs.BoolVar(&o.ActAsNode, "act-as-node", o.ActAsNode, "Write the node's label, list annotation, condition and events as the node itself (system:node:<node-name>, through the constrained impersonation of Kubernetes 1.36+, mode associated-node): the ServiceAccount then holds no node or event RBAC of its own and NodeRestriction applies. A node cannot remove its own taints, so not with --startup-taint: let the node-readiness-controller remove a readiness.k8s.io/<instance> taint from the condition (--node-condition) instead.")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig, "Kubeconfig for the API server (default: $KUBECONFIG, else the in-cluster config).")
	fs.DurationVar(&o.LabelWriteTimeout, "label-write-timeout", o.LabelWriteTimeout, "Time budget of each node label write (and of the events), separate from the pass's: transient API errors (server down, 5xx, 429, conflicts) are retried until it is spent.")
	o.Log.addFlags(fs)
	o.PullSlotOptions.addFlags(fs)
	o.NodeGateOptions.addFlags(fs)
	o.Collector.addFlags(fs)
	if o.Run != nil {
		o.Run.addFlags(fs)
	} else {
		fs.BoolVar(&o.ReleasePins, "release-pins", o.ReleasePins, "Also release this instance's pins of images not in the list (all of them with --pin-images=false), as run does: for removing pins where no DaemonSet runs. Without it fetch only adds pins, so it never undoes those of a run beside it.")
	}
}

func (o *Options) validate() error {
	var errs []error
	// The instance also names the pull slot Leases and the collector's
	// results, so a bad name is a usage error with --label=false too; only an
	// unset one is allowed there. It is checked first: its error is then the
	// first line a crash-looping pod logs.
	if o.Label || o.Instance != "" {
		if err := nodelabel.ValidateInstance(o.Instance); err != nil {
			errs = append(errs, fmt.Errorf("--instance: %w", err))
		}
	}
	if o.Label && o.NodeName == "" {
		errs = append(errs, errors.New("--node-name is empty and $NODE_NAME is unset"))
	}
	if o.ActAsNode && !o.Label {
		errs = append(errs, errors.New("--act-as-node needs --label: it is the identity of the node writes"))
	}
	if o.ActAsNode && o.StartupTaint {
		errs = append(errs, errors.New("--act-as-node and --startup-taint: a node may not change its own taints (NodeRestriction); "+
			"leave the taint to the node-readiness-controller (key readiness.k8s.io/<instance>, from --node-condition) or drop --act-as-node"))
	}
	if o.PinImages && o.Instance == "" {
		errs = append(errs, errors.New("--pin-images needs --instance: each instance records the pins it set"))
	}
	if o.ImageList == "" {
		errs = append(errs, errors.New("--image-list-file is empty"))
	}
	if err := o.Pull.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := o.DiskBudget.Validate(); err != nil {
		errs = append(errs, err)
	}
	if o.MaxResumeBytes.Sign() < 0 {
		errs = append(errs, fmt.Errorf("--max-resume-bytes=%s: must not be negative", o.MaxResumeBytes.String()))
	}
	if o.PullProgressLogInterval < 0 {
		errs = append(errs, fmt.Errorf("--pull-progress-log-interval=%s: must not be negative (0 disables the lines)", o.PullProgressLogInterval))
	}
	if o.LabelWriteTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--label-write-timeout=%s: must be positive", o.LabelWriteTimeout))
	}
	if o.Run != nil {
		if err := o.Run.validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := o.NodeGateOptions.validate(o.Label, o.Instance); err != nil {
		errs = append(errs, err)
	}
	if err := o.PullSlotOptions.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := o.Collector.validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := o.Log.newLogger(io.Discard); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
