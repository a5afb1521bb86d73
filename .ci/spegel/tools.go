//go:build tools

// Package tools keeps Spegel's main package in this build module's graph.
package tools

import _ "github.com/spegel-org/spegel"
