//go:build tools

// Package sim only holds the pinned llm-d-inference-sim in go.mod: `go build` names its main package.
package sim

import _ "github.com/llm-d/llm-d-inference-sim/pkg/llm-d-inference-sim"
