package pullslots

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/nodeprefetch/image-prefetcher/bundle"
	"github.com/nodeprefetch/image-prefetcher/e2e/clusterenv"
)

// The Role that components/max-concurrent-nodes ships is enough for the
// semaphore and no more: against the real API server, as the instance's
// ServiceAccount, two holders share one slot in turn, and Leases of another
// namespace stay out of reach.
func TestComponentRoleIsEnoughAgainstRealAPIServer(t *testing.T) {
	env := clusterenv.Require(t, clusterenv.Full)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := env.Clientset(t)
	ns := fmt.Sprintf("prefetch-rbac-%05d", rand.IntN(100000))
	const instance = "rbac-images"

	root, err := bundle.Root()
	if err != nil {
		t.Fatal(err)
	}
	out, err := bundle.BuildInstance(root, t.TempDir(), bundle.Instance{Flavor: "vanilla", Namespace: ns, Name: instance, Components: []string{"max-concurrent-nodes"}})
	if err != nil {
		t.Fatal(err)
	}
	objs, err := bundle.Objects(out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer ccancel()
		if err := admin.CoreV1().Namespaces().Delete(cctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
	})
	// Only the ServiceAccount, Role and RoleBinding of the build: no DaemonSet
	// on the shared cluster.
	var applied int
	for _, o := range objs {
		switch o.Kind {
		case "ServiceAccount":
			var sa corev1.ServiceAccount
			if err := o.Decode(&sa); err != nil {
				t.Fatal(err)
			}
			_, err = admin.CoreV1().ServiceAccounts(ns).Create(ctx, &sa, metav1.CreateOptions{})
		case "Role":
			var r rbacv1.Role
			if err := o.Decode(&r); err != nil {
				t.Fatal(err)
			}
			_, err = admin.RbacV1().Roles(ns).Create(ctx, &r, metav1.CreateOptions{})
		case "RoleBinding":
			var rb rbacv1.RoleBinding
			if err := o.Decode(&rb); err != nil {
				t.Fatal(err)
			}
			_, err = admin.RbacV1().RoleBindings(ns).Create(ctx, &rb, metav1.CreateOptions{})
		default:
			continue
		}
		if err != nil {
			t.Fatalf("create %s: %v", o.Key(), err)
		}
		applied++
	}
	if applied != 3 {
		t.Fatalf("applied %d of ServiceAccount, Role, RoleBinding", applied)
	}

	tok, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, instance, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := env.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	// Only the token: a client certificate would win over it.
	saCfg := &rest.Config{Host: cfg.Host, BearerToken: tok.Status.Token, TLSClientConfig: rest.TLSClientConfig{CAData: cfg.CAData, CAFile: cfg.CAFile}}
	sa := kubernetes.NewForConfigOrDie(saCfg)

	mk := func(holder string) *Semaphore {
		s, err := New(Semaphore{
			Client: sa.CoordinationV1(), Namespace: ns, Instance: instance, Holder: holder, Slots: 1,
			ClaimJitter: 50 * time.Millisecond,
			Log:         slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("node", holder),
		})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	a, b := mk("node-a"), mk("node-b")
	ra, err := a.Acquire(ctx, "")
	if err != nil {
		t.Fatalf("acquire as the ServiceAccount: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		rb, err := b.Acquire(ctx, "")
		if err == nil {
			rb()
		}
		got <- err
	}()
	time.Sleep(500 * time.Millisecond) // b lists and watches meanwhile
	ra()
	if err := <-got; err != nil {
		t.Fatalf("second holder: %v", err)
	}
	le, err := admin.CoordinationV1().Leases(ns).Get(ctx, instance+"-pull-slot-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := ptr.Deref(le.Spec.HolderIdentity, ""); h != "" || ptr.Deref(le.Spec.LeaseTransitions, 0) != 1 {
		t.Errorf("after both released: holder %q transitions %d, want empty and 1", h, ptr.Deref(le.Spec.LeaseTransitions, 0))
	}
	if _, err := sa.CoordinationV1().Leases(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list leases in default as the agent: %v, want Forbidden", err)
	}
	if err := sa.CoordinationV1().Leases(ns).Delete(ctx, le.Name, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("delete a slot as the agent: %v, want Forbidden", err)
	}
}
