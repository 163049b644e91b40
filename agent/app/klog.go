package app

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// klogMaxV is the chattiest klog verbosity the agent lets through, at
// --log-level=debug. From V(6) on client-go traces every request (URLs,
// headers, then bodies: a TokenReview's body is an agent's token), and V(5)
// is trace noise nobody debugging a node needs.
const klogMaxV = 4

// routeClientGoLogs sends what client-go logs (klog's lines, plain and
// structured, and the API server's warnings) through log's handler, so a log
// pipeline gets one format. klog and client-go's default warning handler are
// process-wide: the last call wins, which is the command's only logger.
func routeClientGoLogs(log *slog.Logger) error {
	klog.SetSlogLogger(slog.New(&klogHandler{next: log.Handler()}))
	// klog checks its own -v before a non-contextual klog.V(n) line reaches
	// the handler, so it must let through what the handler may show.
	v := 0
	if log.Enabled(context.Background(), slog.LevelDebug) {
		v = klogMaxV
	}
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	if err := fs.Set("v", strconv.Itoa(v)); err != nil {
		return fmt.Errorf("klog verbosity %d: %w", v, err)
	}
	rest.SetDefaultWarningHandlerWithContext(&apiWarnings{log: log, seen: map[string]struct{}{}})
	return nil
}

// klogHandler maps klog's verbosity onto the agent's levels: V(0) is info,
// V(1) to klogMaxV are debug, beyond is dropped. logr hands V(n) over as
// slog level -n, which slog names DEBUG+2 and the like, and which a
// --log-level such as DEBUG-4 (slog parses it) would let through down to
// request bodies. V(1) is debug too: client-go's default -v=0 hides it, and
// it holds startup chatter such as a line per client feature gate. Errors
// (klog.Error, ErrorS) arrive as slog errors already. The handler also names
// the error attribute "error", the agent's key, where logr and most
// client-go callers say "err".
type klogHandler struct{ next slog.Handler }

var _ slog.Handler = (*klogHandler)(nil)

// klogLevel is the agent's level for a level logr made from klog, and false
// for a line more verbose than klogMaxV.
func klogLevel(l slog.Level) (slog.Level, bool) {
	switch {
	case l >= slog.LevelInfo:
		return l, true
	case l >= slog.LevelInfo-klogMaxV:
		return slog.LevelDebug, true
	}
	return l, false
}

func (h *klogHandler) Enabled(ctx context.Context, l slog.Level) bool {
	m, ok := klogLevel(l)
	return ok && h.next.Enabled(ctx, m)
}

func (h *klogHandler) Handle(ctx context.Context, r slog.Record) error {
	m, ok := klogLevel(r.Level)
	if !ok {
		return nil
	}
	out := slog.NewRecord(r.Time, m, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(errorKey(a))
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h *klogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	renamed := make([]slog.Attr, len(as))
	for i, a := range as {
		renamed[i] = errorKey(a)
	}
	return &klogHandler{next: h.next.WithAttrs(renamed)}
}

func (h *klogHandler) WithGroup(name string) slog.Handler {
	return &klogHandler{next: h.next.WithGroup(name)}
}

func errorKey(a slog.Attr) slog.Attr {
	if a.Key == "err" {
		a.Key = "error"
	}
	return a
}

// maxAPIWarnings bounds the distinct warnings remembered: a server could
// put something unique in each; past the bound a warning is logged again.
const maxAPIWarnings = 1000

// apiWarnings logs each distinct warning of the API server once: a
// deprecated API or field warns on every request, every pass.
type apiWarnings struct {
	log  *slog.Logger
	mu   sync.Mutex
	seen map[string]struct{}
}

var _ rest.WarningHandlerWithContext = (*apiWarnings)(nil)

func (w *apiWarnings) HandleWarningHeaderWithContext(ctx context.Context, code int, _, text string) {
	// 299 is the only code the API server sends warnings with; client-go's
	// own handler ignores the others too.
	if code != 299 || text == "" {
		return
	}
	w.mu.Lock()
	_, dup := w.seen[text]
	if !dup && len(w.seen) < maxAPIWarnings {
		w.seen[text] = struct{}{}
	}
	w.mu.Unlock()
	if !dup {
		w.log.WarnContext(ctx, "API server warning", "warning", text)
	}
}
