// Command driver-harness drives a Secrets Store CSI provider with the Secrets Store CSI
// driver's own provider client (sigs.k8s.io/secrets-store-csi-driver v1.6.0,
// pkg/secrets-store: PluginClientBuilder, Version, MountContent), so the driver's real request
// building, response checks and file writing (its atomic writer) run against keybroker.
//
//	driver-harness -providers-dir DIR -provider NAME < requests.json > results.json
//	driver-harness -providers-dir DIR -serve-csi unix:///PATH -objects objects.json
//	driver-harness -register DIR --csi-address=... --kubelet-registration-path=PATH
//	driver-harness -liveness --csi-address=... --http-endpoint=ADDR
//	driver-harness -broker-get SOCKET -name FILE   (one call of keybroker's broker API)
//
// requests.json is a JSON list of {"attributes": {...}, "secrets": {...}, "targetPath": "...",
// "permission": "420"}; each result is {"objectVersions": {...}, "errorCode": "...",
// "error": "..."} in the same order. The driver's own marshalling of the maps is used.
// With -serve-csi the driver's own node server runs instead (driver.go); with -register and
// -liveness, the test cluster's stand-ins for the driver's sidecars (sidecars.go).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	secretsstore "sigs.k8s.io/secrets-store-csi-driver/pkg/secrets-store"
)

type request struct {
	Attributes map[string]string `json:"attributes"`
	Secrets    map[string]string `json:"secrets"`
	TargetPath string            `json:"targetPath"`
	Permission string            `json:"permission"`
}

type result struct {
	ObjectVersions map[string]string `json:"objectVersions"`
	ErrorCode      string            `json:"errorCode"`
	Error          string            `json:"error"`
	Millis         float64           `json:"millis"`
}

func main() {
	dir := flag.String("providers-dir", "", "the driver's providers directory")
	name := flag.String("provider", "keybroker", "provider name (socket NAME.sock)")
	serveCSI := flag.String("serve-csi", "", "serve the driver's own CSI node server on this endpoint (unix:///path)")
	objectsPath := flag.String("objects", "", "with -serve-csi: JSON {classes: [SecretProviderClass], pods: [Pod]}")
	registerDir := flag.String("register", "", "serve kubelet's plugin registration API in this directory (plugins_registry)")
	live := flag.Bool("liveness", false, "answer /healthz with the driver's CSI Probe")
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "with -register, -liveness: the driver's CSI socket")
	kubeletPath := flag.String("kubelet-registration-path", "", "with -register: the driver's CSI socket as kubelet sees it")
	httpEndpoint := flag.String("http-endpoint", "0.0.0.0:9808", "with -liveness: where /healthz is served")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "with -liveness: how long a Probe may take")
	flag.Int("v", 0, "log verbosity (accepted for the upstream sidecars' flags)")
	brokerSocket := flag.String("broker-get", "", "call keybroker's broker API Get on this socket (with -name) and exit")
	objectName := flag.String("name", "", "with -broker-get: the file to get")
	flag.Parse()
	if *brokerSocket != "" {
		brokerGet(*brokerSocket, *objectName)
		return
	}
	if *registerDir != "" {
		register(*registerDir, *csiAddress, *kubeletPath)
		return
	}
	if *live {
		liveness(*csiAddress, *httpEndpoint, *probeTimeout)
		return
	}
	if *serveCSI != "" {
		serveDriver(*serveCSI, *dir, *objectsPath)
		return
	}
	var reqs []request
	if err := json.NewDecoder(os.Stdin).Decode(&reqs); err != nil {
		fmt.Fprintln(os.Stderr, "requests:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	builder := secretsstore.NewPluginClientBuilder([]string{*dir})
	defer builder.Cleanup()
	client, err := builder.Get(ctx, *name)
	if err != nil {
		fmt.Fprintln(os.Stderr, "provider client:", err)
		os.Exit(1)
	}
	version, err := secretsstore.Version(ctx, client)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Version:", err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, "provider version:", version)
	out := make([]result, 0, len(reqs))
	for _, r := range reqs {
		// The driver marshals both maps with encoding/json before the call (nodeserver.go).
		attrs, _ := json.Marshal(r.Attributes)
		secrets, _ := json.Marshal(r.Secrets)
		if err := os.MkdirAll(r.TargetPath, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "target:", err)
			os.Exit(1)
		}
		start := time.Now()
		ov, code, err := secretsstore.MountContent(ctx, client, string(attrs), string(secrets), r.TargetPath, r.Permission, nil)
		res := result{ObjectVersions: ov, ErrorCode: code, Millis: float64(time.Since(start).Microseconds()) / 1000}
		if err != nil {
			res.Error = err.Error()
		}
		out = append(out, res)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
