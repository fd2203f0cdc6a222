// The test service of the local node: one small HTTP server that stands for a stack's
// service in the end-to-end tests (scripts/build-images builds it into the test-service
// image, beside busybox for wget, nc and nslookup inside the pod).
//
//	PORT           port to listen on, all addresses (default 8000)
//	SERVICE_NAME   echoed as "service", so a test sees which service answered (default "")
//
//	VERDICT_PATH   with VERDICT_TOKEN: this path is an edge authentication verdict endpoint
//	VERDICT_TOKEN  (spec.gateway.edgeAuth): 200 with "X-User-Id: user-1" when the request has
//	               "Authorization: Bearer <VERDICT_TOKEN>", else 401
//
//	GET /health    200 "ok"
//	anything else  200 with a JSON description of the request: service, hostname (the pod's
//	               name), method, uri (exactly as received, query included), path, host,
//	               headers, remote_addr, proto
//
// It exits 0 on SIGTERM or SIGINT after in-flight requests finish (at most 5 s).
//
// Client modes, for probes from inside a pod (`kubectl exec <pod> -- /test-service get ...`):
//
//	test-service get [-t SECONDS] URL          body on stdout, "HTTP <status>" on stderr;
//	                                           exit 0 when any HTTP response arrived
//	test-service connect [-t SECONDS] HOST:PORT exit 0 when a TCP connection opens
//
// Both exit 1 otherwise, with the error on stderr ("i/o timeout" for a dropped packet,
// "connection refused" for a closed port). Default timeout 5 s. (busybox's wget is there
// too, but its -T option crashes in Debian 12's busybox 1.35; use `timeout 5 wget -qO- URL`.)
//
// Standard library only, built with CGO_ENABLED=0 into one static file.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

type echo struct {
	Service    string            `json:"service"`
	Hostname   string            `json:"hostname"`
	Method     string            `json:"method"`
	URI        string            `json:"uri"`
	Path       string            `json:"path"`
	Host       string            `json:"host"`
	Headers    map[string]string `json:"headers"`
	RemoteAddr string            `json:"remote_addr"`
	Proto      string            `json:"proto"`
}

func handler(service, hostname string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte("ok\n"))
	})
	if path, token := os.Getenv("VERDICT_PATH"), os.Getenv("VERDICT_TOKEN"); path != "" && token != "" {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Authorization") != "Bearer "+token {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			w.Header().Set("X-User-Id", "user-1")
			w.WriteHeader(http.StatusOK)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		headers := make(map[string]string, len(r.Header))
		for name, values := range r.Header {
			// Lower-case names, as HTTP/2 sends them; repeated headers joined as HTTP allows.
			headers[strings.ToLower(name)] = strings.Join(values, ", ")
		}
		body, err := json.Marshal(echo{
			Service:    service,
			Hostname:   hostname,
			Method:     r.Method,
			URI:        r.RequestURI,
			Path:       r.URL.Path,
			Host:       r.Host,
			Headers:    headers,
			RemoteAddr: r.RemoteAddr,
			Proto:      r.Proto,
		})
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(append(body, '\n'))
	})
	return mux
}

// client runs the get and connect modes; it returns the process's exit status.
func client(mode string, args []string) int {
	flags := flag.NewFlagSet(mode, flag.ContinueOnError)
	seconds := flags.Float64("t", 5, "timeout in seconds")
	if err := flags.Parse(args); err != nil || flags.NArg() != 1 {
		fmt.Fprintf(os.Stderr, "usage: test-service %s [-t SECONDS] TARGET\n", mode)
		return 2
	}
	timeout := time.Duration(*seconds * float64(time.Second))
	target := flags.Arg(0)
	switch mode {
	case "connect":
		conn, err := net.DialTimeout("tcp", target, timeout)
		if err != nil {
			fmt.Fprintf(os.Stderr, "connect %s: %v\n", target, err)
			return 1
		}
		_ = conn.Close()
		fmt.Fprintf(os.Stderr, "connected to %s\n", target)
		return 0
	default:
		httpClient := &http.Client{
			Timeout: timeout,
			// Report redirects instead of following them: the probe is about one hop.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		resp, err := httpClient.Get(target)
		if err != nil {
			fmt.Fprintf(os.Stderr, "get %s: %v\n", target, err)
			return 1
		}
		defer resp.Body.Close()
		fmt.Fprintf(os.Stderr, "HTTP %d\n", resp.StatusCode)
		if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
			fmt.Fprintf(os.Stderr, "get %s: reading the body: %v\n", target, err)
			return 1
		}
		return 0
	}
}

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "get" || os.Args[1] == "connect") {
		os.Exit(client(os.Args[1], os.Args[2:]))
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	hostname, _ := os.Hostname()
	service := os.Getenv("SERVICE_NAME")

	listener, err := net.Listen("tcp", net.JoinHostPort("", port))
	if err != nil {
		log.Fatalf("test-service: %v", err)
	}
	server := &http.Server{
		Handler:           handler(service, hostname),
		ReadHeaderTimeout: 10 * time.Second,
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		sig := <-stop
		log.Printf("test-service: %v, shutting down", sig)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
		close(done)
	}()

	log.Printf("test-service: service %q listening on %s", service, listener.Addr())
	if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("test-service: %v", err)
	}
	<-done
}
