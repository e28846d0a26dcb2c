// Command istiod-peer runs a real istiod (istio.io/istio pilot bootstrap) in-process, with no
// Kubernetes: Istio config comes from a directory of YAML (fsnotify reload) and the server is
// given an in-memory fake Kubernetes client. It is a test peer for amesh, not product code.
//
// Why not the stock pilot-discovery binary: without a Kubernetes client it dereferences a nil
// multicluster controller at start (the ServiceEntry controller needs one). Istio's own
// bootstrap tests avoid that by injecting kube.NewFakeClient() through NewServer's option
// hook; that field is unexported, so this program sets it with reflect (see setKubeClient).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"reflect"
	"syscall"
	"time"
	"unsafe"

	"istio.io/istio/pilot/pkg/bootstrap"
	kubecontroller "istio.io/istio/pilot/pkg/serviceregistry/kube/controller"
	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/log"
)

func main() {
	configDir := flag.String("config-dir", "", "directory of Istio YAML (watched, reloaded on change)")
	grpcAddr := flag.String("grpc-addr", "", "plaintext xDS gRPC listen address, e.g. 127.0.0.1:PORT")
	httpAddr := flag.String("http-addr", "", "debug HTTP listen address (/ready, /debug/*)")
	secureGRPCAddr := flag.String("secure-grpc-addr", "",
		"TLS xDS gRPC listen address (istiod self-signed CA); empty disables it")
	monitoringAddr := flag.String("monitoring-addr", "127.0.0.1:0", "metrics listen address")
	meshFile := flag.String("mesh-file", "", "mesh config YAML (MeshConfig); empty uses Istio defaults")
	clusterID := flag.String("cluster-id", "Kubernetes", "istiod cluster ID (nodes must send the same CLUSTER_ID)")
	domain := flag.String("domain", "cluster.local", "DNS domain suffix")
	rootCertOut := flag.String("root-cert-out", "", "write the CA root certificate (PEM) here once started")
	// Istio's own logging flags (--log_output_level=ads:debug, --log_target, ...).
	logOpts := log.DefaultOptions()
	logOpts.AttachFlags(stringArrayVar, flag.StringVar, flag.IntVar, flag.BoolVar)
	flag.Parse()

	// No well-known defaults: the caller picks free ports so parallel peers never collide.
	if *configDir == "" || *grpcAddr == "" || *httpAddr == "" {
		fatalf("--config-dir, --grpc-addr and --http-addr are required")
	}
	if err := log.Configure(logOpts); err != nil {
		fatalf("configure logging: %v", err)
	}

	args := bootstrap.NewPilotArgs(func(p *bootstrap.PilotArgs) {
		p.Namespace = "istio-system"
		p.ServerOptions = bootstrap.DiscoveryServerOptions{
			HTTPAddr:       *httpAddr,
			HTTPSAddr:      "", // webhooks (unused here) share the HTTP mux; no extra port
			GRPCAddr:       *grpcAddr,
			SecureGRPCAddr: *secureGRPCAddr,
			MonitoringAddr: *monitoringAddr,
			TLSOptions:     bootstrap.TLSOptions{TLSMinVersion: bootstrap.TLSMinVersion1_2},
		}
		p.RegistryOptions = bootstrap.RegistryOptions{
			FileDir: *configDir,
			KubeOptions: kubecontroller.Options{
				DomainSuffix: *domain,
				ClusterID:    cluster.ID(*clusterID),
			},
			ClusterRegistriesNamespace: "istio-system",
		}
		// A path that does not exist means "Istio default mesh"; never read ./etc/istio.
		p.MeshConfigFile = *meshFile
		if p.MeshConfigFile == "" {
			p.MeshConfigFile = "/nonexistent/amesh/mesh"
		}
		p.NetworksConfigFile = "/nonexistent/amesh/meshNetworks"
		// Fast, deterministic shutdown for restarts in tests.
		p.ShutdownDuration = 100 * time.Millisecond
	})
	if err := args.Complete(); err != nil {
		fatalf("pilot args: %v", err)
	}

	s, err := bootstrap.NewServer(args, func(s *bootstrap.Server) {
		setKubeClient(s, kube.NewFakeClient())
	})
	if err != nil {
		fatalf("create istiod: %v", err)
	}
	stop := make(chan struct{})
	if err := s.Start(stop); err != nil {
		fatalf("start istiod: %v", err)
	}
	if *rootCertOut != "" && s.CA != nil {
		pem := s.CA.GetCAKeyCertBundle().GetRootCertPem()
		if err := os.WriteFile(*rootCertOut, pem, 0o644); err != nil {
			fatalf("write root cert: %v", err)
		}
	}
	fmt.Printf("istiod-peer ready grpc=%s http=%s secure-grpc=%s\n", *grpcAddr, *httpAddr, *secureGRPCAddr)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	close(stop)
	s.WaitUntilCompletion()
}

// setKubeClient sets the unexported Server.kubeClient, as Istio's in-package tests do through
// the same option hook. A fake client makes istiod build its multicluster controller (which the
// ServiceEntry registry requires) without any API server.
func setKubeClient(s *bootstrap.Server, c kube.Client) {
	f := reflect.ValueOf(s).Elem().FieldByName("kubeClient")
	if !f.IsValid() {
		fatalf("bootstrap.Server has no kubeClient field: istio version changed; update main.go")
	}
	reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Set(reflect.ValueOf(c))
}

// stringArrayVar adapts the standard flag package to Istio's repeated string flags.
func stringArrayVar(p *[]string, name string, value []string, usage string) {
	*p = value
	set := false
	flag.Func(name, usage, func(v string) error {
		if !set { // the first use replaces the default
			*p, set = nil, true
		}
		*p = append(*p, v)
		return nil
	})
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "istiod-peer: "+format+"\n", a...)
	os.Exit(1)
}
