package main

// Stand-ins for the two sidecars of the Secrets Store CSI driver's DaemonSet, which cannot be
// built here (csi-node-driver-registrar's and livenessprobe's go.mod lack /v2 and the module
// proxy refuses their v2 tags). Each takes the flags the driver's deploy/ manifest passes, so
// that manifest runs with only its images changed:
//
//	-register DIR   --csi-address=/csi/csi.sock --kubelet-registration-path=PATH [--v=N]
//	-liveness       --csi-address=/csi/csi.sock --http-endpoint=ADDR [--probe-timeout=3s] [-v=N]
//
// -register asks the driver its name (CSI GetPluginInfo), serves kubelet's plugin registration
// API (pluginregistration.v1) on DIR/NAME-reg.sock and exits non-zero if kubelet refuses the
// driver, as the registrar does. -liveness answers /healthz with the driver's CSI Probe.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registration struct {
	name, endpoint string
	refused        chan string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		fmt.Fprintf(os.Stderr, "kubelet registered %s (%s)\n", r.name, r.endpoint)
	} else {
		r.refused <- s.Error
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// csiConn connects to the driver's CSI socket (unix:///path or /path), waiting for it to appear.
func csiConn(address string) *grpc.ClientConn {
	path := strings.TrimPrefix(address, "unix://")
	for i := 0; ; i++ {
		if _, err := os.Stat(path); err == nil {
			break
		}
		if i%10 == 0 {
			fmt.Fprintf(os.Stderr, "waiting for the driver's socket %s\n", path)
		}
		time.Sleep(time.Second)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "CSI connection:", err)
		os.Exit(1)
	}
	return conn
}

// register serves kubelet's registration API in `dir` for the driver at `csiAddress`, which
// kubelet reaches at `kubeletPath`, until SIGTERM or kubelet's refusal.
func register(dir, csiAddress, kubeletPath string) {
	conn := csiConn(csiAddress)
	var name string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			name = info.GetName()
			break
		}
		fmt.Fprintln(os.Stderr, "GetPluginInfo:", err)
		time.Sleep(time.Second)
	}
	_ = conn.Close()
	sock := filepath.Join(dir, name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !os.IsNotExist(err) {
		fmt.Fprintln(os.Stderr, "stale registration socket:", err)
		os.Exit(1)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	r := &registration{name: name, endpoint: kubeletPath, refused: make(chan string, 1)}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, r)
	go func() { _ = s.Serve(l) }()
	fmt.Fprintf(os.Stderr, "registration socket %s for %s\n", sock, name)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case <-stop:
	case why := <-r.refused:
		fmt.Fprintf(os.Stderr, "kubelet refused %s: %s\n", name, why)
		code = 1
	}
	s.Stop()
	_ = os.Remove(sock)
	os.Exit(code)
}

// liveness answers GET /healthz on `endpoint` with 200 when the driver's CSI Probe succeeds
// within `timeout`, 500 with the reason otherwise.
func liveness(csiAddress, endpoint string, timeout time.Duration) {
	conn := csiConn(csiAddress)
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, req *http.Request) {
		ctx, cancel := context.WithTimeout(req.Context(), timeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err == nil && resp.GetReady() != nil && !resp.GetReady().GetValue() {
			err = fmt.Errorf("driver says not ready")
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	fmt.Fprintf(os.Stderr, "liveness on %s for %s\n", endpoint, csiAddress)
	if err := http.ListenAndServe(endpoint, nil); err != nil {
		fmt.Fprintln(os.Stderr, "liveness:", err)
		os.Exit(1)
	}
}
