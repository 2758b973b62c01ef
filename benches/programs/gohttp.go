// gohttp: a tiny net/http server and a load client for scripts/bench.sh's
// real-program rows (standard library only, built at bench time).
//
//	gohttp serve ADDR                      # prints READY once listening
//	gohttp load URL CONC N KEEPALIVE(0|1) [unix:PATH]
//	                                       # prints "<requests> <errors> <seconds>"
//
// ADDR is IP:PORT, or unix:PATH for a native AF_UNIX socket at PATH; load's
// unix:PATH dials that socket for every connection, whatever URL's host.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) >= 3 && os.Args[1] == "serve" {
		network, addr := "tcp", os.Args[2]
		if strings.HasPrefix(addr, "unix:") {
			network, addr = "unix", strings.TrimPrefix(addr, "unix:")
		}
		ln, err := net.Listen(network, addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("READY")
		body := []byte("hello\n")
		err = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write(body)
		}))
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if (len(os.Args) == 6 || len(os.Args) == 7) && os.Args[1] == "load" {
		url := os.Args[2]
		conc, _ := strconv.Atoi(os.Args[3])
		n, _ := strconv.ParseInt(os.Args[4], 10, 64)
		keep := os.Args[5] == "1"
		tr := &http.Transport{DisableKeepAlives: !keep, MaxIdleConnsPerHost: conc}
		if len(os.Args) == 7 {
			path := strings.TrimPrefix(os.Args[6], "unix:")
			var d net.Dialer
			tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", path)
			}
		}
		c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		var next, errs int64
		var wg sync.WaitGroup
		t0 := time.Now()
		for i := 0; i < conc; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for atomic.AddInt64(&next, 1) <= n {
					r, err := c.Get(url)
					if err != nil {
						atomic.AddInt64(&errs, 1)
						continue
					}
					io.Copy(io.Discard, r.Body)
					r.Body.Close()
				}
			}()
		}
		wg.Wait()
		fmt.Printf("%d %d %.6f\n", n, errs, time.Since(t0).Seconds())
		return
	}
	fmt.Fprintln(os.Stderr, "usage: gohttp serve ADDR | gohttp load URL CONC N KEEPALIVE [unix:PATH]")
	os.Exit(2)
}
