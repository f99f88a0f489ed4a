package main

// -serve-csi: the driver itself. NewSecretsStoreDriver (the driver's public constructor, the
// one its main calls) serves the CSI Identity and Node services on a unix socket; its Kubernetes
// client is controller-runtime's fake client holding the SecretProviderClasses and pods of
// -objects, as the driver's own node server tests build it. kubelet's part (NodePublishVolume,
// NodeUnpublishVolume) is played by the Rust test over that socket, so the driver's real
// request building, tmpfs mount, atomic file writing and object-version handling run.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	secretsstorev1 "sigs.k8s.io/secrets-store-csi-driver/apis/v1"
	secretsstore "sigs.k8s.io/secrets-store-csi-driver/pkg/secrets-store"
)

type objects struct {
	Classes []secretsstorev1.SecretProviderClass `json:"classes"`
	Pods    []corev1.Pod                         `json:"pods"`
}

func serveDriver(endpoint, providersDir, objectsPath string) {
	raw, err := os.ReadFile(objectsPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "objects:", err)
		os.Exit(2)
	}
	var in objects
	if err := json.Unmarshal(raw, &in); err != nil {
		fmt.Fprintln(os.Stderr, "objects:", err)
		os.Exit(2)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		panic(err)
	}
	if err := secretsstorev1.AddToScheme(scheme); err != nil {
		panic(err)
	}
	objs := make([]client.Object, 0, len(in.Classes)+len(in.Pods))
	for i := range in.Classes {
		objs = append(objs, &in.Classes[i])
	}
	for i := range in.Pods {
		objs = append(objs, &in.Pods[i])
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(objs...).Build()
	builder := secretsstore.NewPluginClientBuilder([]string{providersDir})
	defer builder.Cleanup()
	// Rotation off: kubelet's periodic remount is what the test sends, as the driver's
	// rotation reconciler would.
	driver := secretsstore.NewSecretsStoreDriver("secrets-store.csi.k8s.io", "keybroker-test-node", endpoint, builder, c, c, false, 2*time.Minute)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	driver.Run(ctx)
}
