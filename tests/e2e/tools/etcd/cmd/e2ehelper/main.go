// Command e2ehelper does the small jobs of tests/e2e/run.sh that bash and
// openssl cannot do well:
//
//	e2ehelper scan --provider kekd [--marker S]   < etcdctl get --prefix KEY -w json
//	e2ehelper ports N                              N free loopback TCP ports
//	e2ehelper certs DIR                            CA, serving, client and service-account keys
//	e2ehelper kekdlist                             < kekd admin list --output json
//	e2ehelper value                                < etcdctl get KEY -w json (the exact value bytes)
//	e2ehelper gets --server URL --ca F --cert F --key F --marker S NS/NAME...
//
// gets GETs each Secret from kube-apiserver (no resourceVersion: read from
// etcd, not from the watch cache) without kubectl's client-side rate limit,
// and checks that data.token is "<marker>-<name>".
//
// scan prints one line per etcd key: "KEY<TAB>VERDICT<TAB>KEY_ID<TAB>DEK_SOURCE_TYPE".
// VERDICT is "ok" (value is k8s:enc:kms:v2:<provider>: + a well-formed
// EncryptedObject that does not contain the marker), "noprefix", "plaintext"
// (the marker occurs in the raw value) or "badproto". The EncryptedObject
// fields are the ones of k8s.io/apiserver kmsv2/v2 api.proto:
// 1 encryptedData, 2 keyID, 3 encryptedDEKSource, 4 annotations, 5 encryptedDEKSourceType.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "scan":
		err = scan(os.Args[2:])
	case "ports":
		err = ports(os.Args[2:])
	case "certs":
		err = certs(os.Args[2:])
	case "kekdlist":
		err = kekdlist()
	case "value":
		err = value()
	case "gets":
		err = gets(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2ehelper:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: e2ehelper scan --provider NAME [--marker S] | ports N | certs DIR | kekdlist | value | gets ...")
	os.Exit(64)
}

// etcdctl -w json output of `get`.
type getResponse struct {
	Kvs []struct {
		Key   string `json:"key"`
		Value string `json:"value"`
	} `json:"kvs"`
}

func scan(args []string) error {
	fs := flag.NewFlagSet("scan", flag.ExitOnError)
	provider := fs.String("provider", "kekd", "KMS provider name in the prefix")
	marker := fs.String("marker", "", "plaintext marker that must not occur in any value")
	_ = fs.Parse(args)
	var resp getResponse
	if err := json.NewDecoder(os.Stdin).Decode(&resp); err != nil {
		return fmt.Errorf("reading etcdctl json: %w", err)
	}
	prefix := []byte("k8s:enc:kms:v2:" + *provider + ":")
	for _, kv := range resp.Kvs {
		key, err := base64.StdEncoding.DecodeString(kv.Key)
		if err != nil {
			return err
		}
		val, err := base64.StdEncoding.DecodeString(kv.Value)
		if err != nil {
			return err
		}
		verdict, keyID, srcType := "ok", "-", "-"
		switch {
		case *marker != "" && bytes.Contains(val, []byte(*marker)):
			verdict = "plaintext"
		case !bytes.HasPrefix(val, prefix):
			verdict = "noprefix"
		default:
			obj, err := parseEncryptedObject(val[len(prefix):])
			if err != nil {
				verdict = "badproto"
			} else {
				keyID = obj.keyID
				srcType = strconv.FormatUint(obj.sourceType, 10)
			}
		}
		fmt.Printf("%s\t%s\t%s\t%s\n", key, verdict, keyID, srcType)
	}
	return nil
}

type encryptedObject struct {
	keyID      string
	sourceType uint64
}

// parseEncryptedObject reads the protobuf wire format by hand: no generated
// code, no protoc. It requires fields 1, 2 and 3 to be present.
func parseEncryptedObject(b []byte) (encryptedObject, error) {
	var o encryptedObject
	seen := map[uint64]bool{}
	for len(b) > 0 {
		tag, n := uvarint(b)
		if n <= 0 {
			return o, errors.New("bad tag")
		}
		b = b[n:]
		field, wire := tag>>3, tag&7
		switch wire {
		case 0:
			v, n := uvarint(b)
			if n <= 0 {
				return o, errors.New("bad varint")
			}
			b = b[n:]
			if field == 5 {
				o.sourceType = v
			}
		case 2:
			l, n := uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				return o, errors.New("bad length")
			}
			data := b[n : n+int(l)]
			b = b[n+int(l):]
			if field == 2 {
				o.keyID = string(data)
			}
			if (field == 1 || field == 3) && len(data) == 0 {
				return o, fmt.Errorf("empty field %d", field)
			}
		default:
			return o, fmt.Errorf("unexpected wire type %d", wire)
		}
		seen[field] = true
	}
	if !seen[1] || !seen[2] || !seen[3] || o.keyID == "" {
		return o, errors.New("missing encryptedData, keyID or encryptedDEKSource")
	}
	return o, nil
}

