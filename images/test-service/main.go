// The test service of the local node: one small HTTP server that stands for a stack's
// service in the end-to-end tests (scripts/build-images builds it into the test-service
// image, beside busybox for wget, nc and nslookup inside the pod).
//
//	PORT           port to listen on, all addresses (default 8000)
//	SERVICE_NAME   echoed as "service", so a test sees which service answered (default "")
//
//	GET /health    200 "ok"
//	anything else  200 with a JSON description of the request: service, hostname (the pod's
//	               name), method, uri (exactly as received, query included), path, host,
//	               headers, remote_addr, proto
//
// It exits 0 on SIGTERM or SIGINT after in-flight requests finish (at most 5 s).
// Standard library only, built with CGO_ENABLED=0 into one static file.
package main

import (
	"context"
	"encoding/json"
	"errors"
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

func main() {
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
