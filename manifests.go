// Package manifests embeds the Kustomize bundle, base/, overlays/ and components/, so that
// programs (the KRM function) build the very files users build by hand. It sits at the module
// root because go:embed cannot reach a parent directory.
package manifests

import "embed"

// FS holds base/, overlays/ and components/ under their repository paths.
//
//go:embed base overlays components
var FS embed.FS
