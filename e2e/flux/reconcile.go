// Package flux reconciles a Flux Kustomization against a real cluster with Flux's own libraries,
// in the steps kustomize-controller takes: generate the kustomization
// (github.com/fluxcd/pkg/kustomize), build it without plugins or remote bases, apply the objects
// server-side in stages under the controller's field manager and owner labels
// (github.com/fluxcd/pkg/ssa), garbage-collect what left the set, and wait for every applied
// object with kstatus. The versions in go.mod are the ones kustomize-controller v1.9.6 is built
// with, so the e2e tests see what that controller would do to the bundle.
//
// It is not a controller: no watch, no requeue, no status patching. The e2e tests call Reconcile
// where the controller would be triggered by a new source revision.
package flux

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fluxcd/cli-utils/pkg/kstatus/polling"
	"github.com/fluxcd/cli-utils/pkg/object"
	kustomizev1 "github.com/fluxcd/kustomize-controller/api/v1"
	"github.com/fluxcd/pkg/kustomize"
	"github.com/fluxcd/pkg/ssa"
	"github.com/fluxcd/pkg/ssa/normalize"
	ssautil "github.com/fluxcd/pkg/ssa/utils"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
)

// ControllerName is kustomize-controller's field manager: objects applied here carry the same
// managed fields as the controller's, so a cluster can move between the two without conflicts.
const ControllerName = "kustomize-controller"

// DefaultWaitInterval is how often kustomize-controller polls the health of the applied objects.
const DefaultWaitInterval = 5 * time.Second

// Reconciler applies one Kustomization. It keeps the inventory of what it applied last, as the
// controller keeps it in the Kustomization's status, to know what to prune.
type Reconciler struct {
	obj     *kustomizev1.Kustomization
	manager *ssa.ResourceManager
	// WaitInterval is the kstatus polling interval of the health check (DefaultWaitInterval).
	WaitInterval time.Duration
	inventory    []ssa.ChangeSetEntry
}

// Result says what one reconciliation did and how long each step took.
type Result struct {
	// Applied holds every object of the build with its action (created, configured, unchanged).
	Applied *ssa.ChangeSet
	// Pruned holds the objects of the previous inventory that were deleted.
	Pruned *ssa.ChangeSet
	// Build, Apply, Prune and Health are the durations of the steps (Health is zero without wait).
	Build, Apply, Prune, Health time.Duration
}

// Total is the time of the whole reconciliation.
func (r Result) Total() time.Duration { return r.Build + r.Apply + r.Prune + r.Health }

func (r Result) String() string {
	return fmt.Sprintf("build %s, apply %s, prune %s, health %s, total %s",
		r.Build.Round(time.Millisecond), r.Apply.Round(time.Millisecond), r.Prune.Round(time.Millisecond),
		r.Health.Round(time.Millisecond), r.Total().Round(time.Millisecond))
}

// New returns a Reconciler for obj (its name and namespace become the owner labels; spec.path,
// prune, wait, timeout and force are honoured) on the cluster of cfg.
func New(cfg *rest.Config, obj *kustomizev1.Kustomization) (*Reconciler, error) {
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("kustomization %s: http client: %w", obj.Name, err)
	}
	// A dynamic mapper: the build creates the namespace its objects live in, and kinds are
	// resolved as they are met.
	mapper, err := apiutil.NewDynamicRESTMapper(cfg, httpClient)
	if err != nil {
		return nil, fmt.Errorf("kustomization %s: rest mapper: %w", obj.Name, err)
	}
	c, err := client.New(cfg, client.Options{HTTPClient: httpClient, Mapper: mapper})
	if err != nil {
		return nil, fmt.Errorf("kustomization %s: client: %w", obj.Name, err)
	}
	poller := polling.NewStatusPoller(c, mapper, polling.Options{})
	manager := ssa.NewResourceManager(c, poller, ssa.Owner{
		Field: ControllerName,
		Group: kustomizev1.GroupVersion.Group,
	})
	return &Reconciler{obj: obj.DeepCopy(), manager: manager, WaitInterval: DefaultWaitInterval}, nil
}

