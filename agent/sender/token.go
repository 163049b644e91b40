package sender

import (
	"context"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/credentials"
)

// tokenFile gives every call the token in the file, read again each time:
// the kubelet replaces a projected token before it expires, and a token
// read once at start would stop working. One small read per batch costs
// less than watching the file.
type tokenFile string

var _ credentials.PerRPCCredentials = tokenFile("")

func (f tokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return nil, fmt.Errorf("collector token: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return nil, fmt.Errorf("collector token: %s is empty", f)
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

// RequireTransportSecurity is false: the collector is reached over the pod
// network without TLS. The token is of the collector's own audience, bound
// to the agent's pod and short-lived, so one seen on the wire can only send
// results of that pod's node, and the API server refuses it.
func (tokenFile) RequireTransportSecurity() bool { return false }
