package collector

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/utils/clock"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	authenticationv1client "k8s.io/client-go/kubernetes/typed/authentication/v1"
)

// DefaultAudience is the audience of the tokens agents send to the
// collector: the projected serviceAccountToken volume of
// components/metrics-collector asks the kubelet for it. A token of this
// audience is refused by the API server (which accepts only its own), and
// the collector refuses the agents' ordinary API tokens.
const DefaultAudience = "image-prefetcher.stackrox.io/results-collector"

// NodeNameExtra is the user extra a pod-bound ServiceAccount token carries:
// the Node of the pod the kubelet issued the token for.
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// DefaultReviewCacheTTL is how long an accepted token is trusted without a
// new TokenReview. The kubelet replaces a projected token at 80 % of its
// lifetime (at least 10 minutes), so one review per agent and minute is the
// whole load of a fleet on the API server; a token revoked by deleting its
// pod is refused at most this long after.
const DefaultReviewCacheTTL = time.Minute

// maxCachedReviews bounds the cache: only accepted tokens enter it, so it
// holds about one entry per agent pod and rotation.
const maxCachedReviews = 10000

// Identity is who sent a Submit call, as the API server vouched for it.
type Identity struct {
	// Username is the ServiceAccount's user name,
	// system:serviceaccount:<namespace>:<name>.
	Username string
	// Node is the Node of the pod the token is bound to: the only node the
	// caller may report attempts of.
	Node string
}

// Authenticator checks the bearer token of a Submit call.
type Authenticator interface {
	// Authenticate returns the caller's identity, or an error wrapping
	// ErrUnauthenticated (the token proves nothing), ErrForbidden (it proves
	// a caller that may not write) or neither (the check itself failed).
	Authenticate(ctx context.Context, token string) (Identity, error)
}

// Errors of Authenticator.
var (
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrForbidden       = errors.New("forbidden")
)

// TokenReviewer is an Authenticator that asks the API server (TokenReview)
// about the projected ServiceAccount tokens of the agents, and accepts only
// the instance's agent ServiceAccount with a node claim.
type TokenReviewer struct {
	// Reviews creates TokenReviews; the collector's ServiceAccount may do
	// that and nothing else.
	Reviews authenticationv1client.TokenReviewInterface
	// Audience is the audience the token must have been issued for.
	Audience string
	// Username is the one ServiceAccount user accepted.
	Username string
	// CacheTTL is how long an accepted token is trusted; default
	// DefaultReviewCacheTTL.
	CacheTTL time.Duration
	// Clock is the time source; nil: the real one.
	Clock clock.PassiveClock

	mu    sync.Mutex
	cache map[[sha256.Size]byte]cachedReview
}

type cachedReview struct {
	id      Identity
	expires time.Time
}

var _ Authenticator = (*TokenReviewer)(nil)

// Authenticate implements Authenticator.
func (t *TokenReviewer) Authenticate(ctx context.Context, token string) (Identity, error) {
	if token == "" {
		return Identity{}, fmt.Errorf("no bearer token: %w", ErrUnauthenticated)
	}
	// The cache is keyed by the token's hash: the tokens themselves are not
	// kept in memory longer than a call.
	key := sha256.Sum256([]byte(token))
	now := t.now()
	t.mu.Lock()
	c, ok := t.cache[key]
	t.mu.Unlock()
	if ok && now.Before(c.expires) {
		return c.id, nil
	}
	id, err := t.review(ctx, token)
	if err != nil {
		return Identity{}, err
	}
	ttl := t.CacheTTL
	if ttl <= 0 {
		ttl = DefaultReviewCacheTTL
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cache == nil {
		t.cache = map[[sha256.Size]byte]cachedReview{}
	}
	if len(t.cache) >= maxCachedReviews {
		for k, v := range t.cache {
			if !now.Before(v.expires) {
				delete(t.cache, k)
			}
		}
		if len(t.cache) >= maxCachedReviews {
			clear(t.cache)
		}
	}
	t.cache[key] = cachedReview{id: id, expires: now.Add(ttl)}
	return id, nil
}

func (t *TokenReviewer) now() time.Time {
	if t.Clock != nil {
		return t.Clock.Now()
	}
	return time.Now()
}

// review asks the API server about token and checks what it says.
func (t *TokenReviewer) review(ctx context.Context, token string) (Identity, error) {
	tr, err := t.Reviews.Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{t.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Identity{}, fmt.Errorf("token review: %w", err)
	}
	st := tr.Status
	if !st.Authenticated {
		// st.Error is the API server's reason (expired, wrong audience,
		// pod deleted...); it never contains the token.
		return Identity{}, fmt.Errorf("token not valid for audience %s: %s: %w", t.Audience, st.Error, ErrUnauthenticated)
	}
	// An API server that ignored spec.audiences answers with its own.
	if !slices.Contains(st.Audiences, t.Audience) {
		return Identity{}, fmt.Errorf("token reviewed for audiences %v, not %s: %w", st.Audiences, t.Audience, ErrUnauthenticated)
	}
	if st.User.Username != t.Username {
		return Identity{}, fmt.Errorf("%s is not this instance's agent (%s): %w", st.User.Username, t.Username, ErrForbidden)
	}
	nodes := st.User.Extra[NodeNameExtra]
	if len(nodes) != 1 || strings.TrimSpace(nodes[0]) == "" {
		return Identity{}, fmt.Errorf("token of %s is not bound to a pod on a node (no %s): %w", st.User.Username, NodeNameExtra, ErrForbidden)
	}
	return Identity{Username: st.User.Username, Node: nodes[0]}, nil
}
