// etcd server for our offline node image: etcd's own module has relative replace
// directives, so it cannot be `go install`ed; this one-line main module builds it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
