// Package mlog stands in for monis.app/mlog v0.0.2, which the Go module proxy refuses. It has
// what the Secrets Store CSI driver v1.6.0 calls: pkg/secrets-store's Fatal (the harness) and
// cmd/secrets-store-csi-driver's log setup (the driver built for the test cluster by
// scripts/cluster.sh). Logs stay klog's text lines; the level and format are only checked.
package mlog

import (
	"context"
	"fmt"
	"os"

	"k8s.io/klog/v2"
)

// Format is a log format name, as the driver's --log-format-json chooses it.
type Format string

const (
	FormatText Format = "text"
	FormatJSON Format = "json"
)

// Fatal prints the error and exits, as the real function does.
func Fatal(err error, args ...interface{}) {
	fmt.Fprintln(os.Stderr, append([]interface{}{"fatal:", err}, args...)...)
	klog.Flush()
	os.Exit(1)
}

// Error logs an error line with its key/value pairs.
func Error(msg string, keysAndValues ...interface{}) {
	klog.ErrorS(nil, msg, keysAndValues...)
}

// Setup returns what flushes the logs at exit.
func Setup() func() {
	return klog.Flush
}

// ValidateAndSetKlogLevelAndFormatGlobally refuses what the real function refuses (a negative
// level, an unknown format) and otherwise leaves klog as its flags set it.
func ValidateAndSetKlogLevelAndFormatGlobally(_ context.Context, level klog.Level, format Format) error {
	if level < 0 {
		return fmt.Errorf("klog level %d is negative", level)
	}
	if format != FormatText && format != FormatJSON {
		return fmt.Errorf("unknown log format %q", format)
	}
	return nil
}
