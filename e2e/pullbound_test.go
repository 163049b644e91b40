package e2e_test

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// The cluster-wide pull bound on the real cluster: two instances, each with
// components/max-concurrent-nodes at K = 1, pull their lists through their
// slot Lease under the component's namespaced RBAC, both complete, and both
// slots are free afterwards.
func TestScenarioPullBoundKOne(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx := ctxFor(t, 5*time.Minute)
	_, images := env.CRI(t)
	listA := refs(t, env, "e2e/small:00", "e2e/small:01", "e2e/small:02")
	listB := refs(t, env, "e2e/small:03", "e2e/small:04", "e2e/small:05")
	removeImages(ctx, t, images, append(append([]string{}, listA...), listB...))

	var instances []*instance
	for _, l := range []struct {
		base string
		list []string
	}{{"bound-a", listA}, {"bound-b", listB}} {
		in := newInstance(t, env, l.base, l.list, "max-concurrent-nodes")
		// After the component's --max-concurrent-nodes=10: the last flag wins.
		in.opts.ExtraArgs = []string{"--max-concurrent-nodes=1"}
		instances = append(instances, in)
		in.apply()
	}
	for _, in := range instances {
		in.requireRollout(3 * time.Minute)
		in.waitLabel(ctx, "succeeded")
	}
	requireAllPresent(ctx, t, images, append(append([]string{}, listA...), listB...))

	for _, in := range instances {
		leases, err := in.cs.CoordinationV1().Leases(in.opts.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("list leases of %s: %v", in.name(), err)
		}
		var slots []string
		for _, l := range leases.Items {
			if !strings.HasPrefix(l.Name, in.name()+"-pull-slot-") {
				continue
			}
			slots = append(slots, l.Name)
			if h := l.Spec.HolderIdentity; h != nil && *h != "" {
				t.Errorf("slot %s/%s still held by %q after the pass", in.opts.Namespace, l.Name, *h)
			}
		}
		if len(slots) != 1 || slots[0] != in.name()+"-pull-slot-0" {
			t.Errorf("instance %s with K = 1 has slot Leases %v, want exactly %s-pull-slot-0\n%s", in.name(), slots, in.name(), in.diagnose())
		}
	}
}
