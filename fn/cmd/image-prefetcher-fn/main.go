// Command image-prefetcher-fn is the image prefetcher's KRM function.
//
//	image-prefetcher-fn [--strict]                               ResourceList on stdin (kpt, kustomize)
//	image-prefetcher-fn [--strict] config.yaml [resources.yaml]  standalone: the instance as YAML on stdout
//	image-prefetcher-fn schema                                   the configuration's OpenAPI schema
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"sigs.k8s.io/kustomize/kyaml/fn/framework"

	"github.com/nodeprefetch/image-prefetcher/fn"
)

func main() {
	if err := newCommand(os.Args[1:]).Execute(); err != nil {
		// Results are on stderr already, one line each; other errors (a flag, unread input)
		// are not.
		var results framework.Results
		if !errors.As(err, &results) {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
		}
		// Error results are also in the output ResourceList; a failed render must fail its
		// caller, which kyaml's framework alone would not do for results.
		os.Exit(1)
	}
}

func newCommand(args []string) *cobra.Command {
	cmd := fn.NewCommand()
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
