// Command image-prefetcher-fn is the image prefetcher's KRM function.
//
//	image-prefetcher-fn                               ResourceList on stdin (kpt, kustomize)
//	image-prefetcher-fn config.yaml [resources.yaml]  standalone: the instance as YAML on stdout
//	image-prefetcher-fn schema                        the configuration's OpenAPI schema
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"sigs.k8s.io/kustomize/kyaml/fn/framework/command"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

func main() {
	if err := newCommand(os.Args[1:]).Execute(); err != nil {
		// Error results are also in the output ResourceList; a failed render must fail its
		// caller, which kyaml's framework alone would not do for results.
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func newCommand(args []string) *cobra.Command {
	p := fn.Processor{}
	// Standalone, a relative spec.imagesFile is relative to the configuration file; under
	// kpt and kustomize, to the working directory they run the function in.
	if len(args) > 0 && args[0] != "schema" && !isFlag(args[0]) {
		p.Dir = filepath.Dir(args[0])
	}
	cmd := command.Build(p, command.StandaloneEnabled, true)
	cmd.Use = "image-prefetcher-fn [config.yaml [resources.yaml...]]"
	cmd.Short = "Generate an image prefetcher instance from an ImagePrefetcher configuration"
	cmd.AddCommand(&cobra.Command{
		Use:   "schema",
		Short: "Print the OpenAPI schema of the ImagePrefetcher configuration",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(fn.SchemaYAML)
			return err
		},
	})
	cmd.SetArgs(args)
	return cmd
}

func isFlag(s string) bool { return len(s) > 0 && s[0] == '-' }