func uvarint(b []byte) (uint64, int) {
	var x uint64
	for i := 0; i < len(b) && i < 10; i++ {
		x |= uint64(b[i]&0x7f) << (7 * i)
		if b[i] < 0x80 {
			return x, i + 1
		}
	}
	return 0, 0
}

func ports(args []string) error {
	n := 1
	if len(args) > 0 {
		var err error
		if n, err = strconv.Atoi(args[0]); err != nil {
			return err
		}
	}
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		ls = append(ls, l)
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return nil
}

// certs writes what kube-apiserver and kubectl need when openssl is missing:
// ca.crt/ca.key, serving.crt/serving.key (127.0.0.1, localhost),
// admin.crt/admin.key (CN admin, O system:masters), sa.key/sa.pub.
func certs(args []string) error {
	if len(args) != 1 {
		usage()
	}
	dir := args[0]
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kekd-e2e-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := writeCert(dir, "ca", caDER, caKey); err != nil {
		return err
	}
	leaf := func(name string, serial int64, subj pkix.Name, usage x509.ExtKeyUsage, ips []net.IP, dns []string) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      subj,
			NotBefore:    now,
			NotAfter:     now.Add(48 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			IPAddresses:  ips,
			DNSNames:     dns,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		return writeCert(dir, name, der, key)
	}
	if err := leaf("serving", 2, pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth,
		[]net.IP{net.ParseIP("127.0.0.1")}, []string{"localhost", "kubernetes", "kubernetes.default"}); err != nil {
		return err
	}
	if err := leaf("admin", 3, pkix.Name{CommonName: "kekd-e2e-admin", Organization: []string{"system:masters"}},
		x509.ExtKeyUsageClientAuth, nil, nil); err != nil {
		return err
	}
	sa, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	priv, err := x509.MarshalPKCS8PrivateKey(sa)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, "sa.key"), "PRIVATE KEY", priv, 0o600)
}

func writeCert(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	if err := writePEM(filepath.Join(dir, name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	k, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, name+".key"), "PRIVATE KEY", k, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// kekdlist turns `kekd admin list --output json` into lines a shell reads:
// "VERSION STATE KEY_ID ENCRYPTS DECRYPTS" per version, then
// "primary VERSION" and "serving KEY_ID" (or "serving -").
func kekdlist() error {
	var l struct {
		Primary  *int `json:"primary"`
		Versions []struct {
			Version  int    `json:"version"`
			State    string `json:"state"`
			KeyID    string `json:"key_id"`
			Encrypts uint64 `json:"encrypts"`
			Decrypts uint64 `json:"decrypts"`
		} `json:"versions"`
		Server *struct {
			KeyID string `json:"key_id"`
		} `json:"server"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&l); err != nil {
		return fmt.Errorf("reading kekd admin list json: %w", err)
	}
	for _, v := range l.Versions {
		fmt.Printf("%d %s %s %d %d\n", v.Version, v.State, v.KeyID, v.Encrypts, v.Decrypts)
	}
	if l.Primary != nil {
		fmt.Printf("primary %d\n", *l.Primary)
	}
	if l.Server != nil && l.Server.KeyID != "" {
		fmt.Printf("serving %s\n", l.Server.KeyID)
	} else {
		fmt.Println("serving -")
	}
	return nil
}

// value writes the exact bytes of the first value in etcdctl's JSON (whose
// --print-value-only adds a newline).
func value() error {
	var resp getResponse
	if err := json.NewDecoder(os.Stdin).Decode(&resp); err != nil {
		return fmt.Errorf("reading etcdctl json: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return errors.New("no such key")
	}
	v, err := base64.StdEncoding.DecodeString(resp.Kvs[0].Value)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(v)
	return err
}

func gets(args []string) error {
	fs := flag.NewFlagSet("gets", flag.ExitOnError)
	server := fs.String("server", "", "https://127.0.0.1:PORT")
	caFile := fs.String("ca", "", "CA certificate")
	certFile := fs.String("cert", "", "client certificate")
	keyFile := fs.String("key", "", "client key")
	marker := fs.String("marker", "", "values are MARKER-NAME")
	_ = fs.Parse(args)
	pool := x509.NewCertPool()
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		return err
	}
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return err
	}
	client := &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}},
	}
	var ok, wrong, failed int
	for _, ref := range fs.Args() {
		ns, name, _ := strings.Cut(ref, "/")
		resp, err := client.Get(*server + "/api/v1/namespaces/" + ns + "/secrets/" + name)
		if err != nil {
			failed++
			fmt.Printf("%s: %v\n", ref, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			failed++
			fmt.Printf("%s: HTTP %d %s\n", ref, resp.StatusCode, bytes.TrimSpace(body))
			continue
		}
		var secret struct {
			Data map[string][]byte `json:"data"`
		}
		if err := json.Unmarshal(body, &secret); err != nil || string(secret.Data["token"]) != *marker+"-"+name {
			wrong++
			fmt.Printf("%s: wrong value\n", ref)
			continue
		}
		ok++
	}
	fmt.Printf("%d read, %d wrong, %d failed\n", ok, wrong, failed)
	if wrong+failed > 0 {
		return errors.New("some Secrets did not read back")
	}
	return nil
}
