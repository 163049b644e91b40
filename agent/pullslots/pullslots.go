// Package pullslots bounds how many nodes of one prefetcher instance pull at
// the same time, cluster-wide. It is a counting semaphore of K slots, each slot
// a coordination.k8s.io/v1 Lease named <instance>-pull-slot-<i> (i < K) in the
// instance's namespace, held by a node name.
//
// A node takes a slot by writing its name as the Lease's holder with an
// optimistic-concurrency Update (or a Create for a slot nobody made yet): of
// two nodes racing for one slot the API server lets exactly one win. The
// holder renews the Lease every third of its duration while it pulls and
// clears the holder right after. A slot whose holder stopped renewing (a dead
// node) is taken over once the Lease has not changed for its whole duration,
// measured on the waiter's own clock, so skewed node clocks cannot steal a
// live slot.
//
// Waiters do not poll: a client-go informer lists the slots once and follows
// a watch on them (wait.go). When a slot frees, each waiter delays its claim
// by a random fraction of ClaimJitter and looks again, so the first to wake
// usually wins alone and the others see the slot taken instead of all writing
// at once. The holder's renewals and release are in hold.go.
//
// Seeding (Semaphore.Seed): a new list is pulled by one node first, alone. Slot
// 0 is then also the seed slot: while its Lease does not carry the list's
// digest in SeededAnnotation, slot 0 is the only one a node may take, and the
// node that holds it writes the annotation when it frees the slot at the end
// of a pass that ran to its end (a pass cut short seeds nothing: the next
// holder of slot 0 seeds). From then on every slot is open for that list.
// With a pull-through mirror between the nodes and the registry, the first
// node fills the mirror and the registry serves a rollout about what one
// node's pull costs, whatever the number of nodes.
package pullslots

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	coordinationclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/clock"
)

// Labels put on every slot Lease; waiters list and watch by them.
const (
	LabelName      = "app.kubernetes.io/name"
	LabelInstance  = "app.kubernetes.io/instance"
	LabelComponent = "app.kubernetes.io/component"
	nameValue      = "image-prefetcher"
	componentValue = "pull-slot"
)

// Defaults of the Semaphore's optional fields.
const (
	DefaultLeaseDuration  = 30 * time.Second
	DefaultStartJitter    = 2 * time.Second
	DefaultClaimJitter    = 500 * time.Millisecond
	DefaultReleaseTimeout = 5 * time.Second
	// MaxLeaseDuration bounds LeaseDuration. Waiters also never trust a
	// holder's Lease for longer than their own LeaseDuration, so one agent
	// writing a huge leaseDurationSeconds cannot stall every other node's
	// pulls (components/max-concurrent-nodes' admission policy refuses it
	// too, with the same bound).
	MaxLeaseDuration = 5 * time.Minute
)

// ProcessAnnotation on a held slot names the process of the holder node that
// holds it (Semaphore.Process).
const ProcessAnnotation = "image-prefetcher.stackrox.io/holder-process"

// SeededAnnotation on slot 0 is the digest of the list a node has pulled alone
// first (Semaphore.Seed).
const SeededAnnotation = "image-prefetcher.stackrox.io/seeded-list"

// ErrLost is logged when a held slot was taken over by another node (this
// node's renewals did not reach the API server for a whole lease duration).
var ErrLost = errors.New("pull slot lost to another node")

// Semaphore is the cluster-wide bound. The exported fields are its
// configuration; set them before the first Acquire.
type Semaphore struct {
	Client    coordinationclient.LeasesGetter
	Namespace string
	Instance  string
	// Holder is this node's name, written as the Lease's holderIdentity.
	Holder string
	// Process names this process among those of the instance on the node
	// (run, a fetch beside it), written as the ProcessAnnotation of a slot
	// it holds: another process of the node waits for that slot like any
	// other node's instead of taking it over, and only its holder frees it.
	// Empty: the node's processes are not told apart.
	Process string
	// Slots is K, how many nodes may pull at once.
	Slots int
	// Seed makes one node pull a new list alone before the others take
	// slots (see the package documentation).
	Seed bool

	// LeaseDuration is how long a slot stays held without renewal.
	LeaseDuration time.Duration
	// StartJitter spreads the first request of many nodes that start
	// together (a DaemonSet rollout, a new list): a random wait in [0, StartJitter).
	StartJitter time.Duration
	// ClaimJitter spreads the claims of waiters that see the same slot free;
	// it doubles for a waiter with each race it loses, up to 8 times.
	ClaimJitter time.Duration
	// ReleaseTimeout bounds the release, which runs even after shutdown
	// began (on a context detached from the caller's).
	ReleaseTimeout time.Duration

	Log   *slog.Logger
	Clock clock.WithTicker
	// Rand returns a number in [0, 1); for tests.
	Rand func() float64
}

