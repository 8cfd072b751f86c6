// goseed: the seed's game-gateway sketch, written faithfully in Go, as a benchmark peer.
//
// The seed accepts, picks a random backend, net.Dial()s it, and starts two io.Copy
// goroutines. This keeps exactly that shape and adds only what the seed left out:
// errors are handled, each direction half-closes the other side when it ends, and both
// sockets are closed once both directions are done (the seed leaked them).
//
//	goseed -listen 127.0.0.1:9000 -backend 127.0.0.1:9001 -backend 127.0.0.1:9002
//
// Run it with GOMAXPROCS=1 to compare with one-core peers.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net"
	"os"
	"strings"
	"time"
)

type backends []string

func (b *backends) String() string     { return strings.Join(*b, ",") }
func (b *backends) Set(s string) error { *b = append(*b, s); return nil }

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "HOST:PORT to listen on")
	var bs backends
	flag.Var(&bs, "backend", "backend HOST:PORT (repeat)")
	flag.Parse()
	if len(bs) == 0 {
		fmt.Fprintln(os.Stderr, "goseed: at least one -backend is required")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goseed:", err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for {
		conn, err := ln.Accept()
		if err != nil {
			// EMFILE and friends: back off briefly instead of spinning or dying.
			log.Printf("accept: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handle(conn, bs[rng.Intn(len(bs))])
	}
}

func handle(client net.Conn, addr string) {
	backend, err := net.Dial("tcp", addr)
	if err != nil {
		log.Printf("dial %s: %v", addr, err)
		client.Close()
		return
	}
	done := make(chan struct{})
	go func() {
		pipe(backend, client)
		close(done)
	}()
	pipe(client, backend)
	<-done
	client.Close()
	backend.Close()
}

// pipe copies src to dst until EOF, then half-closes dst so its peer sees EOF too.
// An error (a reset, a failed write) ends the session both ways: closing both sockets
// unblocks the other direction's io.Copy, which the seed would have leaked.
func pipe(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}
