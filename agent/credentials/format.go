package credentials

import (
	"encoding/json"
	"fmt"
	"log/slog"
)

// A Credential reaches logs through fmt verbs, slog attributes and JSON
// encoders. Each of those paths is closed here so that only Source, which holds
// no secret, is ever printed. runtimeapi.AuthConfig is generated protobuf code
// whose String method prints every field, so it must never be formatted on its
// own either; nothing in this package does.

// String returns Source only.
func (c Credential) String() string { return "credential " + c.Source }

// GoString keeps %#v from dumping the AuthConfig fields.
func (c Credential) GoString() string {
	return fmt.Sprintf("credentials.Credential{Source: %q}", c.Source)
}

// Format handles every verb (%v, %+v, %s, %q, %x, ...) the same way, so no verb
// falls back to printing struct fields.
func (c Credential) Format(f fmt.State, verb rune) {
	switch verb {
	case 'v':
		if f.Flag('#') {
			fmt.Fprint(f, c.GoString())
			return
		}
		fmt.Fprint(f, c.String())
	case 'q':
		fmt.Fprintf(f, "%q", c.String())
	default:
		fmt.Fprint(f, c.String())
	}
}

// LogValue makes slog record the Source only.
func (c Credential) LogValue() slog.Value {
	return slog.GroupValue(slog.String("source", c.Source))
}

// MarshalJSON writes the Source only, for JSON loggers and result files that
// encode values directly.
func (c Credential) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Source string `json:"source"`
	}{c.Source})
}