// Client is the controller-runtime client the reconciler applies with.
func (r *Reconciler) Client() client.Client { return r.manager.Client() }

// OwnerLabels are the labels the reconciler puts on every object it applies; pruning deletes only
// objects that carry them.
func (r *Reconciler) OwnerLabels() map[string]string {
	return r.manager.GetOwnerLabels(r.obj.Name, r.obj.Namespace)
}

// Reconcile builds spec.path of source (a directory laid out like the source artifact: a Git
// checkout or an OCI artifact's content), applies the result, prunes what the previous
// reconciliation applied and this one does not, and, with spec.wait, waits until every applied
// object is ready or spec.timeout passes. Errors name the step, as the Kustomization's Ready
// condition does.
func (r *Reconciler) Reconcile(ctx context.Context, source string) (Result, error) {
	var res Result
	start := time.Now()
	objects, err := Build(r.obj, source)
	res.Build = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("kustomization %s: build: %w", r.obj.Name, err)
	}

	start = time.Now()
	applied, err := r.apply(ctx, objects)
	res.Apply = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("kustomization %s: apply: %w", r.obj.Name, err)
	}
	res.Applied = applied

	start = time.Now()
	pruned, err := r.prune(ctx, applied)
	res.Prune = time.Since(start)
	res.Pruned = pruned
	if err != nil {
		return res, fmt.Errorf("kustomization %s: prune: %w", r.obj.Name, err)
	}

	if !r.obj.Spec.Wait {
		return res, nil
	}
	start = time.Now()
	err = r.manager.WaitForSetWithContext(ctx, readySet(applied), ssa.WaitOptions{
		Interval: r.WaitInterval,
		Timeout:  r.obj.GetTimeout(),
	})
	res.Health = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("kustomization %s: health check failed after %s: %w", r.obj.Name, res.Health.Round(time.Millisecond), err)
	}
	return res, nil
}

// Build is the build step of a reconciliation of obj: it copies source into a fresh directory (the
// generator may write the kustomization file, and the controller never changes its source either),
// generates the kustomization for spec.path and builds it with plugins and remote bases off.
func Build(obj *kustomizev1.Kustomization, source string) ([]*unstructured.Unstructured, error) {
	path := filepath.Clean(obj.Spec.Path)
	if !filepath.IsLocal(path) {
		return nil, fmt.Errorf("spec.path %q leaves the source", obj.Spec.Path)
	}
	root, err := os.MkdirTemp("", "flux-source-")
	if err != nil {
		return nil, fmt.Errorf("source copy: %w", err)
	}
	defer os.RemoveAll(root)
	if err := os.CopyFS(root, os.DirFS(source)); err != nil {
		return nil, fmt.Errorf("source copy of %s: %w", source, err)
	}
	dir := filepath.Join(root, path)

	spec, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, fmt.Errorf("kustomization to unstructured: %w", err)
	}
	if _, err := kustomize.NewGenerator(root, unstructured.Unstructured{Object: spec}).WriteFile(dir); err != nil {
		return nil, fmt.Errorf("generate %s: %w", obj.Spec.Path, err)
	}
	m, err := kustomize.SecureBuild(root, dir, false)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", obj.Spec.Path, err)
	}
	yaml, err := m.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", obj.Spec.Path, err)
	}
	objects, err := ssautil.ReadObjects(bytes.NewReader(yaml))
	if err != nil {
		return nil, fmt.Errorf("decode build of %s: %w", obj.Spec.Path, err)
	}
	return objects, nil
}

