// Command vcsim serves govmomi's vSphere simulator for Secondsite's tests.
//
// Debian ships govmomi's simulator library (golang-github-vmware-govmomi-dev) but not
// upstream's vcsim command, so this is a small main of our own; tests/vcsim/build.sh
// builds it with Debian's Go in GOPATH mode.
//
// Output contract (stdout, one KEY=VALUE per line, flushed, then nothing more):
//
//	VCSIM_CERT_SHA1=AA:BB:...        server certificate thumbprint (vSphere's format)
//	VCSIM_CERT_SHA256=AA:BB:...
//	VCSIM_DATASTORE=DC0/LocalDS_0=/tmp/govcsim-DC0-LocalDS_0-123   one per datastore
//	VCSIM_URL=https://127.0.0.1:PORT/sdk                           always last: ready
//
// It serves until SIGTERM or SIGINT (or EOF on stdin with -exit-on-stdin-eof), then
// closes the server and removes the datastore directories the simulator created (they
// are real local directories; a SIGKILL leaves them behind).
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
)

type options struct {
	listen    string
	username  string
	password  string
	esx       bool
	dc        int
	cluster   int
	host      int
	sHost     int
	vm        int
	ds        int
	pg        int
	pool      int
	folder    int
	app       int
	pod       int
	autostart bool
	certFile  string
	keyFile   string
	delay     int
	trace     bool
	stdinEOF  bool
}

func parseFlags(args []string) (*options, error) {
	def := simulator.VPX()
	o := &options{}
	fs := flag.NewFlagSet("vcsim", flag.ContinueOnError)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:0", "listen address host:port (port 0: the kernel picks one; see VCSIM_URL)")
	fs.StringVar(&o.username, "username", "user", "the only user name accepted by Login")
	fs.StringVar(&o.password, "password", "pass", "the only password accepted by Login")
	fs.BoolVar(&o.esx, "esx", false, "simulate a standalone ESXi host instead of a vCenter (only -ds, -vm, -autostart apply)")
	fs.IntVar(&o.dc, "dc", def.Datacenter, "datacenters")
	fs.IntVar(&o.cluster, "cluster", def.Cluster, "clusters per datacenter")
	fs.IntVar(&o.host, "host", def.ClusterHost, "hosts per cluster")
	fs.IntVar(&o.sHost, "standalone-host", def.Host, "standalone hosts per datacenter")
	fs.IntVar(&o.vm, "vm", def.Machine, "VMs per standalone host, per cluster (in its root resource pool) and per vApp")
	fs.IntVar(&o.ds, "ds", def.Datastore, "local datastores per datacenter (LocalDS_N, a temp dir each, mounted on all its hosts)")
	fs.IntVar(&o.pg, "pg", def.Portgroup, "distributed port groups per datacenter (DCn_DVPGm, on a switch DVS0 that has all hosts)")
	fs.IntVar(&o.pool, "pool", def.Pool, "child resource pools per cluster")
	fs.IntVar(&o.folder, "folder", def.Folder, "datacenters placed in a folder (with sub-folders for host, vm, network, datastore)")
	fs.IntVar(&o.app, "app", def.App, "vApps per cluster")
	fs.IntVar(&o.pod, "pod", def.Pod, "storage pods per datacenter")
	fs.BoolVar(&o.autostart, "autostart", def.Autostart, "power on the VMs the model creates")
	fs.StringVar(&o.certFile, "cert", "", "PEM server certificate (default: a fresh self-signed ECDSA one per run)")
	fs.StringVar(&o.keyFile, "key", "", "PEM private key for -cert")
	fs.IntVar(&o.delay, "delay", 0, "milliseconds added to every SOAP call")
	fs.BoolVar(&o.trace, "trace", false, "log SOAP traffic to stderr")
	fs.BoolVar(&o.stdinEOF, "exit-on-stdin-eof", false, "shut down cleanly when stdin reaches EOF (the parent went away)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if o.username == "" || o.password == "" {
		return nil, errors.New("-username and -password must not be empty")
	}
	for name, n := range map[string]int{
		"dc": o.dc, "cluster": o.cluster, "host": o.host, "standalone-host": o.sHost,
		"vm": o.vm, "ds": o.ds, "pg": o.pg, "pool": o.pool, "folder": o.folder,
		"app": o.app, "pod": o.pod, "delay": o.delay,
	} {
		if n < 0 {
			return nil, fmt.Errorf("-%s must not be negative", name)
		}
	}
	if o.vm > 0 && o.ds == 0 {
		return nil, errors.New("-vm needs -ds >= 1 (the model puts its VMs on LocalDS_0)")
	}
	if (o.certFile == "") != (o.keyFile == "") {
		return nil, errors.New("-cert and -key go together")
	}
	if o.esx {
		var vpxOnly []string
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "dc", "cluster", "host", "standalone-host", "pg", "pool", "folder", "app", "pod":
				vpxOnly = append(vpxOnly, "-"+f.Name)
			}
		})
		if len(vpxOnly) > 0 {
			return nil, fmt.Errorf("-esx does not take %s", strings.Join(vpxOnly, " "))
		}
	}
	return o, nil
}

