// Command etcd is the etcd server of go.etcd.io/etcd/server/v3 (the root
// module that holds upstream's main package is not published for v3.7).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
