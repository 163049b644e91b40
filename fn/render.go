package fn

import (
	"bytes"
	"fmt"
)

// RenderFile runs the function the way `image-prefetcher-fn config.yaml [resources...]` does
// and returns the YAML it prints: the instance plus the resources. Tests and the cluster e2e
// use it to render examples without building the binary.
func RenderFile(config string, resources ...string) ([]byte, error) {
	var out, errOut bytes.Buffer
	cmd := NewCommand()
	cmd.SetArgs(append([]string{config}, resources...))
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	if err := cmd.Execute(); err != nil {
		return nil, fmt.Errorf("render %s: %w", config, err)
	}
	return out.Bytes(), nil
}
