// Package mlog stands in for monis.app/mlog v0.0.2, which the Go module proxy refuses. The
// Secrets Store CSI driver's pkg/secrets-store calls only Fatal (in server.go, which the
// harness never runs); the harness needs the package to compile, nothing more.
package mlog

import (
	"fmt"
	"os"
)

// Fatal prints the error and exits, as the real function does.
func Fatal(err error, args ...interface{}) {
	fmt.Fprintln(os.Stderr, append([]interface{}{"fatal:", err}, args...)...)
	os.Exit(1)
}
