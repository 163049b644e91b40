package clusterenv

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"testing"
)

// Suffix is a short random name part, so the objects of tests of several people on one cluster never meet.
func Suffix(t testing.TB) string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// FreePort is a free host port, for an agent's endpoints (the e2e layer runs agents on the host network).
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Refs returns the tagged references of catalogue images (names such as "e2e/small:10").
func (e *Env) Refs(t testing.TB, names ...string) []string {
	t.Helper()
	out := make([]string, 0, len(names))
	for _, n := range names {
		out = append(out, e.Image(t, n).Ref)
	}
	return out
}