// apply applies objects in the controller's stages (CRDs and namespaces, then class definitions,
// then the rest), owned by the Kustomization.
func (r *Reconciler) apply(ctx context.Context, objects []*unstructured.Unstructured) (*ssa.ChangeSet, error) {
	if err := normalize.UnstructuredList(objects); err != nil {
		return nil, fmt.Errorf("normalize: %w", err)
	}
	r.manager.SetOwnerLabels(objects, r.obj.Name, r.obj.Namespace)
	opts := ssa.DefaultApplyOptions()
	opts.Force = r.obj.Spec.Force
	set := ssa.NewChangeSet()
	if len(objects) == 0 {
		return set, nil
	}
	cs, err := r.manager.ApplyAllStaged(ctx, objects, opts)
	if cs != nil {
		set.Append(cs.Entries)
	}
	if err != nil {
		// Partly applied: say what went through, as the controller's message does.
		return nil, fmt.Errorf("%w\napplied before the error:\n%s", err, set.String())
	}
	return set, nil
}

// prune deletes (with spec.prune) the objects of the previous inventory that are not in applied,
// and only those carrying this Kustomization's owner labels; the inventory becomes applied.
func (r *Reconciler) prune(ctx context.Context, applied *ssa.ChangeSet) (*ssa.ChangeSet, error) {
	current := applied.ToObjMetadataSet()
	var stale []*unstructured.Unstructured
	for _, e := range r.inventory {
		if current.Contains(e.ObjMetadata) {
			continue
		}
		stale = append(stale, EntryObject(e))
	}
	previous := r.inventory
	r.inventory = applied.Entries
	if !r.obj.Spec.Prune || len(stale) == 0 {
		return ssa.NewChangeSet(), nil
	}
	cs, err := r.manager.DeleteAll(ctx, stale, ssa.DeleteOptions{
		PropagationPolicy: metav1.DeletePropagationBackground,
		Inclusions:        r.OwnerLabels(),
	})
	if err != nil {
		// Keep what could not be deleted in the inventory, so the next reconciliation tries again.
		deleted := object.ObjMetadataSet{}
		if cs != nil {
			deleted = cs.ToObjMetadataSet()
		}
		for _, e := range previous {
			if !current.Contains(e.ObjMetadata) && !deleted.Contains(e.ObjMetadata) {
				r.inventory = append(r.inventory, e)
			}
		}
		return cs, err
	}
	return cs, nil
}

// Delete removes every object of the inventory, as the controller's finalizer does for a deleted
// Kustomization with spec.prune, and waits until they are gone or ctx ends.
func (r *Reconciler) Delete(ctx context.Context, interval time.Duration) (*ssa.ChangeSet, error) {
	var objects []*unstructured.Unstructured
	for _, e := range r.inventory {
		objects = append(objects, EntryObject(e))
	}
	cs, err := r.manager.DeleteAll(ctx, objects, ssa.DeleteOptions{
		PropagationPolicy: metav1.DeletePropagationBackground,
		Inclusions:        r.OwnerLabels(),
	})
	if err != nil {
		return cs, fmt.Errorf("kustomization %s: delete: %w", r.obj.Name, err)
	}
	r.inventory = nil
	deadline, ok := ctx.Deadline()
	if !ok {
		return cs, errors.New("delete: the context needs a deadline for the termination wait")
	}
	if err := r.manager.WaitForSetTermination(cs, ssa.WaitOptions{Interval: interval, Timeout: time.Until(deadline)}); err != nil {
		return cs, fmt.Errorf("kustomization %s: %w", r.obj.Name, err)
	}
	return cs, nil
}

// readySet is what the health check waits for: every applied object but those the apply skipped.
func readySet(cs *ssa.ChangeSet) object.ObjMetadataSet {
	var set object.ObjMetadataSet
	for _, e := range cs.Entries {
		if e.Action != ssa.SkippedAction {
			set = append(set, e.ObjMetadata)
		}
	}
	return set
}

// EntryObject is the object of a change set entry, with what a Get or Delete needs: kind,
// group and version (an entry's GroupVersion holds only the version), name and namespace.
func EntryObject(e ssa.ChangeSetEntry) *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(schema.GroupVersionKind{
		Group:   e.ObjMetadata.GroupKind.Group,
		Version: e.GroupVersion,
		Kind:    e.ObjMetadata.GroupKind.Kind,
	})
	u.SetName(e.ObjMetadata.Name)
	u.SetNamespace(e.ObjMetadata.Namespace)
	return u
}