func (o *options) model() *simulator.Model {
	var m *simulator.Model
	if o.esx {
		m = simulator.ESX()
	} else {
		m = simulator.VPX()
		m.Datacenter = o.dc
		m.Cluster = o.cluster
		m.ClusterHost = o.host
		m.Host = o.sHost
		m.Portgroup = o.pg
		m.Pool = o.pool
		m.Folder = o.folder
		m.App = o.app
		m.Pod = o.pod
	}
	m.Machine = o.vm
	m.Datastore = o.ds
	m.Autostart = o.autostart
	m.DelayConfig.Delay = o.delay
	return m
}

// thumbprint formats a digest the way vSphere shows certificate thumbprints.
func thumbprint(sum []byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// selfSigned makes a fresh self-signed P-256 certificate for the listen host, like a
// vCenter's own: its thumbprint differs on every run. (The simulator's default is Go's
// 1024-bit RSA test certificate, which OpenSSL refuses as too weak.)
func selfSigned(listen string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "vcsim", Organization: []string{"Secondsite tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true, // so that a client can trust exactly this certificate
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return tls.Certificate{}, err
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
	} else if ip == nil && host != "" {
		tmpl.DNSNames = append(tmpl.DNSNames, host)
	} else if addrs, err := net.InterfaceAddrs(); err == nil {
		// Unspecified: the simulator advertises one of the machine's addresses.
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() {
				tmpl.IPAddresses = append(tmpl.IPAddresses, n.IP)
			}
		}
	}
	if name, err := os.Hostname(); err == nil && name != "" && name != "localhost" {
		tmpl.DNSNames = append(tmpl.DNSNames, name)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// datacenterOf walks up the inventory from e to its Datacenter's name.
func datacenterOf(e mo.Entity) string {
	ref := e.Entity().Parent
	for ref != nil {
		obj, ok := simulator.Map.Get(*ref).(mo.Entity)
		if !ok {
			break
		}
		if ref.Type == "Datacenter" {
			return obj.Entity().Name
		}
		ref = obj.Entity().Parent
	}
	return "?"
}

// datastoreLines lists VCSIM_DATASTORE=<datacenter>/<name>=<local directory>, sorted.
func datastoreLines() []string {
	var lines []string
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok || ds.Info == nil {
			continue
		}
		dir := ds.Info.GetDatastoreInfo().Url
		lines = append(lines, fmt.Sprintf("VCSIM_DATASTORE=%s/%s=%s", datacenterOf(ds), ds.Name, dir))
	}
	sort.Strings(lines)
	return lines
}

// startServer calls NewServer, which panics when it cannot listen.
func startServer(m *simulator.Model) (s *simulator.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("cannot serve: %v", r)
		}
	}()
	return m.Service.NewServer(), nil
}

func run(args []string) int {
	o, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		return 2
	}
	simulator.Trace = o.trace

	var pair tls.Certificate
	if o.certFile != "" {
		pair, err = tls.LoadX509KeyPair(o.certFile, o.keyFile)
	} else {
		pair, err = selfSigned(o.listen)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vcsim: certificate:", err)
		return 2
	}
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{pair}}

	// Catch signals before creating anything that needs cleaning up.
	stop := make(chan string, 2)
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-signals
		stop <- s.String()
	}()

	m := o.model()
	defer m.Remove() // the datastore directories
	if err := m.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim: creating the inventory:", err)
		return 1
	}
	m.Service.TLS = tlsConfig
	// A user other than simulator.DefaultLogin makes Login check name and password.
	m.Service.Listen = &url.URL{Host: o.listen, User: url.UserPassword(o.username, o.password)}

	server, err := startServer(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		return 1
	}
	closed := make(chan struct{})
	defer func() {
		go func() {
			server.Close()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(5 * time.Second): // a client still in a call: clean up anyway
			fmt.Fprintln(os.Stderr, "vcsim: server close timed out")
		}
	}()

	cert := server.Certificate()
	public := *server.URL
	public.User = nil
	s1 := sha1.Sum(cert.Raw)
	s256 := sha256.Sum256(cert.Raw)
	lines := []string{
		"VCSIM_CERT_SHA1=" + thumbprint(s1[:]),
		"VCSIM_CERT_SHA256=" + thumbprint(s256[:]),
	}
	lines = append(lines, datastoreLines()...)
	lines = append(lines, "VCSIM_URL="+public.String())
	// os.Stdout is unbuffered: one write, and it is out.
	if _, err := io.WriteString(os.Stdout, strings.Join(lines, "\n")+"\n"); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim: writing stdout:", err)
		return 1
	}

	if o.stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop <- "EOF on stdin"
		}()
	}

	why := <-stop
	fmt.Fprintf(os.Stderr, "vcsim: %s, shutting down\n", why)
	return 0
}

func main() {
	// run's deferred cleanup (server, datastore directories) happens before os.Exit.
	os.Exit(run(os.Args[1:]))
}
