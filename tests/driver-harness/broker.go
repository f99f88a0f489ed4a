package main

// A one-call client of keybroker's broker API (keybroker.v1.Broker/Get), each call its own
// short-lived process: what the audit tests attribute reads to. The request is encoded by
// hand (field 1, the name) so no generated code is needed.

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
)

// rawCodec passes bytes through: the message is already protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

var _ encoding.Codec = rawCodec{}

// brokerGet calls Get(name) on the broker socket and prints the reply's length (never the
// value); exit 1 on any error, with the status on stderr.
func brokerGet(socket, name string) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "broker:", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req := append([]byte{0x0a, byte(len(name))}, name...)
	var reply []byte
	if err := conn.Invoke(ctx, "/keybroker.v1.Broker/Get", &req, &reply, grpc.ForceCodec(rawCodec{})); err != nil {
		fmt.Fprintln(os.Stderr, "broker Get:", err)
		os.Exit(1)
	}
	fmt.Printf("reply=%d bytes\n", len(reply))
}