// New checks the configuration and fills the defaults.
func New(s Semaphore) (*Semaphore, error) {
	if s.Client == nil {
		return nil, errors.New("pull slots: no Kubernetes client")
	}
	if s.Slots <= 0 {
		return nil, fmt.Errorf("pull slots: %d slots, need at least 1", s.Slots)
	}
	if s.Namespace == "" {
		return nil, errors.New("pull slots: no namespace (set --namespace or $POD_NAMESPACE)")
	}
	if s.Holder == "" {
		return nil, errors.New("pull slots: no holder (node name)")
	}
	if errs := validation.IsDNS1123Label(s.Namespace); len(errs) > 0 {
		return nil, fmt.Errorf("pull slots: namespace %q: %s", s.Namespace, strings.Join(errs, "; "))
	}
	// The highest slot's name is the longest.
	if errs := validation.IsDNS1123Subdomain(slotName(s.Instance, s.Slots-1)); len(errs) > 0 || s.Instance == "" {
		return nil, fmt.Errorf("pull slots: instance %q does not make a valid Lease name: %s", s.Instance, strings.Join(errs, "; "))
	}
	if errs := validation.IsValidLabelValue(s.Instance); len(errs) > 0 {
		return nil, fmt.Errorf("pull slots: instance %q is not a label value: %s", s.Instance, strings.Join(errs, "; "))
	}
	if s.LeaseDuration == 0 {
		s.LeaseDuration = DefaultLeaseDuration
	}
	if s.LeaseDuration < 3*time.Second || s.LeaseDuration > MaxLeaseDuration {
		return nil, fmt.Errorf("pull slots: lease duration %s is not within [3s, %s]", s.LeaseDuration, MaxLeaseDuration)
	}
	if s.StartJitter < 0 || s.ClaimJitter < 0 {
		return nil, errors.New("pull slots: negative jitter")
	}
	if s.ReleaseTimeout <= 0 {
		s.ReleaseTimeout = DefaultReleaseTimeout
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.Clock == nil {
		s.Clock = clock.RealClock{}
	}
	if s.Rand == nil {
		s.Rand = rand.Float64
	}
	return &s, nil
}

func slotName(instance string, i int) string {
	return instance + "-pull-slot-" + strconv.Itoa(i)
}

// selector matches the slot Leases of this instance.
func (s *Semaphore) selector() string {
	return labels.SelectorFromSet(labels.Set{LabelName: nameValue, LabelInstance: s.Instance, LabelComponent: componentValue}).String()
}

func (s *Semaphore) jitter(max time.Duration) time.Duration {
	if max <= 0 {
		return 0
	}
	return time.Duration(s.Rand() * float64(max))
}

// sleep waits d on the semaphore's clock, or until ctx is done.
func (s *Semaphore) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := s.Clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// Acquire blocks until this node holds a slot for the list with digest list,
// then returns the function that gives it back. The slot is renewed in the
// background until release. release is safe to call more than once and after
// ctx is done: it uses its own ReleaseTimeout on a context detached from ctx,
// so a shutdown still frees the slot at once instead of leaving it to expire.
// With Seed, the holder of an unseeded list's seed slot marks the list seeded
// when it releases the slot while ctx is not done (its pass ran to its end).
func (s *Semaphore) Acquire(ctx context.Context, list string) (release func(), err error) {
	start := s.Clock.Now()
	if err := s.sleep(ctx, s.jitter(s.StartJitter)); err != nil {
		return nil, err
	}
	w := &waiter{s: s, slots: make([]slotState, s.Slots), list: list}
	held, err := w.wait(ctx)
	if err != nil {
		return nil, err
	}
	seed := ""
	if w.seeding() && held.Annotations[SeededAnnotation] != list {
		seed = list
		s.Log.Info("pull slot acquired: this node pulls the list first, alone; the others wait until it has",
			"lease", held.Name, "list", list, "waited", s.Clock.Since(start).Round(time.Millisecond))
	} else {
		s.Log.Info("pull slot acquired", "lease", held.Name, "waited", s.Clock.Since(start).Round(time.Millisecond))
	}
	return s.hold(ctx, held, seed), nil
}

// permanent reports errors that waiting does not cure (missing RBAC, a
// missing namespace, a rejected object): the pass fails and says why instead
// of waiting for a slot forever.
func permanent(err error) bool {
	return apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) || apierrors.IsInvalid(err) ||
		apierrors.IsBadRequest(err) || apierrors.IsMethodNotSupported(err) ||
		apierrors.IsNotFound(err) // from Create: the namespace does not exist
}
